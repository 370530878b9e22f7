"""Generation, the public side: `DiffusionGenerationConfig`, `DiffusionGenerateOutput`, `generate` and `infill`.

`generate` and `infill` resolve and check the call's settings, lay out the canvas, plan the call
(`decoding.DecodingPlan`) and run the denoising loop (`decoding.py`). The conventions of decoding (notation, canvas
layout, block grid, the per-row step budget, threshold, NFE, the exact KV cache, stop, host syncs) are written once,
in `decoding.py`'s docstring.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from . import samplers
from .architectures import context_window
from .decoding import DecodingPlan, _denoise, _Outputs
from .samplers import SAMPLERS, Sampler, get_sampler

__all__ = [
    "DiffusionGenerateOutput",
    "DiffusionGenerationConfig",
    "generate",
    "infill",
]

_DIFFUSION_FIELDS = {
    "steps": None,
    "block_length": None,
    "sampler": "confidence",
    "threshold": None,
    "entropy_bound": None,
    "output_history": False,
}


class DiffusionGenerationConfig(GenerationConfig):
    r"""What only decoding reads. A `transformers.GenerationConfig` with the settings of masked-diffusion decoding.

    Saved and loaded like any generation config (`save_pretrained` / `from_pretrained`, `generation_config.json`).
    The inherited fields read here: `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`,
    `pad_token_id`, `use_cache`, `return_dict_in_generate`. Greedy unless `do_sample=True` and `temperature > 0`.

    Args:
        steps (`int`, *optional*):
            Denoising steps per row for its whole answer (LLaDA), never exceeded: every block of the row's answer gets
            one and the rest are shared in proportion to its masked positions, so a row takes exactly
            `min(steps, its masked positions)` steps (rule in `decoding.py`'s docstring, "Steps"), whatever else is in
            the batch. Defaults to `max_new_tokens` (one token per step; for `infill`, each row's number of gaps).
            Must be at least the number of blocks an answer spans (under block attention a partial first block
            counts).
        block_length (`int`, *optional*):
            Tokens per semi-autoregressive block. Defaults to the model's `block_size` under block attention (then it
            must be a multiple of it), else to the whole answer.
        sampler (`str` or `Sampler`, defaults to `"confidence"`):
            Which masked positions a step commits first: a key of `samplers.SAMPLERS` (`confidence`, `random`,
            `margin`, `entropy`, `left_to_right`, `prefix`) or any object with a `confidence(probs, tokens, *,
            generator)` method.
        threshold (`float`, *optional*):
            Fast-dLLM parallel decoding, in `(0, 1]`: a step commits every masked position whose score reaches it,
            and at least the number the plan gives the step (which is then a minimum), so confident blocks end in
            fewer steps.
        entropy_bound (`float`, *optional*):
            The entropy-bounded (EB) sampler: a step commits masked positions in the sampler's order while their
            summed entropy, less the largest, stays within this budget (nats; `samplers.select_entropy_bound`), and at
            least the planned number. Not together with `threshold`.
        output_history (`bool`, defaults to `False`):
            Return the answer canvas after every step (`history`, needs `return_dict_in_generate=True`).

    Example:
    ```python
    >>> from peft_diffusion import DiffusionGenerationConfig
    >>> config = DiffusionGenerationConfig(max_new_tokens=64, steps=32, block_length=16, threshold=0.9)
    >>> config.steps, config.sampler
    (32, 'confidence')
    ```
    """

    def __init__(self, **kwargs):
        # Set before the base __init__, which calls `validate`.
        for name, default in _DIFFUSION_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        super().__init__(**kwargs)

    def validate(self, *args, **kwargs):
        """Check the inherited fields (transformers) and the diffusion ones; raise `ValueError` naming the fix."""
        super().validate(*args, **kwargs)
        for name in ("steps", "block_length"):
            value = getattr(self, name, None)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {name}={value!r}.")
        threshold = getattr(self, "threshold", None)
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(
                f"`threshold` must be in (0, 1], got threshold={threshold}; use e.g. 0.9, or None for a fixed "
                "number of tokens per step."
            )
        bound = getattr(self, "entropy_bound", None)
        if bound is not None:
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound < 0:
                raise ValueError(f"`entropy_bound` must be a finite number >= 0 (nats), got entropy_bound={bound!r}.")
            if threshold is not None:
                raise ValueError(
                    f"Pass one adaptive rule: `threshold` or `entropy_bound`, got threshold={threshold} and "
                    f"entropy_bound={bound}."
                )
        sampler = getattr(self, "sampler", "confidence")
        if isinstance(sampler, str) and sampler not in SAMPLERS:
            raise ValueError(
                f"`sampler` must be one of {sorted(SAMPLERS)}, got sampler={sampler!r}; register a new one with "
                "`@register_sampler(name)` or pass an object with a `confidence(probs, tokens, *, generator)` method."
            )
        if not isinstance(sampler, (str, Sampler)):
            raise ValueError(
                f"`sampler` must be a name in {sorted(SAMPLERS)} or a `Sampler`, got {type(sampler).__name__}."
            )

    @property
    def is_greedy(self) -> bool:
        """Temperature 0 or `do_sample` off: argmax proposals."""
        return not self.do_sample or (self.temperature is not None and self.temperature == 0)


@dataclass
class DiffusionGenerateOutput(ModelOutput):
    """Output of `generate` / `infill` with `return_dict_in_generate=True`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, prompt_length + max_new_tokens)`): the input followed
            by the new tokens (for `infill`: the input with its gaps filled).
        nfe (`int`): number of model forward passes.
        history (`torch.LongTensor` of shape `(num_steps, batch_size, max_new_tokens)`, *optional*): the answer
            canvas after every step (mask tokens where not yet committed), with `output_history=True`.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    history: torch.LongTensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> torch.LongTensor | DiffusionGenerateOutput:
    r"""Generate `max_new_tokens` after each prompt by parallel denoising (semi-autoregressive blocks).

    Outline:
        1. Resolve the config: the model's generation config, then `generation_config`, then `kwargs` (unknown keys
           raise); check it against the model and the inputs.
        2. Plan once, per row (`DecodingPlan.for_generate`): the blocks (the training grid under block attention,
           `position // L`, else LLaDA's from each answer start), their windows, each row's steps and tokens per step.
        3. Lay out the canvas: each row's prompt from column 0, then `N` mask tokens, then right padding.
        4. The denoising loop (`decoding._denoise`) executes the plan, with the exact KV cache under block attention.
        5. Output in HF's layout: `input_ids` followed by the new tokens.

    Args:
        model (`DiffusionLM`): the diffusion LM (call `model.eval()` first).
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): prompts, left-padded (HF convention),
            each at least one token long (the BOS token alone for unconditional generation).
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*): 1 for real tokens,
            0 for the left padding.
        generation_config (`GenerationConfig`, *optional*): overrides the model's `generation_config`.
        streamer (`BaseStreamer`, *optional*): receives the prompt, then the committed tokens in order (`put`),
            then `end()`; batch size 1. A streamer with `put_draft` (transformers' `TextDiffusionStreamer`) also
            receives the answer canvas after every step.
        generator (`torch.Generator`, *optional*): randomness of sampling and of the `random` sampler.
        kwargs: fields of `DiffusionGenerationConfig` (`max_new_tokens`, `steps`, `block_length`, `sampler`,
            `threshold`, `temperature`, ...). Anything else raises.

    Returns:
        `torch.LongTensor` of shape `(batch_size, prompt_length + max_new_tokens)`, or a `DiffusionGenerateOutput`
        with `return_dict_in_generate=True`.

    Example:
    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft_diffusion import DiffusionConfig, get_diffusion_model
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...                                     num_hidden_layers=2, num_attention_heads=4))
    >>> model = get_diffusion_model(base, DiffusionConfig(attention="block", block_size=4, mask_token_id=127)).eval()
    >>> out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=8, steps=4, threshold=0.9,
    ...                      return_dict_in_generate=True)
    >>> out.sequences.shape, out.nfe <= 4
    (torch.Size([1, 11]), True)
    ```
    """
    # 1. config
    config = _resolve_config(model, generation_config, kwargs)
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError("`input_ids` must be a `(batch_size, prompt_length)` LongTensor of prompts.")
    batch_size, prompt_width = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_left_padding(attention_mask)
    _check_token_ids(model, input_ids[attention_mask.bool()], "`input_ids`")
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        raise ValueError("`max_new_tokens` is required, got None; pass e.g. max_new_tokens=128.")
    grid = model.config.attention_block_size  # the attention's blocks: decoding follows the training grid
    block_length = config.block_length or grid or max_new_tokens
    if grid is not None and block_length % grid:
        raise ValueError(
            f"`block_length` must be a multiple of the model's block_size (its attention blocks), got "
            f"block_length={block_length} and block_size={grid}; use block_length={grid} (the training grid)."
        )
    prompt_lengths = attention_mask.long().sum(-1)  # [B]
    _check_prompt_lengths(prompt_lengths)
    longest = int(prompt_lengths.max())
    _check_positions(
        model, longest + max_new_tokens, f"the prompt ({longest} tokens) + max_new_tokens ({max_new_tokens})"
    )
    if streamer is not None and batch_size != 1:
        raise ValueError(
            f"`streamer` supports batch size 1, got batch_size={batch_size}; stream one prompt at a time."
        )

    # 2. the plan: the training grid under block attention (`position // L`), else LLaDA's blocks; steps per row
    plan = DecodingPlan.for_generate(
        prompt_lengths,
        max_new_tokens=max_new_tokens,
        block_length=block_length,
        steps=config.steps or max_new_tokens,
        aligned=grid is not None,
    )

    # 3. canvas: row b holds its prompt in columns [0, P_b), masks in [P_b, P_b + N), padding after.
    width = longest + max_new_tokens
    mask_token_id = model.config.mask_token_id
    eos_ids, pad_id = _special_ids(model, config, device)
    columns = torch.arange(width, device=device)  # [T]
    lengths = prompt_lengths[:, None]  # [B, 1]
    source = (prompt_width - lengths + columns).clamp(max=prompt_width - 1)  # [B, T]
    canvas = torch.where(columns < lengths, input_ids.gather(1, source), mask_token_id)  # [B, T]
    canvas = torch.where(plan.is_real, canvas, pad_id)  # [B, T]
    answer_index = lengths + torch.arange(max_new_tokens, device=device)  # [B, N]
    if streamer is not None:
        streamer.put(input_ids.cpu())

    # 4. the loop
    outputs = _Outputs(eos_ids, pad_id, answer_index, streamer, config.output_history)
    use_cache = grid is not None and config.use_cache is not False
    canvas, nfe, history = _denoise(
        model, canvas, plan, _step_function(config, generator, mask_token_id), outputs, use_cache
    )

    # 5. HF layout
    sequences = torch.cat([input_ids, canvas.gather(1, answer_index)], dim=1)  # [B, prompt_width + N]
    if streamer is not None:
        streamer.end()
    if config.return_dict_in_generate:
        return DiffusionGenerateOutput(sequences=sequences, nfe=nfe, history=history)
    return sequences


