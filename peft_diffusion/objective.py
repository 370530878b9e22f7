"""One step of the masked-diffusion objective: draw t, corrupt, score, and the step's metrics by name.

`DiffusionLM.forward(labels=...)` calls `diffusion_objective` (the HF convention `forward(labels=...) -> loss`); the
trainer reads the loss and the metrics, and reduces the metrics with `reduce_metrics` when it logs. The math lives
in `noise.py` (time), `corruption.py` (the corruption) and `loss.py` (the ELBO); this module only wires one step of
it.

Metrics of one step (`ObjectiveOutput.metrics`, detached, by name):

| name              | shape | reduction over a logging window                         |
|-------------------|-------|---------------------------------------------------------|
| `masked_ce`       | []    | mean over steps: raw CE of the masked targets           |
| `mean_t`          | []    | mean over steps: mean noise level of the targets        |
| `masked_fraction` | []    | mean over steps: masked targets / targets               |
| `num_targets`     | []    | (weights the eval ELBO)                                  |
| `ce_sum_by_t`     | [4]   | summed, divided by `masked_by_t`: the CE by noise level |
| `masked_by_t`     | [4]   | summed: masked targets per noise-level bucket            |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import positions_from_inputs
from .corruption import complementary, corrupt, masked_corruption
from .loss import TEACHER_POSITIONS, certainty_entropy, diffusion_loss, teacher_kl
from .noise import expand_time, group_time, sample_time

__all__ = ["MEAN_METRICS", "T_BUCKET_EDGES", "ObjectiveOutput", "diffusion_objective", "reduce_metrics"]

# Noise-level buckets of the loss-by-t statistics: t in [0, 0.25), [0.25, 0.5), [0.5, 0.75), [0.75, 1].
T_BUCKET_EDGES = (0.25, 0.5, 0.75)
# The log key of each bucket of `ce_sum_by_t`.
T_BUCKET_NAMES = tuple(
    f"masked_ce_by_t/{lo:.2f}-{hi:.2f}" for lo, hi in zip((0.0, *T_BUCKET_EDGES), (*T_BUCKET_EDGES, 1.0))
)
# Metrics logged as the mean of their per-step values.
MEAN_METRICS = ("masked_ce", "mean_t", "masked_fraction", "teacher_kl", "certainty_entropy")


@dataclass
class ObjectiveOutput:
    """One step of the objective.

    Args:
        loss (`torch.FloatTensor`): the diffusion loss (scalar, with grad).
        logits (`torch.FloatTensor` of shape `(batch_size or 2 * batch_size, sequence_length, vocab_size)`): the
            logits on x_t (both copies under complementary masking).
        metrics (`dict[str, torch.Tensor]`): detached statistics by name (module docstring).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    metrics: dict[str, torch.Tensor]


