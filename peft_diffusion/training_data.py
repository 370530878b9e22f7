"""Training data at the trainer's boundary: label preparation (the collator step, the EOS policy) and the checks of
a dataset before and after TRL prepares it (clear errors instead of an empty run or a loss without signal).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy
import torch
from datasets import Dataset

from .attention import positions_from_inputs
from .training_config import EOS_POLICIES, DiffusionTrainingConfig

logger = logging.getLogger(__name__)

_BATCH_ROWS = 1024  # rows per Arrow batch when a dataset is checked
# Columns TRL's dataset preparation can turn into `input_ids` + `labels`.
_USABLE_COLUMNS = (
    "`text` (or `dataset_text_field`), `prompt` + `completion`, `messages`, `conversations` or `input_ids`"
)


def eos_targets(
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eos_token_id: int,
    policy: Literal["none", "all"] = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decide whether the padding after an answer is a target.

    - `"none"` (default): padding (`attention_mask == 0`) is never a target; the answer's own EOS, when the chat
      template labels it, stays a target, so the model still learns to stop. Default because padding length depends
      on the other examples of the batch: making it a target changes the objective with the batch composition and
      floods short answers' loss with easy EOS predictions. It is the right choice for block-wise decoding, which
      stops at the first EOS.
    - `"all"` (LLaDA SFT): the run of padding/EOS tokens right after the last target of each row becomes EOS
      targets, attended to like real tokens, so the model learns to fill the unused tail of a fixed-length canvas
      with EOS (needed for full-sequence decoding, where the answer length is not known in advance).

    Args:
        labels (`torch.LongTensor` of shape `[B, L]`): -100 on non-targets.
        input_ids (`torch.LongTensor` of shape `[B, L]`): token ids.
        attention_mask (`torch.LongTensor` of shape `[B, L]`): 1 on real tokens, 0 on padding.
        eos_token_id (`int`): id of the EOS token.
        policy (`str`, defaults to `"none"`): one of `EOS_POLICIES`.

    Returns:
        `(input_ids, labels, attention_mask)`, each `[B, L]`; new tensors, the inputs are not modified. With `"all"`
        the trailing padding holds `eos_token_id` in `input_ids` and `labels` and 1 in `attention_mask`.

    Example:
    ```python
    >>> import torch
    >>> from peft_diffusion.trainer import eos_targets
    >>> labels = torch.tensor([[-100, 7, 2, -100]])
    >>> input_ids = torch.tensor([[5, 7, 2, 0]])
    >>> attention_mask = torch.tensor([[1, 1, 1, 0]])
    >>> eos_targets(labels, input_ids, attention_mask, eos_token_id=2, policy="all")[1]
    tensor([[-100,    7,    2,    2]])
    ```
    """
    if policy not in EOS_POLICIES:
        raise ValueError(f"`policy` must be one of {list(EOS_POLICIES)}, got policy={policy!r}.")
    if not labels.shape == input_ids.shape == attention_mask.shape:
        raise ValueError(
            f"`labels`, `input_ids` and `attention_mask` must have the same shape, got {tuple(labels.shape)}, "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}."
        )
    is_padding = attention_mask == 0  # [B, L]
    if policy == "none":
        return input_ids.clone(), labels.masked_fill(is_padding, -100), attention_mask.clone()
    # "all": the maximal run of padding/EOS right after the last target becomes EOS targets
    positions = torch.arange(labels.shape[1], device=labels.device)  # [L]
    is_target = (labels != -100) & ~is_padding  # [B, L]
    last_target = torch.where(is_target, positions, -1).amax(dim=-1, keepdim=True)  # [B, 1]
    is_after = (positions > last_target) & (last_target >= 0)  # [B, L]
    is_filler = is_padding | (input_ids == eos_token_id)  # [B, L]
    first_content = torch.where(is_after & ~is_filler, positions, labels.shape[1]).amin(dim=-1, keepdim=True)  # [B, 1]
    is_trailing = is_after & (positions < first_content)  # [B, L]
    return (
        input_ids.masked_fill(is_trailing, eos_token_id),
        labels.masked_fill(is_padding & ~is_trailing, -100).masked_fill(is_trailing, eos_token_id),
        attention_mask.masked_fill(is_trailing, 1),
    )


