"""Unmasking rules for masked-diffusion decoding: which masked positions of the active block to commit each step.

The denoising loop (`decoding.py`) decides *how many* positions a step commits and calls the model; this module is
pure tensor math over the model's logits and decides *which* ones. It never calls a model and imports only torch.

Notation (shared with `noise.py`; shapes are per call of one denoising step on the active block):

| symbol          | shape       | meaning                                                                          |
|-----------------|-------------|----------------------------------------------------------------------------------|
| `B`, `L`, `V`   |             | batch size, active-block length, vocabulary size                                 |
| `logits`        | `[B, L, V]` | model output at every block position                                             |
| `tokens`        | `[B, L]`    | proposed token x_0^i for every position (greedy or sampled)                      |
| `probs`         | `[B, L, V]` | the (temperature-scaled, top-k / top-p filtered) distribution `tokens` came from |
| `confidence`    | `[B, L]`    | a sampler's score; higher commits first; every built-in score lies in `[0, 1]`   |
| `is_masked`     | `[B, L]`    | True where the position still holds the mask token                               |
| `num_to_commit` | `[B]`       | per-row budget of positions to commit this step                                  |
| `commit`        | `[B, L]`    | True where the step writes `tokens` into the sequence (always within `is_masked`)|
| `threshold`     | float       | Fast-dLLM parallel-decoding cut-off in `(0, 1]`                                  |

One denoising step (`step`):
    1. Propose a token for every position (`propose_tokens`): greedy at temperature 0, else Gumbel-max sampling from
       the filtered distribution. The mask token is never proposed.
    2. Score every position with a registered sampler (`Sampler.confidence`); non-masked positions score -inf.
    3. Select positions to commit: the `num_to_commit` best per row (`select_topk`, LLaDA), or every position whose
       score reaches `threshold` and at least the best one (`select_threshold`, Fast-dLLM).

Samplers (registry `SAMPLERS`, keys are the `sampler` config values):
    - `confidence`: probability of the proposed token, LLaDA's "low-confidence remasking" (Nie et al. 2025,
      arXiv:2502.09992); also the score Fast-dLLM thresholds (Wu et al. 2025, arXiv:2505.22618).
    - `random`: uniform scores from the generator, LLaDA's "random remasking" baseline (= MDLM/D3PM ancestral order).
    - `margin`: top-1 minus top-2 probability, the "top probability margin" of Kim et al. 2025 (arXiv:2502.06768),
      also Dream-7B's `topk_margin` (Ye et al. 2025, arXiv:2508.15487).
    - `entropy`: exp(-entropy) of the position's distribution, so low-entropy positions commit first; the ordering
      of Dream's `entropy` rule (negative entropy), mapped into `(0, 1]` so a `threshold` reads the same way for
      every sampler.
    - `left_to_right`: the leftmost masked position first, whatever the model says (`1 / (1 + i)` at window index
      `i`); with one token per step it is the sampler whose exact likelihood `loglikelihood(...,
      estimator="left_to_right")` computes, and a converted AR model's own order.
    - `prefix`: left to right, in runs: the score of a masked position is the running minimum of the proposed
      tokens' probabilities over the masked positions from the left up to it. With a `threshold` a step commits the
      longest run of masked positions from the left whose probabilities all reach it (at least the leftmost one),
      so a converted AR model decodes in its own order and still commits several tokens where it is sure; with a
      fixed budget it commits the leftmost ones. A sampler marks this with `contiguous = True`; `step` takes the
      running minimum, because only it knows which positions are masked.
    Peng et al. 2025 ("Path Planning", arXiv:2502.03540) frame such scores as unmasking planners.

`num_tokens_per_step` is LLaDA's schedule of how many tokens each step commits (an even split over the steps); the
decoding plan (`decoding.DecodingPlan`) calls it once per call with each row's own steps per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

__all__ = [
    "SAMPLERS",
    "ConfidenceSampler",
    "EntropySampler",
    "LeftToRightSampler",
    "MarginSampler",
    "PrefixSampler",
    "RandomSampler",
    "Sampler",
    "get_sampler",
    "num_tokens_per_step",
    "propose_tokens",
    "register_sampler",
    "select_threshold",
    "select_topk",
    "step",
]


# ----------------------------------------------------------------------------------------------------------------------
# Token proposal
# ----------------------------------------------------------------------------------------------------------------------


def propose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    mask_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Propose a token for every position, and return the distribution it came from.

    Outline:
        1. Forbid the mask token (its logit becomes -inf), so a step can never "commit" a mask.
        2. Scale by the temperature (none at temperature 0), then keep the top-k logits, then the top-p nucleus
           (the order of transformers' logits warpers).
        3. `probs = softmax(filtered logits)`: the distribution a sampler scores confidence on.
        4. Temperature 0: `tokens = argmax`. Otherwise Gumbel-max: `argmax(filtered logits + Gumbel noise)` is an
           exact sample from `probs`, drawn with `generator`.

    Args:
        logits (`torch.Tensor` of shape `[B, L, V]`):
            Model logits at the positions to propose for (any float dtype; computed in float32).
        temperature (`float`, defaults to `0.0`):
            Sampling temperature, `>= 0`; `0` is greedy argmax and deterministic.
        top_k (`int`, *optional*):
            Keep only the `top_k` largest logits per position (`>= 1`; clamped to `V`).
        top_p (`float`, *optional*):
            Keep the smallest set of tokens whose probability mass reaches `top_p`, in `(0, 1]`.
        generator (`torch.Generator`, *optional*):
            Source of the Gumbel noise when `temperature > 0`; same seed, same tokens.
        mask_token_id (`int`, *optional*):
            Id of the mask token, never proposed.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: `tokens` (`torch.long`, shape `[B, L]`) and `probs` (`torch.float32`,
        shape `[B, L, V]`), the temperature-scaled, filtered softmax (zero on filtered tokens and the mask token).

    Example:
        ```python
        >>> import torch
        >>> from peft_diffusion.samplers import propose_tokens
        >>> logits = torch.tensor([[[0.0, 1.0, 5.0]]])  # B=1, L=1, V=3; id 2 is the mask token
        >>> tokens, probs = propose_tokens(logits, mask_token_id=2)
        >>> tokens.tolist(), probs[0, 0, 2].item()
        ([[1]], 0.0)
        ```
    """
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0 is greedy), got temperature={temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"`top_k` must be >= 1 or None, got top_k={top_k}; use None to disable top-k filtering.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_p` must be in (0, 1] or None, got top_p={top_p}; use None to disable top-p filtering.")

    # 1. The mask token is never proposed.
    logits = logits.float()  # [B, L, V]
    if mask_token_id is not None:
        logits = logits.clone()
        logits[..., mask_token_id] = -math.inf

    # 2. Temperature, then top-k, then top-p.
    if temperature > 0:
        logits = logits / temperature  # [B, L, V]
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, L, 1]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)  # [B, L, V]
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)  # [B, L, V] each
        sorted_probs = sorted_logits.softmax(dim=-1)  # [B, L, V]
        # Drop a token when the mass strictly before it already reaches top_p; the most likely token always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, L, V]
        is_outside_sorted = mass_before >= top_p  # [B, L, V]
        is_outside = is_outside_sorted.scatter(-1, sorted_ids, is_outside_sorted)  # [B, L, V], vocabulary order
        logits = logits.masked_fill(is_outside, -math.inf)  # [B, L, V]

    # 3. The distribution confidence is scored on.
    probs = logits.softmax(dim=-1)  # [B, L, V]

    # 4. Greedy, or an exact sample by Gumbel-max: argmax(logits + G), G = -log(-log U), U ~ Uniform(0, 1).
    if temperature == 0:
        tokens = logits.argmax(dim=-1)  # [B, L]
    else:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device)  # [B, L, V]
        uniform = uniform.clamp_(min=torch.finfo(uniform.dtype).tiny)  # log(0) would give a -inf score, not a draw
        gumbel = -torch.log(-torch.log(uniform))  # [B, L, V]
        tokens = (logits + gumbel).argmax(dim=-1)  # [B, L]
    return tokens, probs


