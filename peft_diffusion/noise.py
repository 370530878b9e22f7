r"""Noise of masked diffusion: the notation of the package, the noise schedules `alpha_t` and time sampling.

Which tokens a draw masks at time `t` (the masking policies) and the draw itself (`corrupt`) are in `corruption.py`.
This module is pure math over tensors: it imports only torch, and holds no state.

Notation (used across the package):

| name          | meaning                                                                                  |
|---------------|------------------------------------------------------------------------------------------|
| `t`           | diffusion time in (0, 1]; `t = 1` means every target token is masked                     |
| `alpha_t`     | probability that a token is still clean at time `t` (`alpha_0 = 1`, `alpha_1 = 0`)        |
| `mask_prob`   | `1 - alpha_t`, probability that a target token is masked at time `t`                     |
| `elbo_weight` | `-alpha'_t / (1 - alpha_t)`, the ELBO weight of a masked token (`1 / t` for linear)       |
| `input_ids`   | the clean sequence `x_0`                                                                 |
| `noisy_ids`   | the corrupted sequence `x_t`                                                             |
| `is_target`   | token is scored by the loss (`labels != -100`); only targets are ever masked              |
| `is_masked`   | token was replaced by the mask token in `noisy_ids`                                      |
| `is_prompt`, `is_padding` | tokens that are never targets and never change                               |

The continuous-time masked-diffusion NELBO (MDLM; DiffuLLaMA arXiv 2410.17891, Eq. 5) is

    -log p(x_0) <= int_0^1  -alpha'_t / (1 - alpha_t)  E_{x_t ~ q(x_t | x_0)} [ sum_i 1[x_t^i = m] (-log p(x_0^i | x_t)) ] dt

and with the linear schedule `alpha_t = 1 - t` the weight is `1 / t` (DiffuLLaMA Eq. 6). A *per-token* schedule
`alpha_t^i` (position-dependent masking) gives the same bound with the per-token weight
`-alpha'^i_t / (1 - alpha^i_t)` (Shi et al. 2024, "Simplified and Generalized Masked Diffusion", GenMD4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "NOISE_SCHEDULES",
    "CosineNoiseSchedule",
    "LinearNoiseSchedule",
    "NoiseSchedule",
    "elbo_weight",
    "expand_time",
    "get_noise_schedule",
    "group_time",
    "register_noise_schedule",
    "sample_time",
]


# ----------------------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------------------


@runtime_checkable
class NoiseSchedule(Protocol):
    """A noise schedule `alpha_t`: decreasing from `alpha_0 = 1` to `alpha_1 = 0`.

    Any object with these two methods works (no registration needed); register it with `register_noise_schedule`
    to make it selectable by name from a config.
    """

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability `alpha_t` that a token is still clean at time `t` (any shape, same shape out)."""
        ...

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """`d alpha_t / dt` (any shape, same shape out); negative on (0, 1)."""
        ...


NOISE_SCHEDULES: dict[str, type[NoiseSchedule]] = {}


def register_noise_schedule(name: str) -> Callable[[type], type]:
    """Class decorator that registers a noise schedule under `name` (the value of `DiffusionConfig.noise_schedule`).

    Args:
        name (`str`): the registry key, lower_snake.

    Returns:
        The decorator; it returns the class unchanged.
    """

    def decorator(cls: type) -> type:
        if name in NOISE_SCHEDULES:
            raise ValueError(f"A noise schedule named {name!r} is already registered ({NOISE_SCHEDULES[name]}).")
        NOISE_SCHEDULES[name] = cls
        return cls

    return decorator


def get_noise_schedule(name_or_instance: str | NoiseSchedule) -> NoiseSchedule:
    """Resolve a noise schedule from its registered name, or return an instance unchanged.

    Args:
        name_or_instance (`str` or `NoiseSchedule`): a key of `NOISE_SCHEDULES` or any object with `alpha` and
            `alpha_derivative`.

    Returns:
        `NoiseSchedule`: the schedule instance.

    Example:
    ```python
    >>> import torch
    >>> from peft_diffusion.noise import get_noise_schedule
    >>> get_noise_schedule("linear").alpha(torch.tensor([0.25]))
    tensor([0.7500])
    ```
    """
    if isinstance(name_or_instance, str):
        if name_or_instance not in NOISE_SCHEDULES:
            raise ValueError(
                f"`noise_schedule` must be one of {sorted(NOISE_SCHEDULES)} or a NoiseSchedule instance, got "
                f"noise_schedule={name_or_instance!r}; register a new one with @register_noise_schedule."
            )
        return NOISE_SCHEDULES[name_or_instance]()
    if isinstance(name_or_instance, NoiseSchedule):
        return name_or_instance
    raise ValueError(
        f"`noise_schedule` must be a name in {sorted(NOISE_SCHEDULES)} or an object with `alpha` and "
        f"`alpha_derivative`, got {type(name_or_instance).__name__}."
    )