@dataclass
class DiffusionDataCollator:
    """Wraps TRL's collator: fixes the targets before the Trainer counts `num_items_in_batch` (`labels != -100`).

    1. `eos_policy="all"`: padding after each answer becomes EOS targets (`eos_targets`, LLaDA SFT);
    2. under the shift, the first token of each document has no left neighbour, so it is never a target (TRL's
       padding-free collator already does this; padded batches start a document at position 0 of each row).
    """

    collator: Callable
    shift: bool
    eos_policy: str = "none"
    eos_token_id: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        labels = batch["labels"]  # [B, L]
        # 1. EOS targets on the trailing padding
        if self.eos_policy != "none" and "attention_mask" in batch:
            batch["input_ids"], labels, batch["attention_mask"] = eos_targets(
                labels, batch["input_ids"], batch["attention_mask"], self.eos_token_id, self.eos_policy
            )
        # 2. no target at a document start under the shift
        if self.shift:
            positions, _ = positions_from_inputs(
                batch.get("attention_mask"), batch.get("position_ids"), *labels.shape, labels.device
            )  # [B, L]
            labels = labels.masked_fill(positions == 0, -100)
        batch["labels"] = labels
        return batch


def _check_dataset(dataset, args: DiffusionTrainingConfig, formatting_func, name: str) -> None:
    """A dataset TRL can turn into `input_ids` + `labels`; else a `ValueError` naming the columns."""
    if dataset is None:
        if name == "train_dataset":
            raise ValueError("`train_dataset` is required.")
        return
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"`{name}` is empty (no rows); pass a dataset with at least one example.")
    usable = (
        formatting_func is not None
        or "input_ids" in first
        or args.dataset_text_field in first
        or ("prompt" in first and "completion" in first)
        or "messages" in first
        or "conversations" in first
    )
    if not usable:
        raise ValueError(
            f"`{name}` has no usable column: got columns {sorted(first)}; it needs {_USABLE_COLUMNS}. Rename the "
            "column, set `dataset_text_field`, or pass a `formatting_func`."
        )
    if formatting_func is None and "input_ids" not in first and isinstance(dataset, Dataset):
        text_columns = [args.dataset_text_field, "prompt", "completion", "messages", "conversations"]
        for column in [column for column in text_columns if column in first]:
            missing = _null_rows(dataset, column)
            if missing:
                raise ValueError(
                    f"`{name}` has {len(missing)} row{'s' * (len(missing) > 1)} whose `{column}` is None (rows "
                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}); drop or fill them, e.g. "
                    f"`dataset.filter(lambda row: row[{column!r}] is not None)`."
                )


def _null_rows(dataset: Dataset, column: str) -> list[int]:
    """The rows of `dataset` whose `column` is None (one Arrow pass, skipped when the table holds no null)."""
    if dataset.data.column(column).null_count == 0:
        return []
    rows = []
    for start, table in zip(itertools.count(0, _BATCH_ROWS), dataset.with_format("arrow").iter(_BATCH_ROWS)):
        nulls = table.column(column).is_null().to_numpy(zero_copy_only=False)  # [batch]
        rows += (numpy.flatnonzero(nulls) + start).tolist()
    return rows


