r"""The masked-diffusion ELBO as a pure function of logits and a `Corruption` (`corruption.py`; notation: `noise.py`).

    loss = sum_{i masked target} elbo_weight_i * CE_i / normalizer,    CE_i = -log p_theta(x_0^i | x_t)_i

With the linear schedule `elbo_weight_i = 1 / t` (DiffuLLaMA arXiv 2410.17891, Eq. 6; MDLM; LLaDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "NORMALIZATIONS",
    "TEACHER_POSITIONS",
    "DiffusionLossOutput",
    "certainty_entropy",
    "diffusion_loss",
    "teacher_kl",
]

NORMALIZATIONS = ("targets", "masked")


@dataclass(frozen=True, eq=False)
class DiffusionLossOutput:
    """Result of `diffusion_loss`.

    Attributes:
        loss (`torch.Tensor`, scalar): the ELBO-weighted loss to optimise; connected to the logits even when
            nothing is masked.
        masked_ce (`torch.Tensor`, scalar): unweighted mean cross-entropy over the masked targets, for logging
            (0 when nothing is masked).
        num_targets (`torch.LongTensor`, scalar): number of target tokens.
        num_masked (`torch.LongTensor`, scalar): number of masked target tokens.
        token_ce (`torch.Tensor` of shape `[B, L]`): detached unweighted cross-entropy of each masked target, 0
            elsewhere (for statistics such as the loss by noise level).
        normalizer (`torch.Tensor`, scalar): what the weighted sum was divided by (other terms of the same step, such
            as the teacher's, are divided by it too).
    """

    loss: torch.Tensor
    masked_ce: torch.Tensor
    num_targets: torch.Tensor
    num_masked: torch.Tensor
    token_ce: torch.Tensor | None = None
    normalizer: torch.Tensor | None = None


def diffusion_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    is_masked: torch.Tensor,
    is_target: torch.Tensor,
    elbo_weight: torch.Tensor,
    *,
    normalization: Literal["targets", "masked"] = "targets",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> DiffusionLossOutput:
    r"""Masked-diffusion loss: ELBO-weighted cross-entropy on the masked target tokens.

    The logits must already be aligned with positions: `logits[:, i]` predicts `input_ids[:, i]`. The model applies
    DiffuLLaMA's shift (reading position `i` from the hidden state at `i - 1`) before this function, which never
    shifts.

    1. Cross-entropy `CE_i` in float32 at every masked target (`is_masked & is_target`); prompt, padding and clean
       tokens contribute nothing.
    2. Weighted sum `S = sum_i elbo_weight_i * CE_i`.
    3. Divide by the normalizer:
       - `"targets"` (default): the number of target tokens. `S / num_targets` is the unbiased Monte-Carlo estimate of
         the per-token NELBO (MDLM, LLaDA): clean targets count in the denominator because, in expectation, the
         weight `1 / t` makes up for their absence.
       - `"masked"`: the number of masked targets, a per-masked-token mean; lower variance at small `t` but no
         longer an unbiased ELBO estimate (it rescales each sequence by `num_targets / num_masked`).
       - `num_items_in_batch`, when given, replaces both: pass the count over all gradient-accumulation micro-batches
         (HF `Trainer`) so that accumulated gradients equal the large-batch gradient.

    Args:
        logits (`torch.Tensor` of shape `[B, L, V]`): position-aligned logits.
        input_ids (`torch.LongTensor` of shape `[B, L]`): clean tokens `x_0`, the prediction targets.
        is_masked (`torch.BoolTensor` of shape `[B, L]`): tokens masked in the model input.
        is_target (`torch.BoolTensor` of shape `[B, L]`): tokens scored by the loss (`labels != -100`).
        elbo_weight (`torch.Tensor` of shape `[B, L]`): per-token ELBO weight (`Corruption.elbo_weight`).
        normalization (`str`, defaults to `"targets"`): `"targets"` or `"masked"`, see above.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): explicit normalizer, overrides `normalization`.

    Returns:
        `DiffusionLossOutput`. When no token is masked, `loss` is 0 and still has a `grad_fn` reaching `logits`,
        so every data-parallel rank runs the same backward.

    Example:
    ```python
    >>> import torch
    >>> from peft_diffusion.loss import diffusion_loss
    >>> logits = torch.zeros(1, 2, 4)  # uniform predictions: CE = log 4
    >>> input_ids = torch.tensor([[1, 2]])
    >>> is_masked = torch.tensor([[True, False]])
    >>> is_target = torch.tensor([[True, True]])
    >>> out = diffusion_loss(logits, input_ids, is_masked, is_target, torch.full((1, 2), 2.0))
    >>> round(out.loss.item(), 4)  # 2 * log 4 / 2 targets
    1.3863
    ```
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {list(NORMALIZATIONS)}, got normalization={normalization!r}."
        )
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"`logits` must have shape [B, L, V] matching `input_ids` [B, L], got logits {tuple(logits.shape)} and "
            f"input_ids {tuple(input_ids.shape)}."
        )
    for name, value in (("is_masked", is_masked), ("is_target", is_target), ("elbo_weight", elbo_weight)):
        if value.shape != input_ids.shape:
            raise ValueError(
                f"`{name}` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(value.shape)}."
            )
    if isinstance(num_items_in_batch, int) and num_items_in_batch <= 0:
        raise ValueError(f"`num_items_in_batch` must be positive, got num_items_in_batch={num_items_in_batch}.")
    is_scored = is_masked & is_target  # [B, L]
    # 1. float32 cross-entropy at the masked targets; ignore_index gives exactly 0 elsewhere (still on the graph)
    labels = input_ids.masked_fill(~is_scored, -100)  # [B, L]
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none").view_as(
        labels
    )  # [B, L]
    # 2. weighted sum; zero the weight off the scored tokens first so an inf weight there cannot make 0 * inf = nan
    weight = torch.where(is_scored, elbo_weight.float(), 0.0)  # [B, L]
    weighted_sum = (weight * ce).sum()  # []
    num_targets = is_target.sum()  # []
    num_masked = is_scored.sum()  # []
    # 3. normalizer
    if num_items_in_batch is not None:
        normalizer = torch.as_tensor(num_items_in_batch, device=ce.device, dtype=ce.dtype)  # []
    else:
        normalizer = (num_targets if normalization == "targets" else num_masked).clamp(min=1).to(ce.dtype)  # []
    return DiffusionLossOutput(
        loss=weighted_sum / normalizer,
        masked_ce=ce.sum().detach() / num_masked.clamp(min=1),
        num_targets=num_targets,
        num_masked=num_masked,
        token_ce=ce.detach(),
        normalizer=normalizer,
    )