def diffusion_objective(
    model,
    input_ids: torch.LongTensor,
    labels: torch.LongTensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    is_masked: torch.Tensor | None = None,
    time_eps: float = 1e-3,
    antithetic_time: bool = False,
    complementary_masking: bool = False,
    normalization: str = "targets",
    num_items_in_batch: int | torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_weight: float = 0.0,
    teacher_positions: str = "masked",
    certainty_weight: float = 0.0,
    certainty_temperature: float = 1.0,
    **forward_kwargs,
) -> ObjectiveOutput:
    """The masked-diffusion loss (DiffuLLaMA eq. for L_t, MDLM): corrupt the targets, predict them, weight by 1/t.

    1. targets: `labels != -100`, minus the first token of every document under shift (nothing precedes it);
    2. time: drawn unless given, one t per document, or per attention block of each document (`noise.group_time`:
       packed documents and left padding follow positions, as the attention does); a given `t` is per sequence, per
       block (`position // block_size`, the same blocks) or per token;
    3. corruption: the masking policy of the config (`corruption.corrupt`), or the given `is_masked`; optionally the
       complementary copy;
    4. logits on x_t from `model` (a `DiffusionLM`; two-stream `[x_t ; x_0]` when its pattern trains with clean
       context);
    5. `loss.diffusion_loss`, and the step's metrics;
    6. with `teacher_logits` (the AR base's next-token logits on the clean text, aligned: `teacher_logits[:, i]`
       predicts token i) and `teacher_weight > 0`: plus `teacher_weight * sum KL(teacher || student) / normalizer`
       over the masked targets (`teacher_positions`: all, or the first masked target of each attention block) that
       the teacher predicts (not a document's first token), with the ELBO's normalizer;
    7. with `certainty_weight > 0`: plus `certainty_weight * sum H / normalizer`, the entropy at
       `certainty_temperature` of the masked targets the model already predicts right (`loss.certainty_entropy`,
       dParallel's certainty forcing), with the ELBO's normalizer.

    Args: see `DiffusionLM.forward`; `forward_kwargs` go to the model's forward on x_t.
    """
    config = model.config
    batch_size, length = input_ids.shape
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"`labels` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(labels.shape)}; "
            "labels are aligned to positions (not shifted)."
        )
    # 1. targets
    is_target = labels != -100  # [B, L]
    if attention_mask is not None:
        is_target &= attention_mask.bool()
    positions, doc_ids = positions_from_inputs(attention_mask, position_ids, batch_size, length, input_ids.device)
    if config.shift:
        is_target &= positions > 0  # [B, L]
    # 2. time: one per attention block of each document, or per document: the groups of the attention
    block_size = config.attention_block_size
    if t is None:
        if is_masked is not None:
            raise ValueError("An explicit `is_masked` needs the time `t` it was drawn at.")
        draws = sample_time(
            batch_size, length, eps=time_eps, antithetic=antithetic_time, generator=generator, device=input_ids.device
        )  # [B, L]
        t = group_time(draws, positions, doc_ids, block_size)  # [B, L]
    else:
        if t.dim() >= 1 and t.shape[0] != batch_size:
            raise ValueError(f"`t` must have batch size {batch_size} (from `input_ids`), got shape {tuple(t.shape)}.")
        # a given per-block t follows positions, as the attention's blocks do (left padding, packing)
        t = expand_time(t.to(input_ids.device), length, block_size, positions)  # [B, L]
    # 3. corruption
    noise = dict(
        mask_token_id=config.mask_token_id,
        schedule=config.noise_schedule,
        masking=config.masking,
        strength=config.masking_strength,
        block_size=block_size,
        positions=positions,
    )
    if is_masked is None:
        corruption = corrupt(input_ids, is_target, t, generator=generator, **noise)
    else:
        corruption = masked_corruption(input_ids, is_target, is_masked, t, **noise)
    corruptions = [corruption]
    if complementary_masking:
        corruptions.append(complementary(corruption, input_ids, is_target, config.mask_token_id, eps=time_eps))
    noisy_ids = torch.cat([c.noisy_ids for c in corruptions])  # [B or 2B, L]
    repeat = len(corruptions)

    def repeated(tensor):
        return None if tensor is None else tensor.repeat(repeat, *([1] * (tensor.dim() - 1)))

    # 4. logits on x_t
    outputs = model(
        input_ids=noisy_ids,
        attention_mask=repeated(attention_mask),
        position_ids=repeated(position_ids),
        clean_input_ids=repeated(input_ids) if config.uses_clean_context else None,
        generator=generator,
        **forward_kwargs,
    )
    # 5. the loss and the metrics
    all_masked = torch.cat([c.is_masked for c in corruptions])  # [B or 2B, L]
    all_t = torch.cat([c.t for c in corruptions])  # [B or 2B, L]
    result = diffusion_loss(
        outputs.logits,
        repeated(input_ids),
        all_masked,
        repeated(is_target),
        torch.cat([c.elbo_weight for c in corruptions]),
        normalization=normalization,
        num_items_in_batch=None if num_items_in_batch is None else num_items_in_batch * repeat,
    )
    metrics = _step_metrics(result, corruption, is_target, all_masked & repeated(is_target), all_t)
    loss = result.loss
    # 6. the AR teacher
    if teacher_logits is not None and teacher_weight > 0:
        if teacher_positions not in TEACHER_POSITIONS:
            raise ValueError(
                f"`teacher_positions` must be one of {list(TEACHER_POSITIONS)}, got teacher_positions="
                f"{teacher_positions!r}."
            )
        if teacher_logits.shape[:2] != input_ids.shape:
            raise ValueError(
                f"`teacher_logits` must have shape [B, L, V] matching `input_ids` {tuple(input_ids.shape)}, got "
                f"{tuple(teacher_logits.shape)}."
            )
        scored = all_masked & repeated(is_target & (positions > 0))  # [B or 2B, L]
        if teacher_positions == "first_masked":
            scored = first_in_block(scored, repeated(positions), repeated(doc_ids), block_size)
        kl = teacher_kl(outputs.logits, repeated(teacher_logits), scored)  # [B or 2B, L]
        loss = loss + teacher_weight * kl.sum() / result.normalizer
        metrics["teacher_kl"] = (kl.sum() / scored.sum().clamp(min=1)).detach()
    # 7. certainty forcing
    if certainty_weight > 0:
        scored = all_masked & repeated(is_target)  # [B or 2B, L]
        entropy = certainty_entropy(outputs.logits, repeated(input_ids), scored, certainty_temperature)  # [B or 2B, L]
        loss = loss + certainty_weight * entropy.sum() / result.normalizer
        metrics["certainty_entropy"] = (entropy.sum() / scored.sum().clamp(min=1)).detach()
    return ObjectiveOutput(loss=loss, logits=outputs.logits, metrics=metrics)