# ----------------------------------------------------------------------------------------------------------------------
# Samplers: a confidence score per position
# ----------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Sampler(Protocol):
    """Scores every position; the denoising step commits the highest-scoring masked positions first.

    Any object with this method works as a sampler (pass the instance as `sampler`); registration is only needed to
    select it by name from a config.
    """

    def confidence(
        self, probs: torch.Tensor, tokens: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Score each position.

        Args:
            probs (`torch.Tensor` of shape `[B, L, V]`): the distribution `tokens` came from (`propose_tokens`).
            tokens (`torch.Tensor` of shape `[B, L]`): the proposed tokens.
            generator (`torch.Generator`, *optional*): for samplers that draw random scores.

        Returns:
            `torch.Tensor` of shape `[B, L]` (float): higher commits first.
        """
        ...


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(name: str) -> Callable[[type], type]:
    """Class decorator adding a sampler class to `SAMPLERS` under `name` (the value of the `sampler` setting).

    Args:
        name (`str`): the registry key, lower_snake.

    Returns:
        The decorator, which returns the class unchanged.

    Example:
        ```python
        >>> from dataclasses import dataclass
        >>> import torch
        >>> from peft_diffusion.samplers import SAMPLERS, register_sampler
        >>> @register_sampler("leftmost")
        ... @dataclass(frozen=True)
        ... class LeftmostSampler:
        ...     def confidence(self, probs, tokens, *, generator=None):
        ...         return -torch.arange(tokens.shape[1], dtype=torch.float32).expand(tokens.shape)
        >>> "leftmost" in SAMPLERS
        True
        >>> del SAMPLERS["leftmost"]
        ```
    """

    def decorator(cls: type) -> type:
        if name in SAMPLERS:
            raise ValueError(
                f"`sampler` name {name!r} is already registered to {SAMPLERS[name].__name__}; pick another name."
            )
        SAMPLERS[name] = cls
        return cls

    return decorator


def get_sampler(sampler: str | Sampler) -> Sampler:
    """Return a sampler instance from a registered name, or the given object if it already is a sampler.

    Args:
        sampler (`str` or `Sampler`): a key of `SAMPLERS`, or any object with a `confidence` method.

    Returns:
        `Sampler`: the sampler instance.

    Example:
        ```python
        >>> from peft_diffusion.samplers import get_sampler
        >>> get_sampler("margin")
        MarginSampler()
        ```
    """
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ValueError(
                f"`sampler` must be one of {sorted(SAMPLERS)}, got sampler={sampler!r}; register a new one with "
                "`@register_sampler(name)` or pass an object with a `confidence(probs, tokens, *, generator)` method."
            )
        return SAMPLERS[sampler]()
    if isinstance(sampler, Sampler):
        return sampler
    raise TypeError(
        f"`sampler` must be a name in {sorted(SAMPLERS)} or an object with a `confidence(probs, tokens, *, generator)` "
        f"method, got {type(sampler).__name__}."
    )


@register_sampler("confidence")
@dataclass(frozen=True)
class ConfidenceSampler:
    """LLaDA low-confidence remasking: the score is the probability of the proposed token, `probs[b, i, tokens[b, i]]`.

    LLaDA (arXiv:2502.09992); the same score Fast-dLLM (arXiv:2505.22618) compares with its threshold.
    """

    def confidence(
        self, probs: torch.Tensor, tokens: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, L]


@register_sampler("random")
@dataclass(frozen=True)
class RandomSampler:
    """Random remasking: i.i.d. Uniform[0, 1) scores from `generator`, ignoring the model (LLaDA's baseline).

    With a threshold this commits each masked position with probability `1 - threshold` (and at least one).
    """

    def confidence(
        self, probs: torch.Tensor, tokens: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.rand(tokens.shape, generator=generator, device=probs.device)  # [B, L]


@register_sampler("margin")
@dataclass(frozen=True)
class MarginSampler:
    """Top probability margin: `p_(1) - p_(2)`, the gap between the two most likely tokens (in `[0, 1]`).

    Kim et al. 2025 (arXiv:2502.06768, "Train for the Worst, Plan for the Best"), Dream's `topk_margin`. A threshold
    commits positions where the runner-up is at least `threshold` less likely than the favourite.
    """

    def confidence(
        self, probs: torch.Tensor, tokens: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        top2 = probs.topk(2, dim=-1).values  # [B, L, 2]
        return top2[..., 0] - top2[..., 1]  # [B, L]


@register_sampler("entropy")
@dataclass(frozen=True)
class EntropySampler:
    """Low entropy first: the score is `exp(-H)`, `H = -sum_v p_v log p_v`, in `(0, 1]`.

    `exp(-H)` orders positions exactly as Dream's negative entropy `-H` (Ye et al. 2025) and is the inverse of the
    distribution's perplexity (its "effective number of candidates"), so a threshold `tau` commits positions with at
    most `1 / tau` effective candidates; a one-hot distribution scores 1.
    """

    def confidence(
        self, probs: torch.Tensor, tokens: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # [B, L]; xlogy gives 0 log 0 = 0
        return torch.exp(-entropy)  # [B, L]


@register_sampler("left_to_right")
@dataclass(frozen=True)
class LeftToRightSampler:
    """Left to right: the score `1 / (1 + i)` falls with the index `i` of the position in the window (in `(0, 1]`),
    so the leftmost masked position commits first, whatever the model says.

    With one token per step (`steps` = the answer length) the decoder writes each block left to right, the order a
    converted AR model knows, and `loglikelihood(..., estimator="left_to_right")` / `nll_per_token` give the exact
    likelihood of what this sampler draws. A `threshold` is read against the position, not the model (above 1/2:
    one token per step); it is no confidence test here.
    """

    def confidence(
        self, probs: torch.Tensor, tokens: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        index = torch.arange(tokens.shape[-1], device=probs.device, dtype=torch.float32)  # [L]
        return (1.0 / (1.0 + index)).expand(tokens.shape)  # [B, L]


@register_sampler("prefix")
@dataclass(frozen=True)
class PrefixSampler(ConfidenceSampler):
    """Left to right in confident runs: scores the proposed token's probability, and `step` turns it into its running
    minimum over the masked positions from the left (`contiguous`), so the leftmost masked position always scores
    highest and a position reaches `threshold` only if it and every masked position before it do.

    With `threshold` a step commits the longest such run from the left, and at least the leftmost masked position;
    never a confident position beyond an unsure one: the order a converted AR model was trained in, with
    Fast-dLLM's parallelism where the model is sure. With one token per step it is the `left_to_right` sampler.
    """

    contiguous: ClassVar[bool] = True  # the score is `ConfidenceSampler`'s; `step` takes its running minimum


# ----------------------------------------------------------------------------------------------------------------------
# Selection rules: which masked positions to commit
# ----------------------------------------------------------------------------------------------------------------------


def select_topk(confidence: torch.Tensor, is_masked: torch.Tensor, num_to_commit: torch.Tensor) -> torch.Tensor:
    """Per row, commit the `num_to_commit` highest-confidence masked positions (LLaDA's fixed budget per step).

    Never commits more positions than the row has masked, and nothing in a row whose budget is 0. Vectorised: rank
    every position by (masked first, then confidence descending) with two stable sorts and compare ranks with the
    budget; masked positions thus win even where their confidence is -inf.

    Args:
        confidence (`torch.Tensor` of shape `[B, L]`): sampler scores, higher first.
        is_masked (`torch.Tensor` of shape `[B, L]`, bool): positions that may be committed.
        num_to_commit (`torch.Tensor` of shape `[B]`, long): the per-row budget.

    Returns:
        `torch.Tensor` of shape `[B, L]`, bool: `commit`, a subset of `is_masked`.

    Example:
        ```python
        >>> import torch
        >>> from peft_diffusion.samplers import select_topk
        >>> confidence = torch.tensor([[0.9, 0.1, 0.5, 0.7]])
        >>> is_masked = torch.tensor([[False, True, True, True]])
        >>> select_topk(confidence, is_masked, torch.tensor([2])).tolist()
        [[False, False, True, True]]
        ```
    """
    batch_size, length = confidence.shape
    # Secondary key (confidence, descending) first, then a stable sort on the primary key (masked first).
    by_confidence = torch.sort(confidence, dim=-1, descending=True, stable=True).indices  # [B, L]
    masked_first = torch.sort(
        is_masked.gather(-1, by_confidence).to(torch.uint8), dim=-1, descending=True, stable=True
    ).indices  # [B, L], positions into by_confidence
    order = by_confidence.gather(-1, masked_first)  # [B, L], position ids, best first
    positions = torch.arange(length, device=confidence.device).expand(batch_size, length)  # [B, L]
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # [B, L], rank of each position
    budget = torch.minimum(num_to_commit.to(rank.device), is_masked.sum(dim=-1)).reshape(-1, 1)  # [B, 1]
    # Masked positions rank first and budget <= their count, so the commit stays within is_masked.
    return rank < budget  # [B, L]


def select_threshold(
    confidence: torch.Tensor,
    is_masked: torch.Tensor,
    threshold: float,
    *,
    num_to_commit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast-dLLM confidence-aware parallel decoding: commit every masked position scoring at least `threshold`.

    Fast-dLLM (Wu et al. 2025, arXiv:2505.22618) commits all masked positions whose confidence passes the
    threshold and, so that every step makes progress, always the best masked position of a row that still has masks.
    With `num_to_commit`, each row also commits at least its `select_topk` budget (the union of both rules).

    The threshold applies to whatever score the sampler returns: the proposed token's probability for `confidence`,
    the top-1/top-2 gap for `margin`, `exp(-entropy)` for `entropy`, a uniform draw for `random`; all in `[0, 1]`.

    Args:
        confidence (`torch.Tensor` of shape `[B, L]`): sampler scores, higher first.
        is_masked (`torch.Tensor` of shape `[B, L]`, bool): positions that may be committed.
        threshold (`float`): the cut-off, in `(0, 1]`.
        num_to_commit (`torch.Tensor` of shape `[B]`, long, *optional*): a per-row minimum number of commits.

    Returns:
        `torch.Tensor` of shape `[B, L]`, bool: `commit`, a subset of `is_masked`.

    Example:
        ```python
        >>> import torch
        >>> from peft_diffusion.samplers import select_threshold
        >>> confidence = torch.tensor([[0.95, 0.92, 0.3], [0.2, 0.6, 0.1]])
        >>> is_masked = torch.ones(2, 3, dtype=torch.bool)
        >>> select_threshold(confidence, is_masked, 0.9).tolist()
        [[True, True, False], [False, True, False]]
        ```
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"`threshold` must be in (0, 1], got threshold={threshold}; use e.g. 0.9, or None for a fixed "
            "number of tokens per step."
        )
    commit = is_masked & (confidence >= threshold)  # [B, L]
    # At least one commit per row while it has masks: its best masked position.
    at_least = torch.ones(confidence.shape[0], dtype=torch.long, device=confidence.device)  # [B]
    if num_to_commit is not None:
        at_least = torch.maximum(at_least, num_to_commit.to(at_least.device))  # [B]
    return commit | select_topk(confidence, is_masked, at_least)  # [B, L]


def select_entropy_bound(
    confidence: torch.Tensor,
    entropy: torch.Tensor,
    is_masked: torch.Tensor,
    bound: float,
    num_to_commit: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Entropy-bounded selection (the EB sampler, Ben-Hamu et al. 2025): commit masked positions in the sampler's
    order while the summed entropy of the chosen set, less its largest entropy, stays within `bound`.

    With positions sorted by decreasing `confidence`, the chosen prefix `U` is the longest with
    `sum_{i in U} H_i - max_{i in U} H_i <= bound` (nats): an upper bound on the joint error of committing `U` at
    once rather than one by one. The left side never decreases along the order, so the chosen set is a prefix. At
    least one position (and at least `num_to_commit`) is committed while a row has masks. `bound = 0` commits one
    position per step (plus exact ties at zero entropy).

    Args:
        confidence (`torch.Tensor` of shape `[B, L]`): sampler scores (higher first).
        entropy (`torch.Tensor` of shape `[B, L]`): entropy of each position's proposal distribution (nats).
        is_masked (`torch.Tensor` of shape `[B, L]`, bool): positions that may be committed.
        bound (`float`): the entropy budget `gamma >= 0`.
        num_to_commit (`torch.Tensor` of shape `[B]`, *optional*): a per-row minimum.

    Returns:
        `torch.Tensor` of shape `[B, L]`, bool: `commit`, a subset of `is_masked`.

    Example:
        ```python
        >>> import torch
        >>> from peft_diffusion.samplers import select_entropy_bound
        >>> confidence = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
        >>> entropy = torch.tensor([[0.1, 0.2, 0.3, 0.5]])
        >>> select_entropy_bound(confidence, entropy, torch.ones(1, 4, dtype=torch.bool), 0.35).tolist()
        [[True, True, True, False]]
        ```
    """
    if not (isinstance(bound, (int, float)) and not isinstance(bound, bool) and math.isfinite(bound) and bound >= 0):
        raise ValueError(f"`entropy_bound` must be a finite number >= 0 (nats), got entropy_bound={bound!r}.")
    order = confidence.masked_fill(~is_masked, -math.inf).argsort(dim=-1, descending=True)  # [B, L]
    valid = is_masked.gather(-1, order)  # [B, L], masked positions first
    sorted_entropy = entropy.float().gather(-1, order).masked_fill(~valid, 0.0)  # [B, L]
    spent = sorted_entropy.cumsum(-1) - sorted_entropy.cummax(-1).values  # [B, L], nondecreasing
    chosen = ((spent <= bound) & valid).sum(-1)  # [B]
    num_masked = is_masked.sum(-1)  # [B]
    at_least = num_masked.clamp(max=1)  # [B]
    if num_to_commit is not None:
        at_least = torch.maximum(at_least, num_to_commit.to(at_least.device).clamp(max=num_masked))  # [B]
    chosen = torch.maximum(chosen, at_least)  # [B]
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)  # [B, L]
    commit_sorted = ranks < chosen[:, None]  # [B, L]
    return torch.zeros_like(is_masked).scatter(-1, order, commit_sorted) & is_masked  # [B, L]


def num_tokens_per_step(num_masked: torch.Tensor, steps: int | torch.Tensor) -> torch.Tensor:
    """LLaDA's schedule: split each masked count evenly over its denoising steps.

    Each step commits `num_masked // steps`, and the first `num_masked % steps` steps one more (LLaDA's
    `get_num_transfer_tokens`, linear noise schedule), so a count is fully decoded after exactly `steps` steps.
    `steps` is one number for every count, or a tensor of counts shaped like `num_masked` (the decoding plan gives
    each row and block its own); the schedule then has `steps.max()` columns (one host sync) and a count's columns
    past its own steps are 0.

    Args:
        num_masked (`torch.Tensor` of shape `[...]`, long): masked positions per row (or per row and block) at the
            start of the block.
        steps (`int` or `torch.Tensor` of shape `[...]`, long): denoising steps, `>= 1` (a tensor may hold 0 where
            `num_masked` is 0).

    Returns:
        `torch.Tensor` of shape `[..., S]`, long (`S = steps`, or `steps.max()`): tokens to commit per count and
        step; each count's row sums to it.

    Example:
        ```python
        >>> import torch
        >>> from peft_diffusion.samplers import num_tokens_per_step
        >>> num_tokens_per_step(torch.tensor([10, 3]), 4).tolist()
        [[3, 3, 2, 2], [1, 1, 1, 0]]
        >>> num_tokens_per_step(torch.tensor([10, 3]), torch.tensor([4, 2])).tolist()
        [[3, 3, 2, 2], [2, 1, 0, 0]]
        ```
    """
    num_masked = num_masked.long()[..., None]  # [..., 1]
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError(f"`steps` must be >= 1, got steps={steps}; use at least one denoising step per block.")
        width = steps
    else:
        steps = steps.long().to(num_masked.device)[..., None]  # [..., 1]
        if bool(((steps < 1) & (num_masked > 0)).any() | (steps < 0).any()):
            raise ValueError(
                f"`steps` must be >= 1 wherever `num_masked` > 0 (and never negative), got steps={steps[..., 0]} "
                f"for num_masked={num_masked[..., 0]}; give every count with masked positions at least one step."
            )
        width = max(int(steps.max()), 1) if steps.numel() else 1
    step_ids = torch.arange(width, device=num_masked.device)  # [S]
    safe_steps = torch.as_tensor(steps, device=num_masked.device).clamp(min=1)  # [..., 1] or scalar
    base = num_masked // safe_steps  # [..., 1]
    remainder = num_masked % safe_steps  # [..., 1]
    return torch.where(step_ids < safe_steps, base + (step_ids < remainder).long(), 0)  # [..., S]


# ----------------------------------------------------------------------------------------------------------------------
# One denoising step
# ----------------------------------------------------------------------------------------------------------------------


def step(
    logits: torch.Tensor,
    is_masked: torch.Tensor,
    num_to_commit: torch.Tensor | None,
    *,
    sampler: str | Sampler = "confidence",
    threshold: float | None = None,
    entropy_bound: float | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    mask_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the tokens and the positions one denoising step commits on the active block.

    Outline:
        1. Propose a token and its distribution at every position (`propose_tokens`).
        2. Score positions with the sampler; non-masked positions get -inf, so only masked ones are ever committed.
        3. Select: `select_threshold` if `threshold` is set, `select_entropy_bound` if `entropy_bound` is set (both
           with `num_to_commit` as a minimum), else `select_topk`.

    The caller writes the step with `torch.where(commit, tokens, noisy_ids)`.

    Args:
        logits (`torch.Tensor` of shape `[B, L, V]`): model logits on the active block.
        is_masked (`torch.Tensor` of shape `[B, L]`, bool): positions still holding the mask token.
        num_to_commit (`torch.Tensor` of shape `[B]`, long, *optional*): per-row budget (e.g. a column of
            `num_tokens_per_step`); required without `threshold`, a per-row minimum with it.
        sampler (`str` or `Sampler`, defaults to `"confidence"`): a key of `SAMPLERS` or a sampler instance.
        threshold (`float`, *optional*): Fast-dLLM threshold in `(0, 1]`; None for a fixed budget per step.
        entropy_bound (`float`, *optional*): the EB sampler's entropy budget (nats, `select_entropy_bound`); not
            together with `threshold`.
        temperature (`float`, defaults to `0.0`): see `propose_tokens`.
        top_k (`int`, *optional*): see `propose_tokens`.
        top_p (`float`, *optional*): see `propose_tokens`.
        generator (`torch.Generator`, *optional*): used for sampling and for random scores.
        mask_token_id (`int`, *optional*): never proposed.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: `tokens` (`[B, L]`, long, a proposal for every position) and `commit`
        (`[B, L]`, bool, a subset of `is_masked`).

    Example:
        ```python
        >>> import torch
        >>> from peft_diffusion.samplers import step
        >>> logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 9.0]]])  # id 2 is the mask token
        >>> is_masked = torch.tensor([[True, True, False]])
        >>> tokens, commit = step(logits, is_masked, torch.tensor([1]), mask_token_id=2)
        >>> tokens.tolist(), commit.tolist()
        ([[0, 1, 0]], [[True, False, False]])
        ```
    """
    if threshold is not None and entropy_bound is not None:
        raise ValueError(
            f"Pass one adaptive rule: `threshold` or `entropy_bound`, got threshold={threshold} and "
            f"entropy_bound={entropy_bound}."
        )
    if threshold is None and entropy_bound is None and num_to_commit is None:
        raise ValueError(
            "`num_to_commit` is required when `threshold` is None, got num_to_commit=None; pass a column of "
            "`num_tokens_per_step(...)` or set a `threshold`."
        )
    scorer = get_sampler(sampler)

    # 1. Proposal.
    tokens, probs = propose_tokens(
        logits,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        mask_token_id=mask_token_id,
    )  # [B, L], [B, L, V]

    # 2. Scores; only masked positions compete.
    confidence = scorer.confidence(probs, tokens, generator=generator).float()  # [B, L]
    if getattr(scorer, "contiguous", False):  # a run from the left: the running minimum over masked positions
        confidence = confidence.masked_fill(~is_masked, math.inf).cummin(dim=-1).values  # [B, L]
    confidence = confidence.masked_fill(~is_masked, -math.inf)  # [B, L]

    # 3. Selection.
    if threshold is not None:
        commit = select_threshold(confidence, is_masked, threshold, num_to_commit=num_to_commit)  # [B, L]
    elif entropy_bound is not None:
        entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1)  # [B, L] nats
        commit = select_entropy_bound(confidence, entropy, is_masked, entropy_bound, num_to_commit)  # [B, L]
    else:
        commit = select_topk(confidence, is_masked, num_to_commit)  # [B, L]
    return tokens, commit
