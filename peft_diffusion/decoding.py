"""Decoding: the per-row `DecodingPlan` and the one denoising loop that executes it.

The public side (`DiffusionGenerationConfig`, `generate`, `infill`: settings, checks, the canvas and the output)
is `generation.py`; it plans a call here and runs the loop. This module never reads a generation config: the
loop receives the plan, a bound `step` function (`samplers.step`) and what to report (`_Outputs`).

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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from . import samplers

__all__ = ["DecodingPlan", "split_steps"]


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
    >>> from peft_diffusion.decoding import DecodingPlan
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
    >>> from peft_diffusion.decoding import split_steps
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