@torch.no_grad()
def infill(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> torch.LongTensor | DiffusionGenerateOutput:
    r"""Fill every mask token of `input_ids`, keeping all other tokens fixed.

    Build the input from the text before and after a gap of `n` tokens, e.g.
    `torch.cat([prefix_ids, torch.full((1, n), model.config.mask_token_id), suffix_ids], dim=1)`; several gaps per
    row work too. `steps` defaults to each row's number of masked positions (one token per step). There is no EOS
    stop.

    - Bidirectional / annealed models read the whole text on both sides of every gap. Blocks run over the masked
      positions in reading order (`block_length` of them per block, all of them by default).
    - Block attention: a block-causal model reads the text after a gap only inside the gap's own attention block
      (`position // block_size`); later blocks cannot influence it. The blocks that hold gaps are filled left to
      right (`block_length` is not used); each row shares its steps over its blocks in proportion to their masked
      positions (`DiffusionGenerationConfig.steps`).

    Args:
        model (`DiffusionLM`): a diffusion LM (any attention pattern; see above for what a gap can read).
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): text with mask tokens at the gaps.
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 0 for padding.
        generation_config (`GenerationConfig`, *optional*), generator (`torch.Generator`, *optional*), kwargs: as in
            `generate` (`max_new_tokens` and `eos_token_id` are not used).

    Returns:
        `torch.LongTensor` of shape `(batch_size, sequence_length)`, or a `DiffusionGenerateOutput` with
        `return_dict_in_generate=True` (its `history` holds the whole canvas after every step).

    Example:
    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft_diffusion import DiffusionConfig, get_diffusion_model
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...                                     num_hidden_layers=2, num_attention_heads=4))
    >>> model = get_diffusion_model(base, DiffusionConfig(attention="bidirectional", mask_token_id=127)).eval()
    >>> filled = model.infill(torch.tensor([[1, 5, 127, 127, 127, 9]]))
    >>> filled[0, [0, 1, 5]].tolist(), bool((filled == 127).any())
    ([1, 5, 9], False)
    ```
    """
    config = _resolve_config(model, generation_config, kwargs)
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError("`input_ids` must be a `(batch_size, sequence_length)` LongTensor with mask tokens to fill.")
    batch_size, width = input_ids.shape
    device = input_ids.device
    is_real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    _check_token_ids(model, input_ids[is_real], "`input_ids`")
    _check_positions(model, int(is_real.sum(-1).max()), "the input length")
    mask_token_id = model.config.mask_token_id
    is_generated = (input_ids == mask_token_id) & is_real  # [B, T]
    if not bool(is_generated.any()):
        raise ValueError(f"`input_ids` holds no mask token (id {mask_token_id}): nothing to infill.")
    plan = DecodingPlan.for_infill(
        is_generated,
        is_real,
        block_length=config.block_length,
        grid=model.config.attention_block_size,
        steps=config.steps,
    )
    _, pad_id = _special_ids(model, config, device)
    outputs = _Outputs(
        None, pad_id, torch.arange(width, device=device).expand(batch_size, -1), output_history=config.output_history
    )
    canvas, nfe, history = _denoise(
        model, input_ids.clone(), plan, _step_function(config, generator, mask_token_id), outputs, use_cache=False
    )
    if config.return_dict_in_generate:
        return DiffusionGenerateOutput(sequences=canvas, nfe=nfe, history=history)
    return canvas


# ----------------------------------------------------------------------------------------------------------------------
# Checks and settings
# ----------------------------------------------------------------------------------------------------------------------


def _resolve_config(model, generation_config: GenerationConfig | None, kwargs: dict) -> DiffusionGenerationConfig:
    """The model's generation config, overridden by `generation_config`, then by `kwargs`; unknown kwargs raise."""
    base = generation_config if generation_config is not None else model.generation_config
    values = {
        key: value
        for key, value in base.to_dict().items()
        if key not in ("_from_model_config", "transformers_version")
    }
    config = DiffusionGenerationConfig(**values)
    unused = config.update(**kwargs)
    if unused:
        raise ValueError(
            f"Unknown arguments to `generate`: {sorted(unused)}; use fields of `DiffusionGenerationConfig` "
            f"(e.g. max_new_tokens, steps, block_length, sampler, threshold, temperature)."
        )
    if model.config.mask_token_id is None:
        raise ValueError(
            "The model has no `mask_token_id`; convert it with `get_diffusion_model(..., tokenizer=...)`."
        )
    return config


def _special_ids(model, config: GenerationConfig, device) -> tuple[torch.Tensor | None, int]:
    """EOS ids (tensor, or None for no stop) and the pad id, from the config, else the base model's defaults."""
    base = model.causal_lm.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else base.eos_token_id
    eos_ids = None
    if eos is not None:
        eos_list = [eos] if isinstance(eos, int) else list(eos)
        eos_ids = torch.tensor(eos_list, dtype=torch.long, device=device) if eos_list else None
    pad = config.pad_token_id if config.pad_token_id is not None else base.pad_token_id
    if pad is None:
        pad = int(eos_ids[0]) if eos_ids is not None else 0
    return eos_ids, pad


def _check_left_padding(attention_mask: torch.Tensor) -> None:
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError(
            "`attention_mask` has padding on the right of a prompt; generation needs left padding: set "
            "`tokenizer.padding_side = 'left'`."
        )


def _check_prompt_lengths(prompt_lengths: torch.Tensor) -> None:
    """Every row needs a prompt token: under shift token `i` is predicted from position `i - 1`, so an answer at
    position 0 would have nothing to be predicted from, and training never scores position 0."""
    empty = (prompt_lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"`input_ids` has an empty prompt in rows {empty} (no token with attention_mask 1); every row needs at "
            "least one prompt token. For unconditional generation pass the BOS token as the prompt, e.g. "
            "`torch.tensor([[tokenizer.bos_token_id]])`."
        )


def _check_token_ids(model, ids: torch.Tensor, name: str) -> None:
    """Every id must index a row of the input embeddings: `0 <= id < num_embeddings`."""
    vocab_size = model.causal_lm.get_input_embeddings().weight.shape[0]  # also through PEFT's token wrapper
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} holds token id {bad}, outside the model's vocabulary of {vocab_size} embedding rows (ids "
            f"0..{vocab_size - 1}); encode the text with the tokenizer saved with the model."
        )


def _check_positions(model, length: int, what: str) -> None:
    """`length` positions must fit the base model's context window (`architectures.context_window`; unknown: no
    check)."""
    limit = context_window(model.causal_lm.config)
    if limit is not None and length > limit:
        raise ValueError(
            f"{what} = {length} tokens exceeds the model's context window of {limit} positions; shorten the prompt "
            f"or lower max_new_tokens to at most {limit} in total."
        )


def _step_function(config: DiffusionGenerationConfig, generator: torch.Generator | None, mask_token_id: int):
    """`samplers.step` with the call's settings bound: `step(logits, is_masked, num_to_commit) -> (tokens, commit)`."""
    greedy = config.is_greedy
    return functools.partial(
        samplers.step,
        sampler=get_sampler(config.sampler),
        threshold=config.threshold,
        entropy_bound=config.entropy_bound,
        temperature=0.0 if greedy else (1.0 if config.temperature is None else config.temperature),
        top_k=None if greedy else config.top_k,
        top_p=None if greedy else config.top_p,
        generator=generator,
        mask_token_id=mask_token_id,
    )