@register_noise_schedule("linear")
@dataclass(frozen=True)
class LinearNoiseSchedule:
    """`alpha_t = 1 - t`: the mask rate equals the time, and `elbo_weight = 1 / t` (DiffuLLaMA Eq. 6, MDLM, LLaDA)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -1.0)


@register_noise_schedule("cosine")
@dataclass(frozen=True)
class CosineNoiseSchedule:
    """`alpha_t = cos(pi / 2 * t)`: slower masking at small `t` (more weight on nearly clean inputs).

    `elbo_weight = (pi / 2) sin(pi t / 2) / (1 - cos(pi t / 2))`, about `2 / t` near 0 and `pi / 2` at `t = 1`.
    This is the cosine form of Shi et al. 2024 (MD4); it differs from MDLM's log-linear schedule.
    """

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t)

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


def _mask_prob_and_weight(schedule: NoiseSchedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`1 - alpha_t` and `-alpha'_t / (1 - alpha_t)` computed in float64 (`1 - cos` cancels in float32 at small t)."""
    t64 = t.to(torch.float64)  # any shape
    mask_prob = 1.0 - schedule.alpha(t64)  # same shape
    weight = -schedule.alpha_derivative(t64) / mask_prob  # same shape
    return mask_prob, weight


def elbo_weight(schedule: str | NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """ELBO weight `-alpha'_t / (1 - alpha_t)` of a masked token at time `t` (`1 / t` for the linear schedule).

    Args:
        schedule (`str` or `NoiseSchedule`): the noise schedule.
        t (`torch.Tensor` of any shape): times in (0, 1]; the weight is infinite at `t = 0`.

    Returns:
        `torch.Tensor` of the same shape and dtype as `t` (float32 if `t` is not floating point).

    Example:
    ```python
    >>> import torch
    >>> from peft_diffusion.noise import elbo_weight
    >>> elbo_weight("linear", torch.tensor([0.5, 0.25]))
    tensor([2., 4.])
    ```
    """
    dtype = t.dtype if t.is_floating_point() else torch.float32
    return _mask_prob_and_weight(get_noise_schedule(schedule), t)[1].to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Time sampling
# ----------------------------------------------------------------------------------------------------------------


def sample_time(
    batch_size: int,
    num_blocks: int = 1,
    *,
    eps: float = 1e-3,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw diffusion times `t ~ U(eps, 1]`, one per sequence (or per block under block attention).

    1. Draw `u` in [0, 1): i.i.d., or (`antithetic=True`) the stratified set `u_k = (u_0 + k / N) mod 1` over the
       `N = batch_size * num_blocks` flattened draws (MDLM's low-discrepancy sampler, LLaDA): each draw is still
       uniform, but the batch covers [0, 1) evenly, so the batch-mean loss has a much lower variance.
    2. Map `u -> t = 1 - (1 - eps) u` in (eps, 1]; `eps` keeps `elbo_weight` (`1 / t`) finite.

    Args:
        batch_size (`int`): number of sequences `B`.
        num_blocks (`int`, defaults to 1): times per sequence `nb` (one per block for block diffusion).
        eps (`float`, defaults to 1e-3): smallest time, in (0, 1).
        antithetic (`bool`, defaults to `False`): stratified instead of i.i.d. draws.
        generator (`torch.Generator`, *optional*): source of randomness.
        device (`torch.device` or `str`, *optional*): device of the result.

    Returns:
        `torch.Tensor` of shape `[batch_size, num_blocks]`, float32, values in (eps, 1].

    Example:
    ```python
    >>> from peft_diffusion.noise import sample_time
    >>> sample_time(4, antithetic=True).shape
    torch.Size([4, 1])
    ```
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"`eps` must be in (0, 1), got eps={eps}; use a small positive value such as 1e-3.")
    if batch_size < 1 or num_blocks < 1:
        raise ValueError(
            f"`batch_size` and `num_blocks` must be >= 1, got batch_size={batch_size} and num_blocks={num_blocks}."
        )
    num_draws = batch_size * num_blocks
    # 1. uniform draws in [0, 1)
    if antithetic:
        offset = torch.rand((), generator=generator, device=device)  # []
        strata = torch.arange(num_draws, device=device, dtype=torch.float32) / num_draws  # [N]
        u = torch.remainder(offset + strata, 1.0)  # [N]
    else:
        u = torch.rand(num_draws, generator=generator, device=device)  # [N]
    # 2. map to (eps, 1]
    t = 1.0 - (1.0 - eps) * u  # [N]
    return t.view(batch_size, num_blocks)  # [B, nb]


def expand_time(
    t: torch.Tensor, seq_len: int, block_size: int | None = None, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token time from a per-sequence, per-block or per-token time.

    Block `b` covers the tokens with `position // block_size == b`: with `positions` (left padding counted from each
    row's first real token, packed documents from each document's start: the attention's blocks; packed documents
    then share the time of their blocks of the same index), else the columns
    `b * block_size .. (b + 1) * block_size - 1`; the last block may be shorter. A `t` with one column per block
    (`ceil(seq_len / block_size)`, when `block_size` is given) is per block; otherwise a `t` with one column per token
    (`[B, L]`, e.g. from `group_time`) is already per token and is returned as it is.

    Args:
        t (`torch.Tensor` of shape `[B]`, `[B, 1]`, `[B, nb]` or `[B, L]`): time per sequence, per block or per token.
        seq_len (`int`): sequence length `L`.
        block_size (`int`, *optional*): tokens per block; required when `1 < nb < L`, and then
            `nb == ceil(seq_len / block_size)`.
        positions (`torch.LongTensor` of shape `[B, L]`, *optional*): position of each token (`0` at each row's
            first real token, or at each packed document's start); the blocks follow them. Defaults to the columns.

    Returns:
        `torch.Tensor` of shape `[B, L]`.

    Example:
    ```python
    >>> import torch
    >>> from peft_diffusion.noise import expand_time
    >>> expand_time(torch.tensor([[0.2, 0.9]]), seq_len=5, block_size=3)
    tensor([[0.2000, 0.2000, 0.2000, 0.9000, 0.9000]])
    >>> expand_time(torch.tensor([[0.2, 0.9]]), seq_len=5, block_size=3, positions=torch.tensor([[0, 0, 0, 1, 2]]))
    tensor([[0.2000, 0.2000, 0.2000, 0.2000, 0.2000]])
    ```
    """
    if t.dim() == 1:
        t = t[:, None]  # [B, 1]
    if t.dim() != 2:
        raise ValueError(f"`t` must have shape [B], [B, 1] or [B, num_blocks], got shape {tuple(t.shape)}.")
    if block_size is not None and block_size < 1:
        raise ValueError(f"`block_size` must be >= 1, got block_size={block_size}.")
    num_blocks = t.shape[1]
    if num_blocks == 1:
        return t.expand(-1, seq_len).contiguous()  # [B, L]
    expected = None if block_size is None else -(-seq_len // block_size)
    if num_blocks == expected:
        # one time per block: token i reads the time of its block, position // block_size
        if positions is None:
            positions = torch.arange(seq_len, device=t.device).expand(t.shape[0], -1)  # [B, L]
        elif positions.shape != (t.shape[0], seq_len):
            raise ValueError(
                f"`positions` must have shape [B, L] = {(t.shape[0], seq_len)}, got {tuple(positions.shape)}."
            )
        block = positions.to(t.device) // block_size  # [B, L]
        if bool((block >= num_blocks).any()):
            raise ValueError(
                f"`positions` reach block {int(block.max())}, but `t` has {num_blocks} times per sequence (shape "
                f"{tuple(t.shape)}); give one time per block the positions reach, or one time per token."
            )
        return t.gather(1, block)  # [B, L]
    if num_blocks == seq_len:
        return t  # already one time per token
    if block_size is None:
        raise ValueError(
            f"`t` has {num_blocks} times per sequence (shape {tuple(t.shape)}) but `block_size` is None; pass the "
            "block size, or one time per sequence with shape [B, 1]."
        )
    raise ValueError(
        f"`t` must have ceil(seq_len / block_size) = {expected} times per sequence for seq_len={seq_len} and "
        f"block_size={block_size}, got shape {tuple(t.shape)}; use sample_time(batch_size, {expected})."
    )


def group_time(
    draws: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor, block_size: int | None = None
) -> torch.Tensor:
    """Per-token time with one time per noise group: a block of a document, or a whole document.

    Under packing (several documents per row) and left padding, the blocks of the attention pattern follow token
    positions inside each document, not columns. The noise must follow the same groups: every block of every
    document gets its own time (BD3-LM, Efficient-DLM), and without blocks every document gets its own time.
    Token `i` reads the draw at the first column of its group, so the times of different groups are independent.

    Args:
        draws (`torch.Tensor` of shape `[B, L]`): one time per column (`sample_time(B, L)`).
        positions (`torch.LongTensor` of shape `[B, L]`): position of each token inside its document.
        doc_ids (`torch.LongTensor` of shape `[B, L]`): document of each token (a change starts a new group).
        block_size (`int`, *optional*): tokens per block; groups are `(document, position // block_size)`.

    Returns:
        `torch.Tensor` of shape `[B, L]`: the time of each token's group.

    Example:
    ```python
    >>> import torch
    >>> from peft_diffusion.noise import group_time
    >>> draws = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    >>> positions, doc_ids = torch.tensor([[0, 1, 2, 0, 1, 2]]), torch.tensor([[0, 0, 0, 1, 1, 1]])
    >>> group_time(draws, positions, doc_ids, block_size=2)
    tensor([[0.1000, 0.1000, 0.3000, 0.4000, 0.4000, 0.6000]])
    ```
    """
    if not draws.shape == positions.shape == doc_ids.shape:
        raise ValueError(
            f"`draws`, `positions` and `doc_ids` must have one shape [B, L], got {tuple(draws.shape)}, "
            f"{tuple(positions.shape)} and {tuple(doc_ids.shape)}."
        )
    starts = torch.ones_like(positions, dtype=torch.bool)  # [B, L]
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    if block_size is not None:
        starts |= positions % block_size == 0
    columns = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)  # [B, L]
    group_start = torch.where(starts, columns, 0).cummax(dim=-1).values  # [B, L]
    return draws.gather(1, group_start)  # [B, L]
