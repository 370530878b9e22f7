"""Decoding: `DiffusionGenerationConfig` and the one denoising loop (blocks, exact KV cache, batching, infill, streams).

Notation (shapes of the decoding state; `samplers.py` holds the per-step math):

| name           | shape          | meaning                                                                          |
|----------------|----------------|----------------------------------------------------------------------------------|
| `B`, `T`, `N`  |                | batch size, canvas width (`max(prompt_lengths) + N`), `max_new_tokens`           |
| `L`            |                | `block_length`, tokens per decoding block                                        |
| `canvas`       | `[B, T]`       | the sequence being denoised: prompt, committed tokens, mask tokens, padding      |
| `is_real`      | `[B, T]`       | not padding: the attention mask of the canvas                                    |
| `is_generated` | `[B, T]`       | positions the loop fills (the answer, or the gaps of `infill`)                  |
| `block_ids`    | `[B, T]`       | decoding block of each position                                                  |
| `is_masked`    | `[B, W]`       | positions of the active window still holding the mask token                      |

Conventions:
    - Layout. Rows are re-laid from the caller's left padding so that every row's first real token sits in column 0
      (column == position); the canvas is right-padded. The output is HF's: the caller's `input_ids` (left padding
      kept) followed by the `N` new tokens of each row.
    - Block grid. Under `attention="block"` the decoding blocks are the training grid: `position // block_length`,
      aligned at position 0 over prompt and answer alike (`block_length` a multiple of `block_size`). The first block
      may be partial (the prompt's tail shares it) and so may the last. Otherwise (bidirectional, annealed) blocks
      are LLaDA's: aligned at the start of the answer, the last one partial when `L` does not divide `N`.
    - Steps. `steps` is the total for the answer (LLaDA): a full block gets `steps // ceil(N / L)` steps (rounded
      down), a partial block of `m` tokens `ceil(that * m / L)`, so tokens per step stay constant and the total
      stays within `steps`; inside a block, `samplers.num_tokens_per_step` splits each row's masked count evenly over
      them. With a `threshold` (Fast-dLLM) that split is a minimum and confident steps commit more: blocks end early.
    - Exact KV cache (block attention, BD3-LM / Fast-dLLM v2 style). The cache holds only committed tokens of
      finished blocks. A step of block k forwards its window over the cache and crops the cache back. The forward
      that commits block k is fused with the first step of block k+1 (one pass instead of two; the prompt is
      prefilled together with the first block). A step's window is exactly the block over a cache of everything
      before it, so under block attention (window = one attention block, no padding) it runs with no mask at all
      (`AttentionLayout.unmasked`: sdpa/flash/flex fast kernels). Under `shift`, the first position of a block is
      predicted from the hidden state of the last committed token: those logits come out of the forward that
      commits it (prefill or fused commit) and are reused at every step of the block. Cached decoding equals
      uncached decoding.
    - Stop. A row is finished once it holds an EOS with every answer position before it committed; everything after
      that EOS becomes `pad_token_id`. The loop ends when every row is finished or every block is decoded.
    - Host syncs. One per step (are masks left in the block?), two per block (its step count, and are all rows
      finished?) and one per call (where padding starts); the streamer adds one per step. No per-row Python loops.

One denoising loop (`_denoise`):
    1. For each block k (left to right): the active positions are `is_generated & (block_ids == k)`.
    2. Repeat until the block has no masks (at most `steps_per_block` times): forward (cached window or whole
       canvas), `samplers.step` proposes tokens and picks positions, commit them, finish rows at EOS, stream.
    3. Cached: the commit of block k is fused with the first forward of block k+1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput

from . import samplers
from .samplers import SAMPLERS, Sampler, get_sampler, num_tokens_per_step

__all__ = ["DiffusionGenerateOutput", "DiffusionGenerationConfig", "generate", "infill"]

_DIFFUSION_FIELDS = {
    "steps": None,
    "block_length": None,
    "sampler": "confidence",
    "threshold": None,
    "output_history": False,
}


class DiffusionGenerationConfig(GenerationConfig):
    r"""What only decoding reads. A `transformers.GenerationConfig` with the settings of masked-diffusion decoding.

    Saved and loaded like any generation config (`save_pretrained` / `from_pretrained`, `generation_config.json`).
    The inherited fields read here: `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`,
    `pad_token_id`, `use_cache`, `return_dict_in_generate`. Greedy unless `do_sample=True` and `temperature > 0`.

    Args:
        steps (`int`, *optional*):
            Denoising steps for the whole answer, split evenly over the blocks (LLaDA); defaults to `max_new_tokens`
            (one token per step). Must be at least the number of blocks.
        block_length (`int`, *optional*):
            Tokens per semi-autoregressive block. Defaults to the model's `block_size` under block attention (then it
            must be a multiple of it), else to the whole answer.
        sampler (`str` or `Sampler`, defaults to `"confidence"`):
            Which masked positions a step commits first: a key of `samplers.SAMPLERS` (`confidence`, `random`,
            `margin`, `entropy`) or any object with a `confidence(probs, tokens, *, generator)` method.
        threshold (`float`, *optional*):
            Fast-dLLM parallel decoding: also commit every masked position whose score reaches it, in `(0, 1]`.
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
        2. Lay out the canvas: each row's prompt from column 0, then `N` mask tokens, then right padding.
        3. Decoding blocks: the training grid under block attention (`position // L`), else LLaDA's (from the answer
           start).
        4. The denoising loop (`_denoise`), with the exact KV cache under block attention.
        5. Output in HF's layout: `input_ids` followed by the new tokens.

    Args:
        model (`DiffusionLM`): the diffusion LM (call `model.eval()` first).
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): prompts, left-padded (HF convention).
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
    num_blocks = math.ceil(max_new_tokens / block_length)
    steps = config.steps or max_new_tokens
    if steps < num_blocks:
        raise ValueError(
            f"`steps` must be at least the number of blocks ceil(max_new_tokens / block_length) = {num_blocks}, got "
            f"steps={steps}; use steps >= {num_blocks} or a larger block_length."
        )
    prompt_lengths = attention_mask.long().sum(-1)  # [B]
    longest = int(prompt_lengths.max())
    _check_positions(
        model, longest + max_new_tokens, f"the prompt ({longest} tokens) + max_new_tokens ({max_new_tokens})"
    )
    if streamer is not None and batch_size != 1:
        raise ValueError(
            f"`streamer` supports batch size 1, got batch_size={batch_size}; stream one prompt at a time."
        )

    # 2. canvas: row b holds its prompt in columns [0, P_b), masks in [P_b, P_b + N), padding after.
    width = longest + max_new_tokens
    mask_token_id = model.config.mask_token_id
    eos_ids, pad_id = _special_ids(model, config, device)
    columns = torch.arange(width, device=device)  # [T]
    lengths = prompt_lengths[:, None]  # [B, 1]
    source = (prompt_width - lengths + columns).clamp(max=prompt_width - 1)  # [B, T]
    canvas = torch.where(columns < lengths, input_ids.gather(1, source), mask_token_id)  # [B, T]
    is_real = columns < lengths + max_new_tokens  # [B, T]
    canvas = torch.where(is_real, canvas, pad_id)  # [B, T]
    is_generated = (columns >= lengths) & is_real  # [B, T]

    # 3. decoding blocks
    if grid is not None:
        block_ids = columns.expand(batch_size, -1) // block_length  # [B, T], the training grid
        first_block = int(prompt_lengths.min()) // block_length
        last_block = (width - 1) // block_length
    else:
        block_ids = (columns - lengths).div(block_length, rounding_mode="floor")  # [B, T], from the answer start
        first_block, last_block = 0, num_blocks - 1

    answer_index = lengths + torch.arange(max_new_tokens, device=device)  # [B, N]
    if streamer is not None:
        streamer.put(input_ids.cpu())

    # 4. the loop
    canvas, nfe, history = _denoise(
        model,
        canvas,
        is_real,
        is_generated,
        block_ids,
        range(first_block, last_block + 1),
        steps_per_block=steps // num_blocks,
        block_length=block_length,
        config=config,
        use_cache=grid is not None and config.use_cache is not False,
        grid=block_length if grid is not None else None,
        eos_ids=eos_ids,
        pad_id=pad_id,
        answer_index=answer_index,
        streamer=streamer,
        generator=generator,
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
    row work too. `steps` defaults to the number of masked positions (one token per step). There is no EOS stop.

    - Bidirectional / annealed models read the whole text on both sides of every gap. Blocks run over the masked
      positions in reading order (`block_length` of them per block, all of them by default).
    - Block attention: a block-causal model reads the text after a gap only inside the gap's own attention block
      (`position // block_size`); later blocks cannot influence it. The blocks that hold gaps are filled left to
      right (`block_length` is not used), each with steps in proportion to its masked positions.

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
    _check_positions(model, int(is_real.sum(-1).max()), "the input length")
    is_generated = (input_ids == model.config.mask_token_id) & is_real  # [B, T]
    num_gaps = is_generated.sum(-1)  # [B]
    most = int(num_gaps.max())
    if most == 0:
        raise ValueError(f"`input_ids` holds no mask token (id {model.config.mask_token_id}): nothing to infill.")
    steps = config.steps or most
    grid = model.config.attention_block_size
    if grid is not None:
        # The model's attention blocks, aligned at each row's first real token (as in training).
        positions = (is_real.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        block_ids = positions // grid  # [B, T]
        blocks = torch.unique(block_ids[is_generated]).tolist()  # blocks holding a gap, left to right
        per_block = torch.zeros(batch_size, int(block_ids.max()) + 1, dtype=torch.long, device=device)
        per_block.scatter_add_(1, block_ids, is_generated.long())  # [B, nb] masked positions per block
        block_length = int(per_block.max())  # steps are split in proportion to each block's masked positions
    else:
        block_length = config.block_length or most
        block_ids = (is_generated.long().cumsum(-1) - 1).clamp(min=0) // block_length  # [B, T], reading order
        blocks = range(math.ceil(most / block_length))
    num_blocks = len(blocks)
    if steps < num_blocks:
        raise ValueError(
            f"`steps` must be at least the number of blocks holding masked positions ({num_blocks}), got "
            f"steps={steps}; use steps >= {num_blocks}" + ("." if grid is not None else " or a larger block_length.")
        )
    if grid is not None:
        steps_per_block = math.ceil(steps * block_length / most)
    else:
        steps_per_block = steps // num_blocks
    _, pad_id = _special_ids(model, config, device)
    canvas, nfe, history = _denoise(
        model,
        input_ids.clone(),
        is_real,
        is_generated,
        block_ids,
        blocks,
        steps_per_block=steps_per_block,
        block_length=block_length,
        config=config,
        use_cache=False,
        grid=None,
        eos_ids=None,
        pad_id=pad_id,
        answer_index=torch.arange(width, device=device).expand(batch_size, -1),
        streamer=None,
        generator=generator,
    )
    if config.return_dict_in_generate:
        return DiffusionGenerateOutput(sequences=canvas, nfe=nfe, history=history)
    return canvas


# ----------------------------------------------------------------------------------------------------------------------
# The denoising loop
# ----------------------------------------------------------------------------------------------------------------------


def _denoise(
    model,
    canvas: torch.Tensor,
    is_real: torch.Tensor,
    is_generated: torch.Tensor,
    block_ids: torch.Tensor,
    blocks: range | list[int],
    *,
    steps_per_block: int,
    block_length: int,
    config: DiffusionGenerationConfig,
    use_cache: bool,
    grid: int | None,
    eos_ids: torch.Tensor | None,
    pad_id: int,
    answer_index: torch.Tensor,
    streamer,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The one denoising loop over `blocks` (see the module docstring). Returns `(canvas, nfe, history)`.

    `grid` is the block length of the position-aligned grid (block attention): the window of block k is then
    `[k * grid, (k + 1) * grid)`, prompt tail included; otherwise it is the span of the block's active columns.
    `answer_index` `[B, N]` gathers the answer from the canvas (streaming and history).
    """
    mask_token_id = model.config.mask_token_id
    batch_size, width = canvas.shape
    columns = torch.arange(width, device=canvas.device)  # [T]
    attention_mask = is_real.long()  # [B, T]
    sampler = get_sampler(config.sampler)
    temperature = 0.0 if config.is_greedy else (1.0 if config.temperature is None else config.temperature)
    top_k = None if config.is_greedy else config.top_k
    top_p = None if config.is_greedy else config.top_p
    # Under shift, the logits of a block's first position come from the last committed token: they are computed once,
    # by the forward that commits that token, and reused at every step of the block (`head_logits`).
    is_shifted = bool(model.config.shift)
    cache = DynamicCache() if use_cache else None
    pending_logits = None  # the fused commit + first-step forward of the next block
    head_logits = None  # [B, 1, V], logits of the active window's first position (under shift)
    nfe = 0
    history = [] if config.output_history else None
    streamed = 0
    # Columns before `first_pad` are real in every row: forwards ending there pass no padding mask, so a window that
    # may see all its keys runs unmasked (`DiffusionLM.forward`). One host sync for the whole loop.
    first_pad = int(torch.where(is_real, width, columns).amin())

    def forward(start: int, end: int, keep: int = 0) -> torch.Tensor:
        """Logits `[B, end - start, V]` of canvas columns [start, end), over the cache when there is one; with the
        cache and `keep`, only the last `keep` columns' logits (the LM head skips the others)."""
        nonlocal nfe
        nfe += 1
        if cache is None:
            mask = None if width <= first_pad else attention_mask
            return model(input_ids=canvas, attention_mask=mask).logits[:, start:end]
        outputs = model(
            input_ids=canvas[:, start:end],
            attention_mask=None if end <= first_pad else attention_mask[:, :end],
            cache=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        return outputs.logits

    def crop(length: int) -> None:
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)

    finished = torch.zeros(batch_size, dtype=torch.bool, device=canvas.device)  # [B]
    for block in blocks:
        # 1. the active block and its window [lo, hi) of columns
        is_active = is_generated & (block_ids == block)  # [B, T]
        if grid is not None:
            lo, hi = block * grid, min((block + 1) * grid, width)
        else:
            active_columns = torch.nonzero(is_active.any(0)).flatten()
            if active_columns.numel() == 0:
                continue
            lo, hi = int(active_columns[0]), int(active_columns[-1]) + 1
        is_active_window = is_active[:, lo:hi]  # [B, W]
        num_masked = ((canvas[:, lo:hi] == mask_token_id) & is_active_window).sum(-1)  # [B]
        # A partial block gets steps in proportion to its tokens (constant tokens per step).
        block_steps = max(1, math.ceil(steps_per_block * int(num_masked.max()) / block_length))
        schedule = num_tokens_per_step(num_masked, block_steps)  # [B, block_steps]
        if cache is not None and pending_logits is None:
            # Prefill: the prompt and the first block in one forward; the block's keys are dropped again.
            pending_logits = forward(0, hi, keep=hi - lo)  # [B, W, V]; no LM head over the prompt
            head_logits = pending_logits[:, :1].clone()
            crop(lo)

        # 2. denoising steps until the block has no masks
        for step_index in range(block_steps):
            is_masked = (canvas[:, lo:hi] == mask_token_id) & is_active_window  # [B, W]
            if not bool(is_masked.any()):
                break
            if pending_logits is not None:
                logits, pending_logits = pending_logits, None
            elif cache is not None:
                # The window alone over the cache of everything before it: unmasked under block attention.
                logits = forward(lo, hi)  # [B, W, V]
                crop(lo)
                if is_shifted:
                    logits[:, :1] = head_logits  # its own first row reads itself (the left neighbour is cached)
            else:
                logits = forward(lo, hi)  # [B, W, V]
            tokens, commit = samplers.step(
                logits,
                is_masked,
                schedule[:, step_index],
                sampler=sampler,
                threshold=config.threshold,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                mask_token_id=mask_token_id,
            )  # [B, W], [B, W]
            canvas[:, lo:hi] = torch.where(commit, tokens, canvas[:, lo:hi])
            if eos_ids is not None:
                canvas, finished = _finish_at_eos(canvas, is_generated, columns, eos_ids, pad_id, mask_token_id)
            if history is not None:
                history.append(canvas.gather(1, answer_index))
            if streamer is not None:
                streamed = _stream(streamer, canvas.gather(1, answer_index)[0], streamed, eos_ids, mask_token_id)
        pending_logits = None
        if eos_ids is not None and bool(finished.all()):
            break

        # 3. commit the block, fused with the first forward of the next one
        if cache is not None and block < blocks[-1]:
            next_lo, next_hi = lo + grid, min(hi + grid, width)
            pending_logits = forward(lo, next_hi, keep=next_hi - next_lo)  # [B, W', V]
            head_logits = pending_logits[:, :1].clone()
            crop(next_lo)

    if streamer is not None:
        _stream(streamer, canvas.gather(1, answer_index)[0], streamed, eos_ids, mask_token_id, draft=False)
    return canvas, nfe, (torch.stack(history) if history else None)


def _finish_at_eos(
    canvas: torch.Tensor,
    is_generated: torch.Tensor,
    columns: torch.Tensor,
    eos_ids: torch.Tensor,
    pad_id: int,
    mask_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows holding an EOS with every answer position before it committed are finished: pad after that EOS."""
    width = canvas.shape[1]
    is_eos = is_generated & torch.isin(canvas, eos_ids)  # [B, T]
    first_eos = torch.where(is_eos, columns, width).amin(-1, keepdim=True)  # [B, 1]
    is_open_before = is_generated & (canvas == mask_token_id) & (columns < first_eos)  # [B, T]
    finished = (first_eos[:, 0] < width) & ~is_open_before.any(-1)  # [B]
    is_after = is_generated & (columns > first_eos) & finished[:, None]  # [B, T]
    return torch.where(is_after, pad_id, canvas), finished


def _stream(
    streamer, answer: torch.Tensor, streamed: int, eos_ids: torch.Tensor | None, mask_token_id: int, draft: bool = True
) -> int:
    """Send the newly committed prefix of the answer `[N]` (up to the first EOS) to the streamer; draft canvases too."""
    if draft and hasattr(streamer, "put_draft"):
        # transformers' TextDiffusionStreamer convention (DiffusionGemma): the whole draft after every step.
        streamer.put_draft(value=answer[None].cpu())
    is_open = answer == mask_token_id  # [N]
    stop = answer.numel()
    if eos_ids is not None:
        is_eos = torch.isin(answer, eos_ids)
        if bool(is_eos.any()):
            stop = int(is_eos.nonzero()[0]) + 1
    if bool(is_open[:stop].any()):
        stop = int(is_open.nonzero()[0])
    if stop > streamed:
        streamer.put(answer[streamed:stop].cpu())
    return max(stop, streamed)


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


def _check_positions(model, length: int, what: str) -> None:
    limit = getattr(model.causal_lm.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(
            f"{what} = {length} tokens exceeds the model's max_position_embeddings={limit}; shorten the prompt or "
            f"lower max_new_tokens to at most {limit} in total."
        )