def _check_prepared(
    prepared,
    given,
    name: str,
    args: DiffusionTrainingConfig,
    *,
    num_rows: int,
    mask_token_id: int,
    mask_token: str | None,
    shift: bool,
) -> None:
    """Check a dataset as TRL prepared it (a `ValueError` naming the rows and the fix):

    1. no row lost: TRL drops rows that truncation to `max_length` left without a target (a warning saying how many;
       an error when none is left);
    2. every token id inside the model's embedding matrix (`num_rows`), and no mask token in the clean data (the model
       reads it as noise and cannot predict it: its logit is held at the lowest value, the loss is inf);
    3. every row holds a target: a label != -100 that is not a document's first token under the shift (the diffusion
       loss refuses a sequence without one, a batch at a time, deep in training).
    An `IterableDataset` is not read ahead.
    """
    if not isinstance(prepared, Dataset):
        return
    # 1. rows dropped by TRL
    dropped = len(given) - len(prepared) if isinstance(given, Dataset) and not args.packing else 0
    fix = (
        f"raise `max_length` (now {args.max_length}), shorten the prompts, or give every example an answer "
        "(a completion, an assistant turn, labels != -100)"
    )
    if len(prepared) == 0:
        raise ValueError(
            f"`{name}` has no row with a target token after preparation: each of its {len(given)} rows is left "
            f"with labels -100 only (prompt only, or its answer cut off by `max_length`), and such rows are dropped. "
            f"To train, {fix}."
        )
    if dropped > 0:
        warnings.warn(
            f"{dropped} of {len(given)} rows of `{name}` have no target token after truncation to max_length="
            f"{args.max_length} (only prompt is left) and were dropped; to train on them, {fix}.",
            stacklevel=3,
        )
    columns = prepared.column_names
    has_labels, has_lengths = "labels" in columns, "seq_lengths" in columns
    out_of_range, with_mask, without_target = [], [], []
    for start, table in zip(itertools.count(0, _BATCH_ROWS), prepared.with_format("arrow").iter(_BATCH_ROWS)):
        ids, offsets = _flat_lists(table.column("input_ids"))  # [N], [batch + 1]
        # 2. token ids
        bad = numpy.flatnonzero((ids < 0) | (ids >= num_rows))[:1]  # [<=1] positions
        out_of_range += [(int(row), int(ids[p])) for row, p in zip(_row_of(bad, offsets) + start, bad)]
        with_mask += numpy.unique(_row_of(numpy.flatnonzero(ids == mask_token_id), offsets) + start).tolist()
        # 3. targets
        if has_labels:
            labels, _ = _flat_lists(table.column("labels"))  # [N]
            is_target = labels != -100  # [N]
            if shift:  # the collator drops each document's first token (`DiffusionDataCollator`)
                starts = offsets[:-1][numpy.diff(offsets) > 0]  # each row's first token
                lengths, _ = _flat_lists(table.column("seq_lengths")) if has_lengths else (None, None)
                if lengths is not None and lengths.sum() == len(ids):  # packed rows: every document's first token
                    starts = numpy.concatenate([[0], numpy.cumsum(lengths)[:-1]]).astype(numpy.int64)
                is_target[starts] = False
            counts = numpy.concatenate([[0], numpy.cumsum(is_target)])  # [N + 1]
            empty = numpy.flatnonzero(counts[offsets[1:]] - counts[offsets[:-1]] == 0) + start
            without_target += empty.tolist()
    if out_of_range:
        row, token = out_of_range[0]
        raise ValueError(
            f"`{name}` holds token id {token} in `input_ids` (row {row}), outside the model's embedding matrix "
            f"({num_rows} rows, ids 0-{num_rows - 1}): the data was tokenized with another tokenizer. Tokenize it "
            "with the model's own (`processing_class`), or pass text."
        )
    if with_mask:
        raise ValueError(
            f"`{name}` holds the mask token {mask_token!r} (id {mask_token_id}) in `input_ids` ({len(with_mask)} "
            f"row{'s' * (len(with_mask) > 1)}: {with_mask[:5]}{' ...' if len(with_mask) > 5 else ''}): the model "
            "reads it as noise and cannot predict it (its logit is held at the lowest value: the loss is inf, logged "
            f"as 0.0 under `logging_nan_inf_filter`). Remove it from the data, e.g. `text.replace({mask_token!r}, '')`."
        )
    if without_target:
        kind = "packed rows" if has_lengths else "rows"
        raise ValueError(
            f"`{name}` has {len(without_target)} {kind} with no target token after preparation ({kind} "
            f"{without_target[:5]}{' ...' if len(without_target) > 5 else ''} of {len(prepared)}): every label is "
            "-100 (prompt, non-assistant or padding) or a document's first token (never a target under the shift), "
            f"so the diffusion loss has nothing to score there. To train on them, {fix}; or drop them."
        )


def _row_of(positions: numpy.ndarray, offsets: numpy.ndarray) -> numpy.ndarray:
    """The row (of a batch with row `offsets` [rows + 1]) holding each flat token position [P] -> [P]."""
    return numpy.searchsorted(offsets, positions, side="right") - 1


def _flat_lists(column) -> tuple[numpy.ndarray, numpy.ndarray]:
    """A list column of an Arrow batch as (values [N], offsets [rows + 1] from 0)."""
    column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    return column.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def _check_packing(dataset, args: DiffusionTrainingConfig) -> None:
    """Completion-only losses need each prompt in the same packed document as its answer."""
    first = next(iter(dataset))
    completion_only = args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in first and "completion" in first
    if args.packing and (completion_only or args.assistant_only_loss) and args.packing_strategy != "bfd":
        raise ValueError(
            f"packing_strategy={args.packing_strategy!r} cuts examples apart, so an answer can land in a packed "
            "document without its prompt (the prompt must stay clean context for the noised answer); with "
            "completion_only_loss or assistant_only_loss use packing_strategy='bfd' (or packing=False)."
        )