def first_in_block(
    is_set: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor, block_size: int | None
) -> torch.BoolTensor:
    """The first set position of each attention block (`position // block_size` within a document; the whole
    document when `block_size` is None) of each row: `[B, L]` booleans."""
    length = is_set.shape[1]
    block = positions // block_size if block_size else torch.zeros_like(positions)  # [B, L]
    starts = torch.ones_like(is_set)  # [B, L]: the first position of a (document, block) run
    starts[:, 1:] = (block[:, 1:] != block[:, :-1]) | (doc_ids[:, 1:] != doc_ids[:, :-1])
    index = torch.arange(length, device=is_set.device).expand_as(positions)  # [B, L]
    start_index = torch.where(starts, index, 0).cummax(dim=1).values  # [B, L]
    before = is_set.long().cumsum(1) - is_set.long()  # [B, L]: set positions strictly before i in the row
    before_in_block = before - before.gather(1, start_index)  # [B, L]
    return is_set & (before_in_block == 0)


@torch.no_grad()
def _step_metrics(result, corruption, is_target, is_scored, t) -> dict[str, torch.Tensor]:
    """The metrics of one step (module docstring); `is_scored` and `t` cover every copy, `[B or 2B, L]`."""
    num_targets = is_target.sum().clamp(min=1)
    edges = torch.tensor(T_BUCKET_EDGES, device=t.device)
    bucket = torch.bucketize(t, edges, right=True)  # [B or 2B, L]
    num_buckets = len(T_BUCKET_EDGES) + 1
    return {
        "masked_ce": result.masked_ce.detach(),
        "mean_t": (corruption.t * is_target).sum() / num_targets,
        "masked_fraction": (corruption.is_masked.sum() / num_targets).float(),
        "num_targets": is_target.sum(),
        "ce_sum_by_t": torch.zeros(num_buckets, device=t.device).index_add_(
            0, bucket[is_scored], result.token_ce[is_scored].detach()
        ),  # [4]
        "masked_by_t": torch.bincount(bucket[is_scored], minlength=num_buckets),  # [4]
    }


def reduce_metrics(collected: dict[str, list[torch.Tensor]], prefix: str = "") -> dict[str, float]:
    """Log values of the metrics collected over a logging window (each list holds one tensor per step, gathered over
    ranks: `[world]` for scalars, `[world, 4]` for the buckets).

    The `MEAN_METRICS` are averaged; the CE by noise level is token-weighted over the window (empty buckets are not
    logged).
    """
    logs = {}
    for name in MEAN_METRICS:
        if collected.get(name):
            logs[f"{prefix}{name}"] = torch.cat([value.flatten() for value in collected[name]]).mean().item()
    if collected.get("ce_sum_by_t"):
        ce_sums = torch.cat([value.reshape(-1, len(T_BUCKET_NAMES)) for value in collected["ce_sum_by_t"]]).sum(0)
        counts = torch.cat([value.reshape(-1, len(T_BUCKET_NAMES)) for value in collected["masked_by_t"]]).sum(0)
        for name, ce_sum, count in zip(T_BUCKET_NAMES, ce_sums.tolist(), counts.tolist()):
            if count > 0:
                logs[f"{prefix}{name}"] = ce_sum / count
    return logs
