"""Decoding: `DiffusionGenerationConfig`, a per-row `DecodingPlan` and the one denoising loop that executes it.

Notation (shapes of the decoding state; `samplers.py` holds the per-step math):

| name           | shape          | meaning                                                                          |
|----------------|----------------|----------------------------------------------------------------------------------|
| `B`, `T`, `N`  |                | batch size, canvas width (`max(prompt_lengths) + N`), `max_new_tokens`           |
| `L`, `K`, `S`  |                | `block_length`; decoding blocks of the plan; most steps any row plans in a block |
| `canvas`       | `[B, T]`       | the sequence being denoised: prompt, committed tokens, mask tokens, padding      |
| `is_real`      | `[B, T]`       | not padding: the attention mask of the canvas                                    |
| `is_generated` | `[B, T]`       | positions the loop fills (the answer, or the gaps of `infill`)                  |
| `block_index`  | `[B, T]`       | decoding block of each generated position (-1 elsewhere)                         |
| `num_masked`   | `[B, K]`       | `m`: masked positions of each row in each block, before decoding                 |
| `num_steps`    | `[B, K]`       | `s`: denoising steps each row plans for each block                               |
| `num_tokens`   | `[B, K, S]`    | tokens each row commits at each step of each block                               |
| `is_masked`    | `[B, W]`       | positions of the active window still holding the mask token                      |

Conventions:
    - Layout. Rows are re-laid from the caller's left padding so that every row's first real token sits in column 0
      (column == position); the canvas is right-padded. The output is HF's: the caller's `input_ids` (left padding
      kept) followed by the `N` new tokens of each row.
    - Block grid. Under `attention="block"` the decoding blocks are the training grid: `position // block_length`,
      aligned at position 0 over prompt and answer alike (`block_length` a multiple of `block_size`). A row's first
      block may be partial (the prompt's tail shares it) and so may its last. Otherwise (bidirectional, annealed)
      blocks are LLaDA's: aligned at the start of each row's answer, the last one partial when `L` does not divide
      `N`.
    - Plan. Everything about *how much* is decided once per call, per row, before the first forward (`DecodingPlan`,
      as diffusers' `set_timesteps` precedes `step`): the blocks, each block's window of columns, and the tokens each
      row commits at each step of each block. The loop only executes it.
    - Steps. `steps` (default `N`; for `infill` each row's number of gaps) is a budget per row: whatever else is in
      the batch, a row spends at most `steps` denoising steps. A row with masked counts `m_1..m_J` in its `J` blocks
      (`M` in all) gives every block one step and shares the other `E = min(steps, M) - J` over them by cumulative
      rounding down in proportion to their masked positions beyond the first,
      `s_j = 1 + floor(E C_j / (M - J)) - floor(E C_(j-1) / (M - J))`, `C_j = sum_(i <= j) (m_i - 1)`. So the row's
      steps sum to exactly `min(steps, M)`: one token per step when `steps >= M`, LLaDA's `steps / J` per block when
      its blocks are full and `J` divides `steps`. `steps` must be at least `J` for every row. Inside a block,
      `samplers.num_tokens_per_step` splits the row's `m_j` evenly over its `s_j` steps (sizes differ by at most one).
    - Batch independence. The loop runs block k for `max_b s[b, k]` steps; a row that planned fewer commits 0 tokens
      in the remaining ones. A row's greedy output therefore equals its output decoded alone.
    - Threshold. With a `threshold` (Fast-dLLM) the planned number of a step is a minimum: the step also commits
      every masked position whose score reaches the threshold (and at least one while the row has masks), so a row
      can finish a block early; the block ends when no row has masks left in it.
    - NFE. At most `plan.num_forwards = sum_k max_b s[b, k]` forwards, cached or not: the prefill and the fused
      commits below are steps themselves, and blocks with no generated position are not visited. That is at most
      `steps` for one prompt and for rows that share their block layout (bidirectional / annealed, or equal prompt
      lengths modulo `L`); under block attention, ragged prompts split their answers differently and a block runs
      as long as its longest-planned row, so the batch may need more forwards than `steps`, each row never more steps.
    - Exact KV cache (block attention, BD3-LM / Fast-dLLM v2 style). The cache holds only committed tokens of
      finished blocks. A step of block k forwards its window over the cache and crops the cache back. The forward
      that commits block k is fused with the first step of the next block (one pass instead of two; the prompt is
      prefilled together with the first block). A step's window is exactly the block over a cache of everything
      before it, so under block attention (window = one attention block, no padding) it runs with no mask at all
      (`AttentionLayout.unmasked`: sdpa/flash/flex fast kernels). Under `shift`, the first position of a block is
      predicted from the hidden state of the last committed token: those logits come out of the forward that
      commits it (prefill or fused commit) and are reused at every step of the block. Cached decoding equals
      uncached decoding.
    - Stop. A row is finished once it holds an EOS with every answer position before it committed; everything after
      that EOS becomes `pad_token_id`. The loop ends when every row is finished or every block is decoded.
    - Host syncs. Planning: a few per call (the step budget check, the plan's step counts and windows, the schedule's
      width). The loop: one per step (are masks left in the block?) and one per block (are all rows finished?); the
      streamer adds one per step. No per-row Python loops.

One denoising loop (`_Denoiser.run`):
    1. For each block k of the plan (left to right): the active positions are `block_index == k` in its window.
    2. Repeat until the block has no masks (at most `max_b s[b, k]` times): forward (cached window or whole canvas),
       `samplers.step` proposes tokens and commits at least each row's planned number, finish rows at EOS, stream.
    3. Cached: the commit of block k is fused with the first forward of the next block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput

from . import samplers
from .samplers import SAMPLERS, Sampler, get_sampler

__all__ = [
    "DecodingPlan",
    "DiffusionGenerateOutput",
    "DiffusionGenerationConfig",
    "generate",
    "infill",
    "split_steps",
]

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
            Denoising steps per row for its whole answer (LLaDA), never exceeded: every block of the row's answer gets
            one and the rest are shared in proportion to its masked positions, so a row takes exactly
            `min(steps, its masked positions)` steps (rule in the module docstring, "Steps"), whatever else is in the
            batch. Defaults to `max_new_tokens` (one token per step; for `infill`, each row's number of gaps). Must be
            at least the number of blocks an answer spans (under block attention a partial first block counts).
        block_length (`int`, *optional*):
            Tokens per semi-autoregressive block. Defaults to the model's `block_size` under block attention (then it
            must be a multiple of it), else to the whole answer.
        sampler (`str` or `Sampler`, defaults to `"confidence"`):
            Which masked positions a step commits first: a key of `samplers.SAMPLERS` (`confidence`, `random`,
            `margin`, `entropy`) or any object with a `confidence(probs, tokens, *, generator)` method.
        threshold (`float`, *optional*):
            Fast-dLLM parallel decoding, in `(0, 1]`: a step commits every masked position whose score reaches it,
            and at least the number the plan gives the step (which is then a minimum), so confident blocks end in
            fewer steps.
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
# The decoding plan
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DecodingPlan:
    r"""What one call decodes, per row, worked out before the first forward; the loop only executes it.

    As diffusers splits a scheduler's `set_timesteps` from its `step`: `for_generate` / `for_infill` decide the
    blocks, each block's window of canvas columns, and how many tokens each row commits at each step of each block
    (the rule is in the module docstring, "Steps"); `generate` / `infill` then run the loop over it.

    Args:
        is_real (`torch.BoolTensor` of shape `(batch_size, width)`): columns holding a token (the attention mask).
        block_index (`torch.LongTensor` of shape `(batch_size, width)`): decoding block of each generated position,
            -1 elsewhere.
        num_masked (`torch.LongTensor` of shape `(batch_size, num_blocks)`): masked positions per row and block.
        num_steps (`torch.LongTensor` of shape `(batch_size, num_blocks)`): steps each row plans for each block;
            every row's sum is at most `steps`.
        num_tokens (`torch.LongTensor` of shape `(batch_size, num_blocks, max_steps)`): tokens each row commits at
            each step of each block (a minimum with a `threshold`); summed over steps it equals `num_masked`.
        blocks (`tuple[int]`): the blocks the loop visits, left to right (those holding a generated position).
        windows (`tuple[tuple[int, int]]`): per block, the columns `[lo, hi)` its forwards read (under block
            attention with `aligned`, the whole attention block, prompt tail included).
        block_steps (`tuple[int]`): per block, the steps the loop runs at most, `num_steps.amax(0)`.
        unpadded_width (`int`): the columns before it are real in every row (forwards ending there need no mask).

    Example:
    ```python
    >>> import torch
    >>> from peft_diffusion.generation import DecodingPlan
    >>> plan = DecodingPlan.for_generate(torch.tensor([5, 1]), max_new_tokens=16, block_length=8, steps=8,
    ...                                  aligned=True)
    >>> plan.num_masked.tolist(), plan.num_steps.tolist(), plan.num_forwards
    ([[3, 8, 5], [7, 8, 1]], [[1, 4, 3], [3, 4, 1]], 10)
    ```
    """

    is_real: torch.Tensor
    block_index: torch.Tensor
    num_masked: torch.Tensor
    num_steps: torch.Tensor
    num_tokens: torch.Tensor
    blocks: tuple[int, ...]
    windows: tuple[tuple[int, int], ...]
    block_steps: tuple[int, ...]
    unpadded_width: int

    @property
    def is_generated(self) -> torch.Tensor:
        """`[B, T]` bool: the positions the loop fills."""
        return self.block_index >= 0

    @property
    def num_forwards(self) -> int:
        """The most model forwards the loop can take (cached or not): `sum_k max_b num_steps[b, k]`."""
        return sum(self.block_steps[block] for block in self.blocks)

    @classmethod
    def for_generate(
        cls, prompt_lengths: torch.Tensor, *, max_new_tokens: int, block_length: int, steps: int, aligned: bool
    ) -> DecodingPlan:
        """The plan of `generate`: each row's prompt from column 0, then its `max_new_tokens` answer positions.

        Args:
            prompt_lengths (`torch.LongTensor` of shape `(batch_size,)`): real tokens of each prompt.
            max_new_tokens (`int`), block_length (`int`), steps (`int`): as in `DiffusionGenerationConfig`.
            aligned (`bool`): blocks on the position grid (`position // block_length`, block attention: windows are
                whole attention blocks, as the KV cache needs), else from each row's answer start (LLaDA).
        """
        num_blocks = math.ceil(max_new_tokens / block_length)
        if steps < num_blocks:
            raise ValueError(
                f"`steps` must be at least the number of blocks ceil(max_new_tokens / block_length) = {num_blocks}, "
                f"got steps={steps}; use steps >= {num_blocks} or a larger block_length."
            )
        width = int(prompt_lengths.max()) + max_new_tokens
        columns = torch.arange(width, device=prompt_lengths.device)  # [T]
        lengths = prompt_lengths[:, None]  # [B, 1]
        is_real = columns < lengths + max_new_tokens  # [B, T]
        is_generated = (columns >= lengths) & is_real  # [B, T]
        if aligned:
            block_of = columns.expand(len(prompt_lengths), -1) // block_length  # [B, T], the training grid
            num_blocks = math.ceil(width / block_length)
        else:
            block_of = (columns - lengths).div(block_length, rounding_mode="floor")  # [B, T], from the answer start
        block_index = torch.where(is_generated, block_of, -1)  # [B, T]
        num_masked = _masked_per_block(block_index, num_blocks)  # [B, K]
        most = int((num_masked > 0).sum(-1).max())
        if steps < most:
            raise ValueError(
                f"`steps` must be at least the number of blocks an answer spans, {most} (under block attention the "
                f"prompt's tail shares the first block), got steps={steps}; use steps >= {most}."
            )
        return cls._build(is_real, block_index, num_masked, steps, block_length if aligned else None)

    @classmethod
    def for_infill(
        cls,
        is_generated: torch.Tensor,
        is_real: torch.Tensor,
        *,
        block_length: int | None,
        grid: int | None,
        steps: int | None,
    ) -> DecodingPlan:
        """The plan of `infill`: fill the gaps `is_generated` of a fixed text.

        Args:
            is_generated (`torch.BoolTensor` of shape `(batch_size, width)`): the gaps (mask tokens, not padding).
            is_real (`torch.BoolTensor` of shape `(batch_size, width)`): not padding.
            block_length (`int`, *optional*): gaps per block in reading order (all of a row's gaps by default).
            grid (`int`, *optional*): the model's attention block size; blocks are then its blocks, aligned at each
                row's first real token, and `block_length` is not used.
            steps (`int`, *optional*): the per-row budget; each row's number of gaps by default.
        """
        width = is_generated.shape[1]
        if grid is not None:
            positions = (is_real.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
            block_of, num_blocks = positions // grid, math.ceil(width / grid)  # [B, T], the attention blocks
        else:
            block_length = block_length or width  # all of a row's gaps in one block
            block_of = (is_generated.long().cumsum(-1) - 1).clamp(min=0) // block_length  # [B, T], reading order
            num_blocks = math.ceil(width / block_length)
        block_index = torch.where(is_generated, block_of, -1)  # [B, T]
        num_masked = _masked_per_block(block_index, num_blocks)  # [B, K]
        most = int((num_masked > 0).sum(-1).max())
        if steps is not None and steps < most:
            raise ValueError(
                f"`steps` must be at least the number of blocks holding masked positions ({most}), got "
                f"steps={steps}; use steps >= {most}" + ("." if grid is not None else " or a larger block_length.")
            )
        return cls._build(is_real, block_index, num_masked, steps, None)

    @classmethod
    def _build(
        cls,
        is_real: torch.Tensor,
        block_index: torch.Tensor,
        num_masked: torch.Tensor,
        steps: int | None,
        grid: int | None,
    ) -> DecodingPlan:
        """Steps and tokens per row and block, then the host facts of the loop in one sync (`grid`: whole windows)."""
        batch_size, width = block_index.shape
        num_blocks = num_masked.shape[1]
        num_steps = split_steps(num_masked, steps)  # [B, K]
        # Each block's window: the span of its generated columns over all rows, widened to the grid block.
        columns = torch.arange(width, device=block_index.device).expand(batch_size, -1).reshape(-1)  # [B*T]
        slot = (block_index + 1).reshape(-1)  # [B*T], 0 collects the positions no block holds
        lo = torch.full((num_blocks + 1,), width, device=block_index.device).scatter_reduce(0, slot, columns, "amin")
        hi = torch.zeros(num_blocks + 1, dtype=torch.long, device=block_index.device)
        hi = hi.scatter_reduce(0, slot, columns + 1, "amax")
        lo, hi = lo[1:], hi[1:]  # [K] each
        if grid is not None:
            lo = lo // grid * grid  # [K]
            hi = torch.minimum(lo + grid, torch.tensor(width, device=lo.device))  # [K]
        unpadded = torch.where(is_real, width, columns.view(batch_size, width)).amin()[None]  # [1]
        host = torch.cat([num_steps.amax(0), lo, hi, unpadded]).tolist()  # the loop's host facts, one sync
        block_steps = tuple(host[:num_blocks])
        windows = tuple(zip(host[num_blocks : 2 * num_blocks], host[2 * num_blocks : 3 * num_blocks]))
        return cls(
            is_real=is_real,
            block_index=block_index,
            num_masked=num_masked,
            num_steps=num_steps,
            num_tokens=samplers.num_tokens_per_step(num_masked, num_steps),  # [B, K, S]
            blocks=tuple(block for block in range(num_blocks) if block_steps[block] > 0),
            windows=windows,
            block_steps=block_steps,
            unpadded_width=host[-1],
        )


def split_steps(num_masked: torch.Tensor, steps: int | None) -> torch.Tensor:
    """Share each row's step budget over its blocks (the rule of the module docstring, "Steps").

    Outline:
        1. The row's budget: `min(steps, M)` (no more steps than masked positions; `M` when `steps` is None).
        2. One step for every block holding masked positions (`J` of them).
        3. The other `E = budget - J` in proportion to the blocks' masked positions beyond the first, by cumulative
           rounding down, so that the row's steps sum to exactly the budget and none exceeds its block's count.

    Args:
        num_masked (`torch.LongTensor` of shape `(batch_size, num_blocks)`): masked positions per row and block.
        steps (`int`, *optional*): the per-row budget, at least every row's `J` (the planners check it).

    Returns:
        `torch.LongTensor` of shape `(batch_size, num_blocks)`: steps per row and block (0 where nothing is masked).

    Example:
    ```python
    >>> import torch
    >>> from peft_diffusion.generation import split_steps
    >>> split_steps(torch.tensor([[4, 4, 4, 4], [3, 8, 5, 0], [2, 4, 4, 2]]), 8).tolist()
    [[2, 2, 2, 2], [1, 4, 3, 0], [1, 3, 2, 2]]
    ```
    """
    # 1. the budget
    total = num_masked.sum(-1, keepdim=True)  # [B, 1], M
    budget = total if steps is None else total.clamp(max=steps)  # [B, 1]
    # 2. one step per block
    has_masks = num_masked > 0  # [B, K]
    num_blocks = has_masks.sum(-1, keepdim=True)  # [B, 1], J
    # 3. the rest in proportion to (m_j - 1), cumulative floor: s_j = 1 + floor(E C_j / (M - J)) - floor(E C_{j-1} / .)
    extra = (budget - num_blocks).clamp(min=0)  # [B, 1], E
    spare = (total - num_blocks).clamp(min=1)  # [B, 1], M - J (E is 0 where it is 0)
    cumulative = (num_masked - 1).clamp(min=0).cumsum(-1)  # [B, K], C_j
    shares = cumulative * extra // spare  # [B, K]
    increments = torch.diff(shares, dim=-1, prepend=torch.zeros_like(shares[:, :1]))  # [B, K]
    return torch.where(has_masks, 1 + increments, 0)  # [B, K]


def _masked_per_block(block_index: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """`[B, K]`: positions of each row in each block (`block_index` -1 counts nowhere)."""
    counts = torch.zeros(block_index.shape[0], num_blocks + 1, dtype=torch.long, device=block_index.device)
    return counts.scatter_add_(1, block_index + 1, torch.ones_like(block_index))[:, 1:]  # [B, K]


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
        4. The denoising loop (`_denoise`) executes the plan, with the exact KV cache under block attention.
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
    prompt_lengths = attention_mask.long().sum(-1)  # [B]
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
# The denoising loop
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outputs:
    """What a step reports and how a row stops: EOS ids (None: no stop), the pad id, where the answer sits in the
    canvas (`answer_index` `[B, N]`, for streaming and history), the streamer, and whether to keep the history."""

    eos_ids: torch.Tensor | None
    pad_id: int
    answer_index: torch.Tensor
    streamer: object | None = None
    output_history: bool = False


def _step_function(config: DiffusionGenerationConfig, generator: torch.Generator | None, mask_token_id: int):
    """`samplers.step` with the call's settings bound: `step(logits, is_masked, num_to_commit) -> (tokens, commit)`."""
    greedy = config.is_greedy
    return functools.partial(
        samplers.step,
        sampler=get_sampler(config.sampler),
        threshold=config.threshold,
        temperature=0.0 if greedy else (1.0 if config.temperature is None else config.temperature),
        top_k=None if greedy else config.top_k,
        top_p=None if greedy else config.top_p,
        generator=generator,
        mask_token_id=mask_token_id,
    )


def _denoise(
    model, canvas: torch.Tensor, plan: DecodingPlan, step: Callable, outputs: _Outputs, use_cache: bool
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """Execute `plan` on `canvas` `[B, T]` (the exact KV cache with `use_cache`); returns `(canvas, nfe, history)`."""
    return _Denoiser(model, plan, step, outputs, canvas, DynamicCache() if use_cache else None).run()


@dataclass(eq=False)
class _Denoiser:
    """The state of one call (canvas, KV cache, forwards so far, history, streamed prefix) and the steps that change
    it, executing a `DecodingPlan` (the outline in the module docstring)."""

    model: torch.nn.Module
    plan: DecodingPlan
    step: Callable
    outputs: _Outputs
    canvas: torch.Tensor  # [B, T]
    cache: DynamicCache | None
    nfe: int = 0
    history: list[torch.Tensor] = field(default_factory=list)
    streamed: int = 0
    # Logits of the next block's first step, from the fused commit (or the prefill): [B, W, V].
    pending: torch.Tensor | None = None
    # Under shift, the logits of the window's first position: they come from the last committed token, so the forward
    # that commits it computes them once and every step of the block reuses them: [B, 1, V].
    head: torch.Tensor | None = None
    finished: torch.Tensor = field(init=False)  # [B], rows holding a complete answer up to an EOS
    # Constant over the call, derived once.
    mask_token_id: int = field(init=False)
    is_shifted: bool = field(init=False)
    attention_mask: torch.Tensor = field(init=False)  # [B, T]
    is_generated: torch.Tensor = field(init=False)  # [B, T]
    columns: torch.Tensor = field(init=False)  # [T]

    def __post_init__(self):
        self.finished = torch.zeros(self.canvas.shape[0], dtype=torch.bool, device=self.canvas.device)
        self.mask_token_id = self.model.config.mask_token_id
        self.is_shifted = bool(self.model.config.shift)
        self.attention_mask = self.plan.is_real.long()
        self.is_generated = self.plan.is_generated
        self.columns = torch.arange(self.canvas.shape[1], device=self.canvas.device)

    def run(self) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """Decode every block of the plan, left to right; returns `(canvas, nfe, history)`."""
        blocks = self.plan.blocks
        for index, block in enumerate(blocks):
            window = self.plan.windows[block]
            if self.cache is not None and index == 0:
                self.open_block(0, window)  # prefill: the prompt and the first block in one forward
            self.decode_block(block)
            self.pending = None
            if self.outputs.eos_ids is not None and bool(self.finished.all()):
                break
            if self.cache is not None and index + 1 < len(blocks):
                self.open_block(window[0], self.plan.windows[blocks[index + 1]])  # 3. commit, fused
        if self.outputs.streamer is not None:
            self.stream(draft=False)
        return self.canvas, self.nfe, (torch.stack(self.history) if self.history else None)

    def decode_block(self, block: int) -> None:
        """2. Denoising steps on `block` until it has no masks, at most the plan's `block_steps[block]`."""
        lo, hi = self.plan.windows[block]
        is_active = self.plan.block_index[:, lo:hi] == block  # [B, W]
        for step_index in range(self.plan.block_steps[block]):
            is_masked = (self.canvas[:, lo:hi] == self.mask_token_id) & is_active  # [B, W]
            if not bool(is_masked.any()):
                break
            logits = self.step_logits(lo, hi)  # [B, W, V]
            tokens, commit = self.step(logits, is_masked, self.plan.num_tokens[:, block, step_index])  # [B, W] each
            self.canvas[:, lo:hi] = torch.where(commit, tokens, self.canvas[:, lo:hi])
            self.report()

    def step_logits(self, lo: int, hi: int) -> torch.Tensor:
        """Logits `[B, W, V]` of the window `[lo, hi)` for one step: the pending fused forward's, else a new one."""
        if self.pending is not None:
            logits, self.pending = self.pending, None
            return logits
        logits = self.forward(lo, hi)  # [B, W, V]
        if self.cache is not None:
            # The window alone over the cache of everything before it (unmasked under block attention).
            self.crop(lo)
            if self.is_shifted:
                logits[:, :1] = self.head  # its own first row reads itself (the left neighbour is cached)
        return logits

    def open_block(self, start: int, window: tuple[int, int]) -> None:
        """Forward columns `[start, hi)` over the cache: it commits what lies before `window` to the cache (the
        prompt at prefill, the finished block after) and is the first step of `window`; its keys are dropped again."""
        lo, hi = window
        self.pending = self.forward(start, hi, keep=hi - lo)  # [B, W, V]; no LM head over the rest
        self.head = self.pending[:, :1].clone()
        self.crop(lo)

    def forward(self, start: int, end: int, keep: int = 0) -> torch.Tensor:
        """Logits `[B, end - start, V]` of canvas columns `[start, end)`, over the cache when there is one; with the
        cache and `keep`, only the last `keep` columns' logits (the LM head skips the others)."""
        self.nfe += 1
        unpadded = self.plan.unpadded_width  # forwards ending there pass no padding mask (`DiffusionLM.forward`)
        if self.cache is None:
            mask = None if self.canvas.shape[1] <= unpadded else self.attention_mask
            return self.model(input_ids=self.canvas, attention_mask=mask).logits[:, start:end]
        outputs = self.model(
            input_ids=self.canvas[:, start:end],
            attention_mask=None if end <= unpadded else self.attention_mask[:, :end],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        return outputs.logits

    def crop(self, length: int) -> None:
        """Keep the first `length` columns in the cache."""
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)

    def report(self) -> None:
        """After a step: finish rows at EOS, record the history, stream."""
        outputs = self.outputs
        if outputs.eos_ids is not None:
            self.canvas, self.finished = _finish_at_eos(
                self.canvas, self.is_generated, self.columns, outputs.eos_ids, outputs.pad_id, self.mask_token_id
            )
        if outputs.output_history:
            self.history.append(self.canvas.gather(1, outputs.answer_index))
        if outputs.streamer is not None:
            self.stream()

    def stream(self, draft: bool = True) -> None:
        """Send the newly committed prefix of the answer (and, with `draft`, the whole draft) to the streamer."""
        answer = self.canvas.gather(1, self.outputs.answer_index)[0]  # [N]
        self.streamed = _stream(
            self.outputs.streamer, answer, self.streamed, self.outputs.eos_ids, self.mask_token_id, draft=draft
        )


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
