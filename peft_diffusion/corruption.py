r"""Corruption of masked diffusion: masking policies and the draw `x_t ~ q(x_t | x_0)` of the forward process.

A masking policy turns per-token times into per-token mask probabilities and the matching ELBO weights (uniform,
position-dependent); `corrupt` draws which target tokens become the mask token, `complementary` the complementary
draw. This module is the only place where tokens become the mask token. It is pure math over tensors: it imports
only torch and `noise.py` (schedules, per-token time), and holds no state.

Notation: the table of `noise.py` (`t`, `alpha_t`, `mask_prob`, `elbo_weight`, `input_ids` = `x_0`, `noisy_ids` =
`x_t`, `is_target`, `is_masked`), whose docstring also gives the NELBO these weights enter (per token under a
per-token schedule, as position-dependent masking makes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .noise import NoiseSchedule, _mask_prob_and_weight, expand_time, get_noise_schedule

__all__ = [
    "MASKING_POLICIES",
    "Corruption",
    "MaskingPolicy",
    "apply_mask",
    "complementary",
    "corrupt",
    "get_masking_policy",
    "masked_corruption",
    "position_dependent_masking",
    "register_masking_policy",
    "uniform_masking",
]


# ----------------------------------------------------------------------------------------------------------------
# Masking policies: which target tokens are masked at time t, and with which ELBO weight
# ----------------------------------------------------------------------------------------------------------------


class MaskingPolicy(Protocol):
    """Maps per-token times to per-token mask probabilities and the matching ELBO weights.

    Args:
        t (`torch.Tensor` of shape `[B, L]`): per-token time, constant inside a group (block or sequence).
        schedule (`NoiseSchedule`): the noise schedule.
        positions (`torch.LongTensor` of shape `[B, L]`): index of each token inside its group; a group starts
            at every position 0.
        is_target (`torch.BoolTensor` of shape `[B, L]`): tokens that may be masked.
        strength (`float`): policy strength; a policy without one requires 0.

    Returns:
        `(mask_prob, elbo_weight)`, both `[B, L]` in the dtype of `t`, both 0 where `is_target` is False.
    """

    def __call__(
        self,
        t: torch.Tensor,
        schedule: NoiseSchedule,
        positions: torch.Tensor,
        is_target: torch.Tensor,
        strength: float,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


MASKING_POLICIES: dict[str, MaskingPolicy] = {}


def register_masking_policy(name: str) -> Callable[[MaskingPolicy], MaskingPolicy]:
    """Decorator that registers a masking policy under `name` (the value of `DiffusionConfig.masking`).

    Args:
        name (`str`): the registry key, lower_snake.

    Returns:
        The decorator; it returns the policy unchanged.
    """

    def decorator(policy: MaskingPolicy) -> MaskingPolicy:
        if name in MASKING_POLICIES:
            raise ValueError(f"A masking policy named {name!r} is already registered ({MASKING_POLICIES[name]}).")
        MASKING_POLICIES[name] = policy
        return policy

    return decorator


def get_masking_policy(name_or_policy: str | MaskingPolicy) -> MaskingPolicy:
    """Resolve a masking policy from its registered name, or return a callable unchanged.

    Args:
        name_or_policy (`str` or `MaskingPolicy`): a key of `MASKING_POLICIES` or any callable with the
            `MaskingPolicy` signature.

    Returns:
        `MaskingPolicy`.
    """
    if isinstance(name_or_policy, str):
        if name_or_policy not in MASKING_POLICIES:
            raise ValueError(
                f"`masking` must be one of {sorted(MASKING_POLICIES)} or a MaskingPolicy callable, got "
                f"masking={name_or_policy!r}; register a new one with @register_masking_policy."
            )
        return MASKING_POLICIES[name_or_policy]
    if callable(name_or_policy):
        return name_or_policy
    raise ValueError(
        f"`masking` must be a name in {sorted(MASKING_POLICIES)} or a callable, got {type(name_or_policy).__name__}."
    )


@register_masking_policy("uniform")
def uniform_masking(
    t: torch.Tensor,
    schedule: NoiseSchedule,
    positions: torch.Tensor,
    is_target: torch.Tensor,
    strength: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every target token is masked independently with `mask_prob = 1 - alpha_t` (MDLM, LLaDA, DiffuLLaMA).

    `elbo_weight = -alpha'_t / (1 - alpha_t)`. `strength` must be 0: this policy has none. See `MaskingPolicy` for
    the arguments.
    """
    if strength != 0:
        raise ValueError(
            f"`strength` only applies to masking='position_dependent', got strength={strength} with "
            "masking='uniform'; set it to 0 or use masking='position_dependent'."
        )
    mask_prob, weight = _mask_prob_and_weight(schedule, t)  # [B, L] float64
    zero = mask_prob.new_zeros(())
    mask_prob = torch.where(is_target, mask_prob, zero)  # [B, L]
    weight = torch.where(is_target, weight, zero)  # [B, L]
    return mask_prob.to(t.dtype), weight.to(t.dtype)