# Which masked targets the AR teacher scores (`teacher_kl`, `DiffusionTrainingConfig.teacher_positions`):
# "masked": every masked target; "first_masked": the first masked target of each attention block, the one position
# whose left context inside the block is as visible to the student as to the teacher.
TEACHER_POSITIONS = ("masked", "first_masked")


def teacher_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, is_scored: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each scored position, 0 elsewhere: `sum_v p_T(v) (log p_T(v) - log p_S(v))`.

    Args:
        logits (`torch.Tensor` of shape `[B, L, V]`): the student's position-aligned logits (with grad).
        teacher_logits (`torch.Tensor` of shape `[B, L, V']`): the teacher's, aligned the same way; `-inf` marks a
            token the teacher gives no mass (such as the mask token). Only the shared first `min(V, V')` tokens are
            compared: the student's extra tokens count through its normalisation only.
        is_scored (`torch.BoolTensor` of shape `[B, L]`): where to compare.

    Returns:
        `torch.Tensor` of shape `[B, L]`, float32; the gradient reaches `logits` through the scored rows only.
    """
    rows = is_scored.nonzero(as_tuple=True)
    kl = torch.zeros(is_scored.shape, dtype=torch.float32, device=logits.device)  # [B, L]
    if rows[0].numel() == 0:
        return kl + 0.0 * logits[..., :1].sum()  # on the graph, like the loss when nothing is masked
    vocab = min(logits.shape[-1], teacher_logits.shape[-1])
    student = F.log_softmax(logits[rows].float(), dim=-1)[:, :vocab]  # [N, vocab]
    teacher = F.log_softmax(teacher_logits[rows][:, :vocab].float(), dim=-1)  # [N, vocab]; -inf: no mass
    probability = teacher.exp()  # [N, vocab]
    terms = torch.where(probability > 0, probability * (teacher - student), 0.0)  # [N, vocab]
    return kl.index_put(rows, terms.sum(-1))


def certainty_entropy(
    logits: torch.Tensor, input_ids: torch.Tensor, is_scored: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The entropy of `softmax(logits / temperature)` at each scored position whose argmax is already the target,
    0 elsewhere: the certainty-forcing term of dParallel (arXiv 2509.26488), which sharpens the predictions the model
    gets right so that threshold decoding can commit several of them in one forward.

    Args:
        logits (`torch.Tensor` of shape `[B, L, V]`): the student's position-aligned logits (with grad).
        input_ids (`torch.LongTensor` of shape `[B, L]`): the clean tokens x_0 (the targets).
        is_scored (`torch.BoolTensor` of shape `[B, L]`): the masked targets.
        temperature (`float`, defaults to 1.0): the entropy is taken at this softmax temperature (the argmax does not
            depend on it).

    Returns:
        `torch.Tensor` of shape `[B, L]`, float32; the gradient reaches `logits` through the scored rows whose argmax
        is the target only.
    """
    entropy = torch.zeros(is_scored.shape, dtype=torch.float32, device=logits.device)  # [B, L]
    rows = is_scored.nonzero(as_tuple=True)
    if rows[0].numel() == 0:
        return entropy + 0.0 * logits[..., :1].sum()  # on the graph, like the loss when nothing is masked
    scaled = logits[rows].float() / temperature  # [N, V]
    right = scaled.argmax(-1) == input_ids[rows]  # [N]
    log_p = F.log_softmax(scaled, dim=-1)  # [N, V]
    log_p = torch.where(torch.isfinite(log_p), log_p, 0.0)  # a token with no mass (such as the mask) adds 0
    terms = -(log_p.exp() * log_p).sum(-1)  # [N]
    return entropy.index_put(rows, torch.where(right, terms, 0.0))
