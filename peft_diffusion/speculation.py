"""Self-speculative decoding: the adapter drafts a block, the base verifies it, and the output is the base's.

A LoRA conversion leaves the causal LM intact under its adapter, so one set of weights holds two models: the diffusion
drafter (adapter on, the model's block attention) and the exact autoregressive base (adapter off, plain causal
attention), both run without PEFT's per-layer dispatch (`adapter_views.py`). Each round the drafter fills a block of
`W` mask tokens after the committed text in `steps` denoising steps; the base scores the whole block in one causal
forward; the longest prefix the base agrees with is kept, plus one token of the base's own (Leviathan et al. 2023,
arXiv:2211.17192, Algorithm 1; Chen et al. 2023, arXiv:2302.01318). The output is therefore the base model's: token
for token under greedy decoding (equal to its HF `generate(do_sample=False)`), and in distribution under sampling.
Only the speed depends on how well the adapter was trained. A fully finetuned model has no adapter to switch off: pass
the original causal LM as `verifier=`.

Why our own loop and not transformers' assisted generation. transformers 5.24 runs speculative decoding inside
`generate()` (`generation/utils.py: _assisted_decoding`, candidate generators in `generation/candidate_generator.py`,
including `DFlashTokenCandidateGenerator`, a block-diffusion drafter). It does not serve here:
    - it refuses batches (`_assisted_decoding` raises "assisted generate is only supported for batch_size = 1"), and
      ragged acceptance with left padding is half of what is asked;
    - a candidate generator cannot be passed in: `_get_candidate_generator` picks one from generation-config fields
      and the assistant's class name, so plugging in means overriding a private method of the base model;
    - its drafters are separate model objects: `AssistedCandidateGenerator` drafts autoregressively with the
      assistant's own `generate()`, and the DFlash generator needs a DFlash model (`target_layer_ids`,
      `noise_embeds`, `context_hidden_states`). Here drafter and verifier are one module whose adapter must be
      switched on for the draft and off for the verification, while HF's loop calls the main model's forward itself;
    - its sampling path draws from the global RNG (`torch.rand_like`, `torch.multinomial`), not a `generator`.
So this module runs the same algorithm with the same guarantees (HF's acceptance rule, its logits warpers for
temperature / top-k / top-p and its greedy argmax), batched, with one exact KV cache per model.

Notation (shapes of one round; `B` rows, `W` = `block_length`, `V` = vocabulary kept, `T` = canvas width):

| name        | shape        | meaning                                                                           |
|-------------|--------------|-----------------------------------------------------------------------------------|
| `tokens`    | `[B, T]`     | the canvas: left-padded prompts in columns `[0, P)`, then each row's new tokens   |
| `ends`      | `[B]`        | column after each row's last committed token, `P + generated`                     |
| `slots`     | `[B]`        | draft positions of each row this round: `min(W, max_new_tokens - generated)`     |
| `drafts`    | `[B, W]`     | the drafter's block x_1..x_W (mask token where a row has fewer slots)            |
| `q`         | `[B, W, V]`  | the distribution each draft token was drawn from (sampling only)                  |
| `p`         | `[B, W+1, V]`| the base's next-token distribution before each draft token, and after the last   |
| `accepted`  | `[B]`        | `n`: leading draft tokens the base accepts                                        |

Caches. Both are `transformers.DynamicCache` over the same columns as `tokens` (HF's left-padded layout, so positions,
sliding windows and padding read exactly as in the base's own `generate`), and both stay exact: after every round
each holds what a fresh prefill of the committed text would give, on the columns it keeps.
    - Base cache: every committed token but the last one of the slowest unfinished row (columns `[0, min(ends) - 1)`).
      A verification forwards columns `[cache end, max(ends + slots))`: each row's committed tokens not yet cached,
      its last committed token and its draft (right-padded); it is then cropped back to the new `min(ends) - 1`,
      dropping every rejected draft token. A row that accepted more than the slowest one has its extra tokens fed
      again next round (they are committed, so their keys and values come out the same).
    - Drafter cache: only whole attention blocks that precede the block of each row's last committed token (block
      attention lets a token see the rest of its block, so a partial block's keys change as it fills; the last
      committed token must be in the window, since under the shift it predicts the first draft position). The first
      denoising step of a draft forwards the uncached committed tokens and the mask block; the cache is then cropped
      to the new whole-block boundary, and later steps forward the window over it and crop back to it.

Losslessness. Greedy: a draft token is kept when it equals the base's argmax, and the base's argmax follows, so every
kept token is the base's greedy token. Sampling: with `p` and `q` the warped distributions, draft token x_i is kept
with probability min(1, p(x_i) / q(x_i)); at the first rejection a token is drawn from normalize(max(0, p - q)), and
after W kept tokens from `p` (the bonus). Each emitted token is then distributed as `p` given the text before it,
provided x_i was drawn from `q_i` given the draft tokens before it and nothing after it. A diffusion draft committed
in confidence order would break that (x_i could depend on x_(i+1), and accepting x_i would then bias x_(i+1)), so
sampled drafts commit their positions left to right (`steps` of them; one step draws all positions independently).
Greedy drafts use the configured `sampler` (any order is exact there).

One round (`_Speculator.run`):
    1. Draft: `steps` denoising steps of the drafter on the `W` slots after each row's committed text.
    2. Verify: one causal forward of the base over the uncached committed tokens and the drafts.
    3. Accept: the longest agreeing prefix and the base's next token (greedy), or the speculative-sampling rule;
       truncate at EOS and at `max_new_tokens`, write into the canvas, stream.
    4. Crop the base cache to the slowest unfinished row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.utils import ModelOutput

from . import _compat, samplers
from .adapter_views import AdapterViews, head_rows_first, output_head
from .attention import AttentionLayout, diffusion_attention
from .draft_tree import build_draft_tree, greedy_tree_acceptance
from .generation import (
    DiffusionGenerationConfig,
    _check_left_padding,
    _check_positions,
    _check_prompt_lengths,
    _check_token_ids,
    _resolve_config,
)
from .samplers import get_sampler
from .verifier_checks import check_causal, check_tree_positions, takes_position_ids

__all__ = ["SpeculativeGenerateOutput", "speculative_generate"]

# Generation-config fields that change the base's distribution through logits processors this loop does not apply,
# with their neutral values: a call setting one would not be lossless, so it is refused.
_UNSUPPORTED_FIELDS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "num_beams": 1,
    "num_return_sequences": 1,
    "guidance_scale": None,
}


@dataclass
class SpeculativeGenerateOutput(ModelOutput):
    """Output of `generate(..., speculative=True, return_dict_in_generate=True)`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, prompt_length + new_tokens)`): the input followed by the
            new tokens, HF's layout (`new_tokens` is the longest row's; rows finished at EOS are padded with
            `pad_token_id`).
        nfe (`int`): model forwards in all, `base_forwards + drafter_forwards`.
        base_forwards (`int`): forwards of the base model (one verification each).
        drafter_forwards (`int`): forwards of the drafter (`steps` per draft at most).
        accepted (`torch.LongTensor` of shape `(base_forwards, batch_size)`): draft tokens kept by each
            verification, per row (-1 where the row had already finished). A verification adds `accepted + 1` tokens
            to a row (the base's own next token), fewer at EOS or `max_new_tokens`.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    base_forwards: int | None = None
    drafter_forwards: int | None = None
    accepted: torch.LongTensor | None = None


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    verifier: PreTrainedModel | None = None,
    tree_size: int | None = None,
    **kwargs,
) -> torch.LongTensor | SpeculativeGenerateOutput:
    r"""Generate with the base causal LM's output, drafting blocks with the diffusion adapter (lossless).

    Called by `DiffusionLM.generate(..., speculative=True)`. The outline of a round is in the module docstring.

    Args:
        model (`DiffusionLM`): a diffusion LM with `attention="block"` (call `model.eval()` first). Under LoRA its
            adapter drafts and its base (adapter disabled) verifies.
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): prompts, left-padded, at least one
            real token each.
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*): 1 for real tokens, 0 for
            the left padding.
        generation_config (`GenerationConfig`, *optional*): overrides the model's `generation_config`.
        streamer (`BaseStreamer`, *optional*): receives the prompt, then the tokens of each verification
            (`put`), then `end()`; batch size 1.
        generator (`torch.Generator`, *optional*): all randomness of sampling (drafts, acceptance, resampling).
        verifier (`PreTrainedModel`, *optional*): the causal LM whose output is produced, e.g. the original base of
            a fully finetuned model. Defaults to the adapter's base, with the adapter disabled. Its vocabulary must be
            the drafter's (or the drafter's without an added mask-token row).
        tree_size (`int`, *optional*): verify a draft tree of this many tokens per row instead of the chain draft
            alone: the chain plus the drafter's next most likely paths, all scored by one base forward under tree
            attention (`draft_tree.py`). At least `block_length`; greedy decoding only. The output is unchanged
            (the base's); a round accepts at least what the chain would.
        kwargs: fields of `DiffusionGenerationConfig`, read as follows. `max_new_tokens` (required);
            `block_length` (`W`, the draft length, defaults to the model's `block_size`, a multiple of it);
            `steps` (denoising steps per draft, defaults to 1, a one-shot draft; at most `block_length`; read from
            this call only, since the model's generation config holds plain decoding's per-answer `steps`); `sampler`
            and `threshold` (which draft positions a greedy step commits, as in `generate`); `do_sample`,
            `temperature`, `top_k`, `top_p` (applied to the base's distribution exactly as transformers' `generate`
            applies them; unset ones take the verifier's generation config, then transformers' defaults 1.0, 50,
            1.0); `eos_token_id`, `pad_token_id` (defaults: the verifier's); `return_dict_in_generate`.

    Returns:
        `torch.LongTensor` of shape `(batch_size, prompt_length + new_tokens)` (as HF `generate`: as wide as the
        longest row needs), or a `SpeculativeGenerateOutput` with `return_dict_in_generate=True`.

    Example:
    ```python
    >>> import torch
    >>> from peft import LoraConfig
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft_diffusion import DiffusionConfig, get_diffusion_model
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...                                     num_hidden_layers=2, num_attention_heads=4)).eval()
    >>> reference = base.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=8, do_sample=False)
    >>> model = get_diffusion_model(base, DiffusionConfig(attention="block", block_size=4, mask_token_id=127),
    ...                             peft_config=LoraConfig(r=4, target_modules="all-linear")).eval()
    >>> out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=8, speculative=True,
    ...                      return_dict_in_generate=True)
    >>> torch.equal(out.sequences, reference), out.base_forwards <= 8
    (True, True)
    ```
    """
    # `steps` is per draft here: a `steps` stored in the model's generation config is plain decoding's per-answer
    # budget, so only the call's own value counts.
    steps = kwargs.get("steps", getattr(generation_config, "steps", None))
    config = _resolve_config(model, generation_config, kwargs)
    verifier_model, verifier_context, drafter_context, vocab_size = _resolve_verifier(model, verifier)
    explicit = set(kwargs) | (set(generation_config.to_diff_dict()) if generation_config is not None else set())
    settings = _Settings.resolve(model, config, steps, verifier_model, vocab_size, generator, tree_size, explicit)
    check_causal(verifier_model, verifier_context, vocab_size)
    if settings.tree_size is not None:
        check_tree_positions(verifier_model, verifier_context, vocab_size)
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError("`input_ids` must be a `(batch_size, prompt_length)` LongTensor of prompts.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_left_padding(attention_mask)
    _check_token_ids(model, input_ids[attention_mask.bool()], "`input_ids`")
    prompt_lengths = attention_mask.long().sum(-1)  # [B]
    _check_prompt_lengths(prompt_lengths)
    longest, new = int(prompt_lengths.max()), settings.max_new_tokens
    _check_positions(model, longest + new, f"the prompt ({longest} tokens) + max_new_tokens ({new})")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(
            f"`streamer` supports batch size 1, got batch_size={input_ids.shape[0]}; stream one prompt at a time."
        )

    speculator = _Speculator(
        model, verifier_model, verifier_context, drafter_context, settings, input_ids, attention_mask, streamer
    )
    sequences = speculator.run()
    if not config.return_dict_in_generate:
        return sequences
    accepted = (
        torch.stack(speculator.accepted)
        if speculator.accepted
        else torch.empty(0, input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    )
    return SpeculativeGenerateOutput(
        sequences=sequences,
        nfe=speculator.base_forwards + speculator.drafter_forwards,
        base_forwards=speculator.base_forwards,
        drafter_forwards=speculator.drafter_forwards,
        accepted=accepted,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Settings and checks
# ----------------------------------------------------------------------------------------------------------------------


def _head_rows(causal_lm) -> int:
    """The logit columns a causal LM scores: its LM head's rows (a decoder may score another vocabulary than its
    config's `vocab_size`, e.g. Marian's `decoder_vocab_size`), else the config's `vocab_size`."""
    weight = getattr(output_head(causal_lm), "weight", None)
    return int(weight.shape[0]) if weight is not None else causal_lm.config.get_text_config().vocab_size


def _resolve_verifier(model, verifier) -> tuple[PreTrainedModel, Callable, Callable, int]:
    """`(verifier, verifier context, drafter context, vocab_size)`: the causal LM to call, the contexts the
    verification and the draft run in (`AdapterViews`: the base alone, lean LoRA layers) and the number of
    vocabulary columns both models score (the base's own, without a mask-token row added for the conversion)."""
    mask_token_id = model.config.mask_token_id
    drafter_vocab = _head_rows(model.causal_lm)
    if model.config.attention != "block":
        raise ValueError(
            f"`speculative=True` needs a model trained with attention='block' (the drafter decodes a block over an "
            f"exact KV cache of the committed text), got attention={model.config.attention!r}; use plain "
            "`generate` for this model."
        )
    if verifier is None:
        if not isinstance(model.model, PeftModel):
            raise ValueError(
                "`speculative=True` verifies with the base model under the adapter, and this model has no adapter "
                "(full finetuning); pass the original causal LM as `verifier=`."
            )
        implementation = _compat.attn_implementation(model.causal_lm.config) or ""
        if implementation.startswith("flash_attention"):
            raise ValueError(
                f"`speculative=True` verifies with the base's causal attention, and under "
                f"attn_implementation={implementation!r} the converted model's attention layers are set non-causal; "
                "load the model with attn_implementation='sdpa'."
            )
        fingerprint = model.config.base_fingerprint or {}
        original = fingerprint.get("vocab_size")
        # A mask token added for the conversion is a row the original base never had: it is not scored.
        vocab_size = original if original is not None and mask_token_id >= original else drafter_vocab
        views = AdapterViews(model.model, vocab_size)
        return model.causal_lm, views.base, views.adapter, vocab_size
    if (
        not isinstance(verifier, PreTrainedModel)
        or type(verifier).__name__ == "DiffusionLM"
        or isinstance(verifier, PeftModel)
    ):
        raise ValueError(
            f"`verifier` must be a transformers causal LM (the original base model), got {type(verifier).__name__}."
        )
    vocab_size = _head_rows(verifier)
    if vocab_size != drafter_vocab and not mask_token_id == vocab_size == drafter_vocab - 1:
        raise ValueError(
            f"`verifier` must share the drafter's vocabulary (or lack only the mask-token row added for the "
            f"conversion): it has {vocab_size} tokens and the drafter {drafter_vocab} (mask token id "
            f"{mask_token_id}); pass the causal LM the model was converted from."
        )
    # A LoRA drafter verified by a separate model still drafts through lean LoRA layers.
    drafter = AdapterViews(model.model).adapter if isinstance(model.model, PeftModel) else contextlib.nullcontext
    return verifier, contextlib.nullcontext, drafter, vocab_size


@dataclass(frozen=True)
class _Settings:
    """What one call decodes with, resolved and checked once."""

    max_new_tokens: int
    block_length: int
    steps: int
    greedy: bool
    sampler: object
    threshold: float | None
    warpers: LogitsProcessorList
    eos_ids: torch.Tensor | None
    pad_id: int
    vocab_size: int
    mask_token_id: int
    block_size: int
    generator: torch.Generator | None
    tree_size: int | None = None

    @classmethod
    def resolve(
        cls,
        model,
        config: DiffusionGenerationConfig,
        steps: int | None,
        verifier,
        vocab_size: int,
        generator,
        tree_size: int | None = None,
        explicit: set[str] = frozenset(),
    ) -> _Settings:
        if config.max_new_tokens is None:
            raise ValueError("`max_new_tokens` is required, got None; pass e.g. max_new_tokens=128.")
        block_size = model.config.block_size
        block_length = config.block_length or block_size
        if block_length % block_size:
            raise ValueError(
                f"`block_length` must be a multiple of the model's block_size (its attention blocks), got "
                f"block_length={block_length} and block_size={block_size}; use block_length={block_size}."
            )
        steps = steps or 1
        if not isinstance(steps, int) or steps < 1 or steps > block_length:
            raise ValueError(
                f"`steps` (denoising steps per draft) must be an integer in [1, block_length={block_length}], got "
                f"steps={steps}; use steps=1 for a one-shot draft."
            )
        if config.output_history:
            raise ValueError("`output_history` is not available with `speculative=True`; drop it.")
        base = verifier.generation_config
        for name, neutral in _UNSUPPORTED_FIELDS.items():
            # The call's value (`explicit`: passed, even as the neutral value or None) else the base's own default,
            # which HF `generate` on the base applies too (e.g. BART-family decoders force EOS at max_length).
            value = getattr(config, name, None)
            inherited = name not in explicit and value is None and getattr(base, name, None) is not None
            if inherited:
                value = getattr(base, name)
            if value is not None and value != neutral:
                origin = "the verifier's generation config sets " if inherited else ""
                raise ValueError(
                    f"{origin}`{name}`={value!r}, which is not supported with `speculative=True` (only temperature, "
                    f"top_k and top_p shape the sampled distribution, so the output stays the base's); pass "
                    f"{name}={neutral!r} to `generate` to decode without it."
                )
        greedy = config.is_greedy
        if not greedy and config.threshold is not None:
            raise ValueError(
                f"`threshold` orders greedy drafts; sampled drafts commit left to right, got threshold="
                f"{config.threshold} with do_sample=True. Drop `threshold`."
            )
        if tree_size is not None:
            if isinstance(tree_size, bool) or not isinstance(tree_size, int) or tree_size < block_length:
                raise ValueError(
                    f"`tree_size` counts the draft tokens verified per row and round, the chain's block_length "
                    f"included: it must be an integer >= block_length={block_length}, got tree_size={tree_size!r}; "
                    f"use e.g. tree_size={4 * block_length}, or None for the chain alone."
                )
            if not greedy:
                raise ValueError(
                    f"`tree_size` verifies draft trees under greedy decoding only (speculative sampling here keeps the "
                    f"single-draft acceptance rule), got tree_size={tree_size} with do_sample=True; drop `tree_size` "
                    "or set do_sample=False."
                )
        eos = config.eos_token_id if config.eos_token_id is not None else base.eos_token_id
        eos_list = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        device = verifier.device
        eos_ids = torch.tensor(eos_list, dtype=torch.long, device=device) if eos_list else None
        pad = config.pad_token_id if config.pad_token_id is not None else base.pad_token_id
        if pad is None:
            pad = eos_list[0] if eos_list else 0
        return cls(
            max_new_tokens=config.max_new_tokens,
            block_length=block_length,
            steps=steps,
            greedy=greedy,
            sampler=get_sampler(config.sampler),
            threshold=config.threshold,
            warpers=LogitsProcessorList() if greedy else _warpers(config, base),
            eos_ids=eos_ids,
            pad_id=pad,
            vocab_size=vocab_size,
            mask_token_id=model.config.mask_token_id,
            block_size=block_size,
            generator=generator,
            tree_size=tree_size,
        )


def _warpers(config: GenerationConfig, base: GenerationConfig) -> LogitsProcessorList:
    """transformers' logits warpers for temperature, top-k and top-p, built as `generate` builds them (same classes,
    same order, same conditions). Unset values come from the verifier's generation config, then transformers'
    defaults, so the distribution is the one `verifier.generate(do_sample=True, ...)` samples from."""
    defaults = _compat.generation_defaults()

    def value(name):
        for source in (config, base):
            found = getattr(source, name, None)
            if found is not None:
                return found
        return defaults[name]

    temperature, top_k, top_p = value("temperature"), value("top_k"), value("top_p")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


# ----------------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Speculator:
    """The state of one call (canvas, both caches, counters) and the rounds that advance it (module docstring)."""

    model: torch.nn.Module
    verifier: torch.nn.Module
    verifier_context: Callable
    drafter_context: Callable
    settings: _Settings
    input_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    streamer: object | None = None
    base_forwards: int = 0
    drafter_forwards: int = 0
    accepted: list[torch.Tensor] = field(default_factory=list)  # [B] per verification
    base_cache: DynamicCache = field(default_factory=DynamicCache)
    draft_cache: DynamicCache = field(default_factory=DynamicCache)
    base_length: int = 0  # columns the base cache holds
    draft_length: int = 0  # columns the drafter cache holds

    def __post_init__(self):
        batch_size, prompt_width = self.input_ids.shape
        device = self.input_ids.device
        settings = self.settings
        self.prompt_width = prompt_width
        width = prompt_width + settings.max_new_tokens + settings.block_length + 1  # room for a finished row's slots
        self.tokens = torch.full((batch_size, width), settings.pad_id, dtype=torch.long, device=device)  # [B, T]
        self.tokens[:, :prompt_width] = self.input_ids
        self.is_real = torch.ones(batch_size, width, dtype=torch.bool, device=device)  # [B, T]
        self.is_real[:, :prompt_width] = self.prompt_mask.bool()
        self.columns = torch.arange(width, device=device)  # [T]
        self.padding = prompt_width - self.prompt_mask.long().sum(-1)  # [B], left padding of each row
        self.generated = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)  # [B]
        self.offsets = torch.arange(settings.block_length + 1, device=device)  # [W + 1]
        self.takes_position_ids = takes_position_ids(self.verifier)  # a signature read, once per call
        if self.streamer is not None:
            self.streamer.put(self.input_ids.cpu())

    def run(self) -> torch.Tensor:
        """Rounds until every row is finished; returns the sequences in HF's layout."""
        while True:
            ends = self.prompt_width + self.generated  # [B]
            slots = torch.where(
                self.finished, 0, (self.settings.max_new_tokens - self.generated).clamp(max=self.settings.block_length)
            )  # [B]
            # One host sync per round: are rows left, and the window's edges (the slowest unfinished row, the end).
            open_ends = torch.where(self.finished, ends.max(), ends)  # [B]
            open_limits = torch.where(self.finished, 0, ends + slots)  # [B]
            done, lowest, end = torch.stack([self.finished.all().long(), open_ends.min(), open_limits.max()]).tolist()
            if done:
                break
            drafts, q = self.draft(ends, slots, lowest, end)  # 1.
            if self.settings.tree_size is None:
                logits = self.verify(ends, slots, drafts, lowest, end)  # 2.
                self.accept(ends, slots, drafts, q, logits)  # 3.
            else:
                self.verify_tree(ends, slots, drafts, lowest)  # 2. and 3.
            self.crop_base()  # 4.
        if self.streamer is not None:
            self.streamer.end()
        new_tokens = int(self.generated.max())
        return torch.cat([self.input_ids, self.tokens[:, self.prompt_width : self.prompt_width + new_tokens]], dim=1)

    def attention_mask(self, ends: torch.Tensor, slots: torch.Tensor, end: int) -> torch.Tensor:
        """`[B, end]`: real columns up to each row's last draft slot (finished rows: everything after the prompt
        padding, so that no query of theirs is left without keys)."""
        is_open = (self.columns[:end] < (ends + slots)[:, None]) | self.finished[:, None]  # [B, end]
        return (self.is_real[:, :end] & is_open).long()

    def canvas(self, drafts: torch.Tensor, ends: torch.Tensor, slots: torch.Tensor, end: int) -> torch.Tensor:
        """`[B, end]`: the committed tokens with each row's draft in its slots."""
        canvas = self.tokens[:, :end].clone()  # [B, end]
        slot_columns = (ends[:, None] + self.offsets[:-1]).clamp(max=end - 1)  # [B, W]
        is_slot = self.offsets[:-1] < slots[:, None]  # [B, W]
        return canvas.scatter(1, slot_columns, torch.where(is_slot, drafts, canvas.gather(1, slot_columns)))

    # 1. Draft -----------------------------------------------------------------------------------------------------

    def draft(
        self, ends: torch.Tensor, slots: torch.Tensor, lowest: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`steps` denoising steps of the drafter on each row's slots; returns `drafts` `[B, W]` and, when sampling,
        `q` `[B, W, V]` (the distribution each draft token was drawn from)."""
        settings = self.settings
        width, vocab = settings.block_length, settings.vocab_size
        batch_size = ends.shape[0]
        drafts = torch.full((batch_size, width), settings.mask_token_id, dtype=torch.long, device=ends.device)
        is_slot = self.offsets[:-1] < slots[:, None]  # [B, W]
        q = None if settings.greedy else torch.zeros(batch_size, width, vocab, device=ends.device)  # [B, W, V]
        if settings.tree_size is not None:  # each slot's best candidates, from the step that commits it
            num_candidates = min(settings.tree_size - width + 1, vocab)
            self.candidate_ids = torch.zeros(batch_size, width, num_candidates, dtype=torch.long, device=ends.device)
            self.candidate_logp = torch.zeros(batch_size, width, num_candidates, device=ends.device)
            self.draft_logp = torch.zeros(batch_size, width, device=ends.device)
        num_tokens = samplers.num_tokens_per_step(slots, settings.steps)  # [B, S]
        attention_mask = self.attention_mask(ends, slots, end)  # [B, end]
        # Whole blocks before the block of each unfinished row's last committed token: what the drafter cache keeps.
        lengths = ends - self.padding  # [B], committed tokens (positions)
        block_starts = self.padding + (lengths - 1) // settings.block_size * settings.block_size  # [B]
        keep_upto = int(torch.where(self.finished, block_starts.max(), block_starts).min())
        for step_index in range(settings.steps):
            is_masked = (drafts == settings.mask_token_id) & is_slot  # [B, W]
            if step_index > 0 and settings.threshold is not None and not bool(is_masked.any()):
                break
            start = self.draft_length
            with self.drafter_context():
                outputs = self.model(
                    input_ids=self.canvas(drafts, ends, slots, end)[:, start:],
                    attention_mask=attention_mask,
                    cache=self.draft_cache,
                    use_cache=True,
                    logits_to_keep=end - lowest,
                )
            self.drafter_forwards += 1
            self.crop(self.draft_cache, keep_upto)
            self.draft_length = keep_upto
            # Logits of the slots: kept rows start at column `lowest`; the slots of row b at ends_b + j.
            index = (ends[:, None] - lowest + self.offsets[:-1]).clamp(0, end - lowest - 1)  # [B, W]
            logits = outputs.logits.gather(1, index[..., None].expand(-1, -1, outputs.logits.shape[-1]))  # [B, W, V']
            logits = logits[..., :vocab].float()  # [B, W, V]
            if settings.greedy:
                tokens, commit = samplers.step(
                    logits,
                    is_masked,
                    num_tokens[:, step_index],
                    sampler=settings.sampler,
                    threshold=settings.threshold,
                    mask_token_id=settings.mask_token_id if settings.mask_token_id < vocab else None,
                )  # [B, W] each
                if settings.tree_size is not None:
                    logp = logits.log_softmax(-1)  # [B, W, V]
                    best = logp.topk(self.candidate_ids.shape[-1], dim=-1)
                    self.candidate_ids = torch.where(commit[..., None], best.indices, self.candidate_ids)
                    self.candidate_logp = torch.where(commit[..., None], best.values, self.candidate_logp)
                    chosen = logp.gather(-1, tokens.clamp(0, vocab - 1)[..., None])[..., 0]  # [B, W]
                    self.draft_logp = torch.where(commit, chosen, self.draft_logp)
            else:
                probs = self.distribution(logits)  # [B, W, V]
                tokens = torch.multinomial(probs.view(-1, vocab), 1, generator=settings.generator).view_as(drafts)
                # Left to right: the leftmost masked slots commit first, so x_i depends only on x_<i (see above).
                leftmost = -self.offsets[:-1].float().expand(batch_size, -1)  # [B, W]
                commit = samplers.select_topk(leftmost, is_masked, num_tokens[:, step_index])  # [B, W]
                q = torch.where(commit[..., None], probs, q)  # [B, W, V]
            drafts = torch.where(commit, tokens, drafts)
        return drafts, q

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """`softmax(warpers(logits))` over the last dimension, for logits `[B, L, V]` (float32)."""
        shape = logits.shape
        flat = logits.reshape(-1, shape[-1])  # [B*L, V]
        flat = self.settings.warpers(flat.new_empty(flat.shape[0], 0, dtype=torch.long), flat)
        return flat.softmax(-1).view(shape)

    def position_kwargs(self, position_ids: torch.Tensor) -> dict:
        """`position_ids` for the base where its forward takes them, as HF `generate` does (Whisper's decoder does
        not: it numbers tokens by their column, as in `generate`)."""
        return {"position_ids": position_ids} if self.takes_position_ids else {}

    # 2. Verify ----------------------------------------------------------------------------------------------------

    def verify(
        self, ends: torch.Tensor, slots: torch.Tensor, drafts: torch.Tensor, lowest: int, end: int
    ) -> torch.Tensor:
        """One causal forward of the base over columns `[base cache end, end)`; returns the base's logits `[B, W+1,
        V]` at each row's last committed token and its draft tokens."""
        attention_mask = self.attention_mask(ends, slots, end)  # [B, end]
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # [B, end], as HF
        start = self.base_length
        rows = (end - lowest + 1) * len(ends)
        with self.verifier_context(), head_rows_first(self.verifier, rows):
            outputs = self.verifier(
                input_ids=self.canvas(drafts, ends, slots, end)[:, start:],
                attention_mask=attention_mask,
                **self.position_kwargs(position_ids[:, start:]),
                use_cache=True,
                logits_to_keep=end - lowest + 1,
                **{_compat.CACHE_KWARG: self.base_cache},
            )
        self.base_forwards += 1
        kept = outputs.logits[:, -(end - lowest + 1) :]  # some decoders (TrOCR, Whisper) ignore `logits_to_keep`
        # Kept rows start at column lowest - 1; row b's predictions read columns ends_b - 1 .. ends_b + W - 1.
        index = (ends[:, None] - lowest + self.offsets).clamp(0, end - lowest)  # [B, W + 1]
        logits = kept.gather(1, index[..., None].expand(-1, -1, kept.shape[-1]))
        return logits[..., : self.settings.vocab_size].float()  # [B, W + 1, V]

    def verify_tree(self, ends: torch.Tensor, slots: torch.Tensor, drafts: torch.Tensor, lowest: int) -> None:
        """Steps 2 and 3 with a draft tree (`tree_size`, greedy): one base forward over the uncached committed
        tokens and every row's tree under the `"tree"` attention pattern, then the base's greedy path through it.

        The nodes' keys and values are dropped afterwards (the cache keeps the committed columns every unfinished row
        had before the round, `[0, lowest)`); the accepted tokens are fed again with the next round's tree, where
        extra rows cost little (a forward over a few dozen tokens costs about what one over a few does on CPU).
        """
        settings = self.settings
        tree = build_draft_tree(
            drafts,
            slots,
            self.candidate_ids,
            self.candidate_logp,
            self.draft_logp,
            settings.tree_size,
            settings.pad_id,
            excluded_id=settings.mask_token_id,
        )
        size = settings.tree_size
        context_end = int(torch.where(self.finished, lowest, ends).max())  # E: the longest unfinished row's text
        columns = self.columns[:context_end]  # [E]
        is_context = self.is_real[:, :context_end] & ((columns < ends[:, None]) | self.finished[:, None])  # [B, E]
        context_positions = (is_context.long().cumsum(-1) - 1).masked_fill(~is_context, 1)  # [B, E], as HF
        node_positions = (ends - self.padding)[:, None] + tree.depths  # [B, N]
        positions = torch.cat([context_positions, node_positions], dim=1)  # [B, E + N]
        attention_mask = torch.cat([is_context, torch.ones_like(tree.valid)], dim=1).long()  # [B, E + N]
        layout = AttentionLayout("tree", positions, torch.zeros_like(positions), ancestors=tree.ancestors)
        start = self.base_length
        rows = (context_end + size - (lowest - 1)) * len(ends)
        with self.verifier_context(), diffusion_attention(layout), head_rows_first(self.verifier, rows):
            outputs = self.verifier(
                input_ids=torch.cat([self.tokens[:, start:context_end], tree.tokens], dim=1),
                attention_mask=attention_mask,
                **self.position_kwargs(positions[:, start:]),
                use_cache=True,
                logits_to_keep=context_end + size - (lowest - 1),
                **{_compat.CACHE_KWARG: self.base_cache},
            )
        self.base_forwards += 1
        self.crop(self.base_cache, lowest)
        self.base_length = lowest
        # Kept rows start at column lowest - 1: each row's last committed token, then the nodes.
        logits = outputs.logits[
            :, -(context_end + size - (lowest - 1)) :, : settings.vocab_size
        ]  # [B, E+N-lowest+1, V]
        root_index = (ends - lowest).clamp(0, context_end - lowest)  # [B]
        root_target = logits.gather(1, root_index[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0].argmax(-1)
        node_target = logits[:, context_end - lowest + 1 :].argmax(-1)  # [B, N]
        path, accepted, next_token = greedy_tree_acceptance(
            tree, root_target, node_target, settings.block_length, settings.pad_id
        )
        self.commit(ends, path, accepted, next_token)

    # 3. Accept ----------------------------------------------------------------------------------------------------

    def accept(
        self,
        ends: torch.Tensor,
        slots: torch.Tensor,
        drafts: torch.Tensor,
        q: torch.Tensor | None,
        logits: torch.Tensor,
    ) -> None:
        """Keep the longest accepted prefix of each draft and one token of the base's; write, finish, stream."""
        settings = self.settings
        batch_size, width = drafts.shape
        is_slot = self.offsets[:-1] < slots[:, None]  # [B, W]
        if settings.greedy:
            target = logits.argmax(-1)  # [B, W + 1], HF's greedy choice
            is_kept = (drafts == target[:, :-1]) & is_slot  # [B, W]
            accepted = is_kept.long().cumprod(-1).sum(-1)  # [B]
            next_token = target.gather(1, accepted[:, None])  # [B, 1]
        else:
            # Speculative sampling (arXiv:2211.17192, Algorithm 1): keep x_i with probability min(1, p(x_i) / q(x_i)).
            p = self.distribution(logits)  # [B, W + 1, V]
            p_draft = p[:, :-1].gather(-1, drafts.clamp(max=settings.vocab_size - 1)[..., None])[..., 0]  # [B, W]
            q_draft = q.gather(-1, drafts.clamp(max=settings.vocab_size - 1)[..., None])[..., 0]  # [B, W]
            uniform = torch.rand(batch_size, width, generator=settings.generator, device=drafts.device)  # [B, W]
            is_kept = (uniform * q_draft < p_draft) & is_slot  # [B, W]
            accepted = is_kept.long().cumprod(-1).sum(-1)  # [B]
            # At the first rejection: normalize(max(0, p - q)); after a fully kept draft: p (the bonus token).
            p_next = p.gather(1, accepted[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]  # [B, V]
            q_padded = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # [B, W + 1, V]
            q_next = q_padded.gather(1, accepted[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]  # [B, V]
            residual = (p_next - q_next).clamp(min=0)  # [B, V]
            mass = residual.sum(-1, keepdim=True)  # [B, 1]
            is_rejected = (accepted < slots)[:, None] & (mass > torch.finfo(mass.dtype).tiny)  # [B, 1]
            next_distribution = torch.where(
                is_rejected, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), p_next
            )
            next_token = torch.multinomial(next_distribution, 1, generator=settings.generator)  # [B, 1]
        self.commit(ends, drafts, accepted, next_token)

    def commit(self, ends: torch.Tensor, drafts: torch.Tensor, accepted: torch.Tensor, next_token: torch.Tensor):
        """Write each row's `accepted` leading draft tokens and the base's `next_token` (`[B, 1]`), cut at
        `max_new_tokens` and after the first EOS; finish rows, count, stream."""
        settings = self.settings
        width = drafts.shape[1]
        # The new tokens: the kept draft, then the base's token; cut at max_new_tokens and after the first EOS.
        drafts_padded = torch.cat([drafts, torch.full_like(drafts[:, :1], settings.pad_id)], dim=1)  # [B, W + 1]
        new = torch.where(self.offsets < accepted[:, None], drafts_padded, next_token)  # [B, W + 1]
        count = torch.minimum(accepted + 1, settings.max_new_tokens - self.generated)  # [B]
        count = torch.where(self.finished, 0, count)  # [B]
        is_new = self.offsets < count[:, None]  # [B, W + 1]
        is_finished = self.finished | (self.generated + count >= settings.max_new_tokens)  # [B]
        if settings.eos_ids is not None:
            is_eos = torch.isin(new, settings.eos_ids) & is_new  # [B, W + 1]
            first_eos = torch.where(is_eos, self.offsets, width + 1).amin(-1)  # [B]
            count = torch.minimum(count, first_eos + 1)  # [B]
            is_new = self.offsets < count[:, None]  # [B, W + 1]
            is_finished = is_finished | (first_eos <= width)
        columns = ends[:, None] + self.offsets  # [B, W + 1]
        self.tokens.scatter_(1, columns, torch.where(is_new, new, self.tokens.gather(1, columns)))
        self.accepted.append(torch.where(self.finished, -1, torch.minimum(accepted, count)))
        if self.streamer is not None and int(count[0]) > 0:
            self.streamer.put(new[0, : int(count[0])].cpu())
        self.generated = self.generated + count
        self.finished = is_finished

    # 4. Crop ------------------------------------------------------------------------------------------------------

    def crop_base(self) -> None:
        """Keep in the base cache every committed token but the last one of the slowest unfinished row."""
        ends = self.prompt_width + self.generated  # [B]
        if bool(self.finished.all()):
            return
        # (After a tree verification the cache may already be shorter: it kept only the columns before the round.)
        lowest = int(torch.where(self.finished, ends.max(), ends).min())
        self.base_length = min(lowest - 1, self.base_cache.get_seq_length())
        self.crop(self.base_cache, self.base_length)

    @staticmethod
    def crop(cache: DynamicCache, length: int) -> None:
        """Keep the first `length` columns of `cache`."""
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)