def _group_sum(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Sum `values` [B, L] over the groups `group_ids` [B, L] (ids in [0, L)), returned per group: [B, L]."""
    return torch.zeros_like(values).scatter_add_(1, group_ids, values)  # [B, G=L]


@register_masking_policy("position_dependent")
def position_dependent_masking(
    t: torch.Tensor,
    schedule: NoiseSchedule,
    positions: torch.Tensor,
    is_target: torch.Tensor,
    strength: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Later target tokens are masked more at small `t`; the bias vanishes as `t -> 1` (Efficient-DLM).

    At test time a dLM unmasks roughly left to right, so when few tokens are left masked (small `t`) they are the
    late ones; uniform training masks never look like that. This policy tilts the mask rate toward later tokens.

    1. Groups and relative positions. A group is a block (block diffusion) or a sequence: a run of tokens that starts
       at `positions == 0`. Inside a group with `n` target tokens, the `k`-th target (`k = 0..n-1`, prompt and
       padding skipped) has relative position `x = k / n` in [0, 1).
    2. Tilt. `w(t) = exp(beta (1 - t) x)` with `beta = strength`; at `t = 1` all weights are equal. Over the target
       index `k` this is Efficient-DLM's `exp(beta' (1 - t) k)` with `beta' = strength / n`: `strength` is the
       per-token rate times the group's target count (the block length for a block of answer tokens).
    3. Preserved marginal: the EXPECTED NUMBER of masked targets per group is `(1 - alpha_t) n`, the same as uniform
       masking, so `t` keeps its meaning "fraction masked" for the sampler:
       `mask_prob_i = min(1, (1 - alpha_t) n w_i / sum_j w_j)`.
       Clip: for `beta <= 2` (linear and cosine schedules) no probability exceeds 1 and the expected count is exact;
       for larger `beta` the latest tokens saturate at 1 and the expected count falls below `(1 - alpha_t) n`
       (it is then `sum_i mask_prob_i`, which this function returns).
    4. Loss weight. Each token follows its own schedule `alpha^i_t = 1 - mask_prob_i(t)`, so its ELBO weight is
       `-alpha'^i_t / (1 - alpha^i_t) = d log mask_prob_i / dt`, computed analytically:
       `elbo_weight_i = -alpha'_t / (1 - alpha_t) - beta (x_i - xbar)`, with `xbar = sum_j w_j x_j / sum_j w_j`.
       It is positive and finite: `log mask_prob_i` is concave in `t` whenever `1 - alpha_t` is log-concave (linear,
       cosine) since log-sum-exp is convex, and it reaches 0 at `t = 1`; so wherever `mask_prob_i < 1` it is strictly
       increasing. A clipped token (unclipped probability above 1) is masked with certainty, its schedule is flat
       there, and it gets weight 0: it is masked and predicted, but contributes no ELBO term at that time.

    With `strength = 0` this is exactly `uniform_masking`. See `MaskingPolicy` for the arguments; `t` must be
    constant inside each group (as `corrupt` guarantees).
    """
    if strength < 0:
        raise ValueError(
            f"`strength` (beta) of position-dependent masking must be >= 0, got strength={strength}; 0 is uniform "
            "masking, larger values mask later tokens more."
        )
    t64 = t.to(torch.float64)  # [B, L]
    is_target_f = is_target.to(torch.float64)  # [B, L]
    # 1. groups, and the relative position x of each target inside its group
    group_ids = ((positions == 0).long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    group_counts = _group_sum(is_target_f, group_ids)  # [B, G]
    targets_before = group_counts.cumsum(-1) - group_counts  # [B, G] targets in earlier groups
    rank = is_target_f.cumsum(-1) - 1.0 - targets_before.gather(1, group_ids)  # [B, L] k = 0..n-1 on targets
    n = group_counts.gather(1, group_ids).clamp(min=1.0)  # [B, L]
    x = torch.where(is_target, rank / n, 0.0)  # [B, L]
    # 2. tilt, shifted by the largest exponent c (n - 1) / n of the group so that the last target has w = 1
    c = strength * (1.0 - t64)  # [B, L]
    w = torch.exp(c * (x - (n - 1.0) / n)) * is_target_f  # [B, L]
    w_sum = _group_sum(w, group_ids).gather(1, group_ids).clamp(min=torch.finfo(torch.float64).tiny)  # [B, L]
    wx_mean = _group_sum(w * x, group_ids).gather(1, group_ids) / w_sum  # [B, L] xbar
    # 3. mask_prob_i = (1 - alpha_t) n w_i / sum_j w_j, clipped at 1
    uniform_prob, uniform_weight = _mask_prob_and_weight(schedule, t64)  # [B, L]
    raw_prob = uniform_prob * (w * n / w_sum)  # [B, L]
    mask_prob = raw_prob.clamp(max=1.0) * is_target_f  # [B, L]
    # 4. per-token ELBO weight d log mask_prob_i / dt; 0 where clipped (flat schedule) and on non-targets
    weight = uniform_weight - strength * (x - wx_mean)  # [B, L]
    weight = torch.where(is_target & (raw_prob <= 1.0), weight, 0.0)  # [B, L]
    return mask_prob.to(t.dtype), weight.to(t.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Corruption
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Corruption:
    """One draw `x_t ~ q(x_t | x_0)` of the forward process.

    Attributes:
        noisy_ids (`torch.LongTensor` of shape `[B, L]`): `x_t`, the mask token where `is_masked`.
        is_masked (`torch.BoolTensor` of shape `[B, L]`): masked tokens (always a subset of the targets).
        t (`torch.Tensor` of shape `[B, L]`): per-token time.
        mask_prob (`torch.Tensor` of shape `[B, L]`): probability each token had of being masked (0 off target).
        elbo_weight (`torch.Tensor` of shape `[B, L]`): ELBO weight of each token if masked (0 off target).
    """

    noisy_ids: torch.Tensor
    is_masked: torch.Tensor
    t: torch.Tensor
    mask_prob: torch.Tensor
    elbo_weight: torch.Tensor


def apply_mask(input_ids: torch.Tensor, is_masked: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Replace the tokens where `is_masked` by `mask_token_id`.

    Args:
        input_ids (`torch.LongTensor` of shape `[B, L]`): clean tokens `x_0`.
        is_masked (`torch.BoolTensor` of shape `[B, L]`): which tokens to mask.
        mask_token_id (`int`): id of the mask token.

    Returns:
        `torch.LongTensor` of shape `[B, L]`: `noisy_ids`.
    """
    if is_masked.shape != input_ids.shape or is_masked.dtype != torch.bool:
        raise ValueError(
            f"`is_masked` must be a bool tensor of the shape of `input_ids` {tuple(input_ids.shape)}, got "
            f"{is_masked.dtype} of shape {tuple(is_masked.shape)}."
        )
    return input_ids.masked_fill(is_masked, mask_token_id)  # [B, L]


def _token_probabilities(input_ids, is_target, t, schedule, masking, strength, block_size, positions=None):
    """Steps 1-3 of `corrupt`: per-token time, and the policy's `mask_prob` and `elbo_weight` (all [B, L])."""
    batch_size, seq_len = input_ids.shape
    schedule = get_noise_schedule(schedule)
    policy = get_masking_policy(masking)
    # 1. per-token time
    if t.dim() >= 1 and t.shape[0] != batch_size:
        raise ValueError(f"`t` must have batch size {batch_size} (from `input_ids`), got shape {tuple(t.shape)}.")
    if positions is not None and positions.shape != input_ids.shape:
        raise ValueError(
            f"`positions` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(positions.shape)}."
        )
    # a per-block t follows the attention's blocks (positions), as in the objective
    t_tokens = expand_time(t, seq_len, block_size, positions).to(input_ids.device)  # [B, L]
    if not t_tokens.is_floating_point():
        t_tokens = t_tokens.float()
    # 2. positions inside each block, or inside the sequence (document)
    if positions is None:
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch_size, -1)  # [B, L]
    if block_size is not None:
        positions = positions % block_size  # [B, L]
    # 3. per-token mask probability and ELBO weight
    mask_prob, weight = policy(t_tokens, schedule, positions, is_target, strength)  # [B, L], [B, L]
    return t_tokens, mask_prob, weight


def masked_corruption(
    input_ids: torch.Tensor,
    is_target: torch.Tensor,
    is_masked: torch.Tensor,
    t: torch.Tensor,
    *,
    mask_token_id: int,
    schedule: str | NoiseSchedule = "linear",
    masking: str | MaskingPolicy = "uniform",
    strength: float = 0.0,
    block_size: int | None = None,
    positions: torch.Tensor | None = None,
) -> Corruption:
    """A `Corruption` with given masked positions (drawn elsewhere at time `t`): tests and likelihood estimators.

    Only target tokens are masked (`is_masked & is_target`); the weights are those `corrupt` would use at `t`.

    Args:
        input_ids (`torch.LongTensor` of shape `[B, L]`): clean tokens `x_0`.
        is_target (`torch.BoolTensor` of shape `[B, L]`): tokens scored by the loss.
        is_masked (`torch.BoolTensor` of shape `[B, L]`): positions to mask.
        t (`torch.Tensor` of shape `[B]`, `[B, 1]`, `[B, num_blocks]` or `[B, L]`): the time of the draw.
        positions (`torch.LongTensor` of shape `[B, L]`, *optional*): position of each token inside its document.

    Returns:
        `Corruption` with `[B, L]` fields.
    """
    t_tokens, mask_prob, weight = _token_probabilities(
        input_ids, is_target, t, schedule, masking, strength, block_size, positions
    )
    is_masked = is_masked.bool() & is_target  # [B, L]
    return Corruption(
        noisy_ids=apply_mask(input_ids, is_masked, mask_token_id),
        is_masked=is_masked,
        t=t_tokens,
        mask_prob=mask_prob,
        elbo_weight=weight,
    )


def corrupt(
    input_ids: torch.Tensor,
    is_target: torch.Tensor,
    t: torch.Tensor,
    *,
    mask_token_id: int,
    schedule: str | NoiseSchedule = "linear",
    masking: str | MaskingPolicy = "uniform",
    strength: float = 0.0,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
) -> Corruption:
    """Draw `x_t ~ q(x_t | x_0)`: mask target tokens independently with their `mask_prob`.

    1. Expand `t` to one time per token (per block when `t` has one column per block).
    2. Positions inside each group: inside the block when `block_size` is given, else inside the sequence.
    3. The masking policy gives `mask_prob` and `elbo_weight` per token.
    4. Mask each target with probability `mask_prob`; prompt and padding tokens never change.

    Args:
        input_ids (`torch.LongTensor` of shape `[B, L]`): clean tokens `x_0`.
        is_target (`torch.BoolTensor` of shape `[B, L]`): tokens scored by the loss, `labels != -100`.
        t (`torch.Tensor` of shape `[B]`, `[B, 1]`, `[B, num_blocks]` or `[B, L]`): time per sequence, per block or
            per token (`group_time`), in (0, 1].
        mask_token_id (`int`): id of the mask token.
        schedule (`str` or `NoiseSchedule`, defaults to `"linear"`): the noise schedule.
        masking (`str` or `MaskingPolicy`, defaults to `"uniform"`): the masking policy.
        strength (`float`, defaults to 0.0): strength of the masking policy (`position_dependent`'s beta).
        block_size (`int`, *optional*): block length; makes positions (and per-block times) block-relative.
        generator (`torch.Generator`, *optional*): source of randomness.
        positions (`torch.LongTensor` of shape `[B, L]`, *optional*): position of each token inside its document
            (packing, left padding), read by the masking policy; defaults to the column index.

    Returns:
        `Corruption` with `[B, L]` fields.

    Example:
    ```python
    >>> import torch
    >>> from peft_diffusion.corruption import corrupt
    >>> input_ids = torch.tensor([[5, 6, 7, 8]])
    >>> is_target = torch.tensor([[False, True, True, True]])
    >>> out = corrupt(input_ids, is_target, torch.tensor([1.0]), mask_token_id=0)
    >>> out.noisy_ids
    tensor([[5, 0, 0, 0]])
    ```
    """
    if input_ids.dim() != 2 or is_target.shape != input_ids.shape or is_target.dtype != torch.bool:
        raise ValueError(
            f"`input_ids` must be [B, L] and `is_target` a bool tensor of the same shape, got input_ids "
            f"{tuple(input_ids.shape)} and is_target {is_target.dtype} {tuple(is_target.shape)}."
        )
    has_target = is_target.any(dim=-1)  # [B]
    if not bool(has_target.all()):
        rows = (~has_target).nonzero().flatten().tolist()
        raise ValueError(
            f"`labels` without any target token: rows {rows} of `is_target` (labels != -100) are all False. Every "
            "sequence needs at least one target; drop these examples or check the completion mask and truncation."
        )
    # 1.-3. per-token time, positions, mask probability and ELBO weight
    t_tokens, mask_prob, weight = _token_probabilities(
        input_ids, is_target, t, schedule, masking, strength, block_size, positions
    )
    # 4. independent Bernoulli masking of target tokens only
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # [B, L]
    is_masked = (u < mask_prob) & is_target  # [B, L]
    return Corruption(
        noisy_ids=apply_mask(input_ids, is_masked, mask_token_id),
        is_masked=is_masked,
        t=t_tokens,
        mask_prob=mask_prob,
        elbo_weight=weight,
    )


def complementary(
    corruption: Corruption, input_ids: torch.Tensor, is_target: torch.Tensor, mask_token_id: int, eps: float = 1e-3
) -> Corruption:
    r"""The complementary draw: mask exactly the targets the first draw left clean (Fast-dLLM v2).

    Training on both copies scores every target token exactly once per pair, which reduces the variance of the
    loss and wastes no token.

    Weight. Token `i` is masked in the complement with probability `1 - p_i`, where `p_i = corruption.mask_prob`.
    Changing variables `u = 1 - p_i(t)` in the ELBO `int (p'_i / p_i) E_{q_{p_i}}[...] dt` gives the weight
    `p'_i / (1 - p_i) = elbo_weight_i * p_i / (1 - p_i)` (`-alpha'_t / alpha_t` for uniform masking; `1 / (1 - t)`
    for the linear schedule). For uniform masking the complement is an exact draw of the forward process at the time
    `t'` with `1 - alpha_{t'} = alpha_t`, so the pair is an unbiased ELBO estimate; for position-dependent masking
    the complement reverses the positional tilt, so each token's term is unbiased but the context is not a forward
    draw. Tokens with `1 - p_i = 0` are never masked in the complement and get weight 0.

    Time floor. The primary draw keeps `t >= eps`, so its weight stays below `1 / eps`; the complement's mask rate
    `1 - p_i` gets the same floor in the weight's denominator (`p_i / max(1 - p_i, eps)`), so a primary draw near
    `t = 1` cannot give the complement a weight far above the primary's largest.

    Time. The returned `t` is the reflected time `1 - t`: the complement's time for the linear schedule (with mask
    rate `1 - t`); for other schedules `mask_prob` and `elbo_weight` are the quantities that matter.

    Args:
        corruption (`Corruption`): the first draw, from `corrupt`.
        input_ids (`torch.LongTensor` of shape `[B, L]`): clean tokens `x_0`.
        is_target (`torch.BoolTensor` of shape `[B, L]`): the targets used for the first draw.
        mask_token_id (`int`): id of the mask token.
        eps (`float`, defaults to 1e-3): the time floor of the primary draw (`sample_time`'s `eps`).

    Returns:
        `Corruption` with `is_masked = is_target & ~corruption.is_masked`.
    """
    is_masked = is_target & ~corruption.is_masked  # [B, L]
    mask_prob = torch.where(is_target, 1.0 - corruption.mask_prob, 0.0)  # [B, L]
    has_prob = is_target & (mask_prob > 0)  # [B, L]
    ratio = corruption.mask_prob / torch.where(has_prob, mask_prob.clamp(min=eps), 1.0)  # [B, L] p / max(1 - p, eps)
    weight = torch.where(has_prob, corruption.elbo_weight * ratio, 0.0)  # [B, L]
    return Corruption(
        noisy_ids=apply_mask(input_ids, is_masked, mask_token_id),
        is_masked=is_masked,
        t=1.0 - corruption.t,
        mask_prob=mask_prob,
        elbo_weight=weight,
    )
