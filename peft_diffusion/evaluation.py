r"""Evaluation of a diffusion LM: Monte-Carlo ELBO likelihoods.

A masked diffusion LM has no tractable likelihood; it has an evidence lower bound (ELBO). This module estimates that
bound by Monte Carlo with the low-variance estimator of LLaDA (arXiv 2502.09992, Eq. 14). The lm-evaluation-harness
model built on it is `peft_diffusion.integrations.lm_eval` (the `eval` extra).

Notation (as in `noise.py`):

| name        | meaning                                                                                     |
|-------------|---------------------------------------------------------------------------------------------|
| `c`         | the context (prompt) tokens, never masked                                                   |
| `y`         | the continuation, `n` tokens, the targets                                                   |
| `G`         | a group of targets scored together: all of `y`, or (block attention) the targets of a block |
| `n_G`       | number of targets in `G`                                                                     |
| `k`         | number of masked targets of a group in one sample, in `1..n_G`                               |
| `S`         | the masked targets (`|S| = k`), a uniformly random subset of `G` of size `k`                 |
| `l_i(S)`    | `log p_theta(y_i | c, y with S masked)`, read from the logits at position `i`                   |
| `M`         | `mc_samples`, the number of Monte-Carlo samples per (context, continuation) pair              |

The estimator. For the linear schedule the continuous-time ELBO (DiffuLLaMA Eq. 6, MDLM) of a group is

    ELBO_G = int_0^1 (1/t) E_{S ~ Bernoulli(t)^{n_G}} [ sum_{i in S} l_i(S) ] dt
           = sum_{k=1}^{n_G} (1/k) E_{|S| = k} [ sum_{i in S} l_i(S) ]                              (1)
           = E_{k ~ U{1..n_G}} E_{|S| = k} [ (n_G / k) sum_{i in S} l_i(S) ]                         (2)

because `P(|S| = k) = C(n, k) t^k (1 - t)^(n - k)` and `int_0^1 t^(k-1) (1 - t)^(n-k) dt = 1 / (k C(n, k))`. Form (2)
is LLaDA's estimator: it draws the number of masked tokens instead of the time, which removes the variance of the
binomial mask count and of the `1/t` weight. (1) is also the any-order autoregressive bound
`E_sigma [ sum_j log p(y_sigma(j) | c, y_sigma(<j)) ]` over uniformly random orders sigma (MDLM, RADD): by Jensen it is
at most `log E_sigma [ prod_j p(y_sigma(j) | ...) ]`, the exact log-likelihood of `y` under the random-order
one-token-at-a-time sampler, which `tests/test_evaluation.py` enumerates.

We draw `k` stratified over the `M` samples, `k_j = floor(n_G (u + j) / M) + 1` with one `u ~ U[0, 1)` per group (and
the strata shuffled across samples), so that every `k` gets its share of samples; `S_j` is uniform given `k_j`. Each
sample `j` gives `X_j = sum_G (n_G / k_{G,j}) sum_{i in S_{G,j}} l_i(S_{G,j})`, and the estimate is `mean_j X_j` with
standard error `std_j(X_j) / sqrt(M)` (the i.i.d. formula; conservative for stratified draws).

Blocks. Under block attention the model is block-autoregressive: `log p(y | c) = sum_b log p(y_b | c, y_<b)`, the
blocks `b` being the model's blocks (aligned at position 0 of `c`) that hold targets, and each term is bounded by the
group ELBO (2) of the targets of block `b` given the clean earlier blocks. Context tokens inside a target block stay
clean. With `clean_context` one forward pass on the two-stream layout `[x_t ; x_0]` scores every block at once
(noisy block `b` sees itself and the clean copies of the blocks before it, as in training). Without it, block `b` is
scored on the input truncated at its end, earlier blocks clean (what the decoder sees through its KV cache); later
blocks are absent. Under bidirectional (or annealed, which runs bidirectionally at inference) attention there is one
group, `y`, and the input is `c ; y`.

The deterministic alternative (`estimator="left_to_right"`). Within each group, score the targets in the order the
semi-autoregressive decoder commits them when it writes one token per step from left to right: row `j` masks
`y_{start+j} .. y_{end-1}` of every group and reads `l_{start+j}`, so the rows sum to

    LTR = sum_G sum_{i in G} log p(y_i | c, earlier blocks, y_{start_G .. i-1})                      (3)

the exact log-likelihood of `y` under that one-token-per-step left-to-right sampler (`generate(...,
sampler="left_to_right", steps=max_new_tokens)`; one term of the any-order mixture of (1), so not a bound on it),
with no sampling variance: one forward per position of the largest group
(the block size under block attention with clean context). For ranking answers it replaces many Monte-Carlo samples
by a few forwards; it favours models that decode left to right, as converted AR models do.

With `block_size = 1`, clean context and shift, every group is a single token (`k = n_G = 1`) and the estimate is
deterministic: `sum_i log p(y_i | c, y_<i)`, the causal LM's own log-likelihood (the AR-equivalent case).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter_views import lean_inference
from .architectures import context_window
from .conversion import token_rows_merged
from .generation import _check_token_ids

__all__ = [
    "ESTIMATORS",
    "LikelihoodEstimate",
    "PerplexityBound",
    "ar_nll_per_token",
    "loglikelihood",
    "loglikelihood_batch",
    "nll_per_token",
]

# `loglikelihood(..., estimator=...)`: the Monte-Carlo ELBO, or the deterministic left-to-right likelihood (docstring)
ESTIMATORS = ("elbo", "left_to_right")


@dataclass(frozen=True)
class LikelihoodEstimate:
    """A Monte-Carlo ELBO estimate of `log p(continuation | context)`.

    Attributes:
        logprob (`float`): the estimated ELBO, a lower bound on the log-likelihood (nats).
        stderr (`float`): its standard error over the Monte-Carlo samples (0 when the estimate is exact).
        num_tokens (`int`): number of continuation tokens scored.
        is_greedy (`bool`): whether one-step greedy decoding of the fully masked continuation (each block given the
            clean earlier blocks) reproduces the continuation, lm-eval's `is_greedy`.
    """

    logprob: float
    stderr: float
    num_tokens: int
    is_greedy: bool = False


@dataclass(frozen=True)
class PerplexityBound:
    """Per-token NLL over a text dataset, from `nll_per_token`.

    Attributes:
        nll (`float`): negative log-likelihood per token (nats): with `estimator="elbo"` an upper bound on the
            model's, `-sum ELBO / num_tokens`; with `"left_to_right"` the exact NLL of its left-to-right sampler.
        perplexity (`float`): `exp(nll)` (an upper bound on the perplexity with `"elbo"`).
        stderr (`float`): standard error of `nll` (0 with `"left_to_right"`: deterministic).
        num_tokens (`int`): number of tokens scored.
    """

    nll: float
    perplexity: float
    stderr: float
    num_tokens: int


@dataclass
class _Row:
    """One forward-pass row: a noisy sequence, what it sees clean, and the per-position ELBO weights."""

    pair: int
    sample: int  # -1 for the greedy row
    noisy_ids: torch.Tensor  # [L]
    clean_ids: torch.Tensor  # [L]
    weights: torch.Tensor  # [L] n_G / k on masked targets, 0 elsewhere
    is_masked: torch.Tensor  # [L]


def _check_positive_int(name: str, value, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {name}={value!r}; {hint}")


def _check_mc_samples(mc_samples) -> None:
    _check_positive_int("mc_samples", mc_samples, "use e.g. 32 (LLaDA uses 128).")


def _check_estimator(estimator) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {list(ESTIMATORS)}, got estimator={estimator!r}.")


def _check_scorable(model, ids: torch.Tensor, name: str) -> None:
    """Token ids the ELBO can score or condition on: inside the vocabulary, and never the mask token (the model
    reads it as "unknown here" and never predicts it: as a target it scores about -3e38)."""
    _check_token_ids(model, ids, name)
    mask_token_id = model.config.mask_token_id
    where = (ids == mask_token_id).nonzero().flatten().tolist()
    if where:
        spelled = (
            f" (the string {model.config.mask_token!r} in a text encodes to it)" if model.config.mask_token else ""
        )
        raise ValueError(
            f"{name} holds the mask token (id {mask_token_id}) at index {where[0]}: a masked diffusion LM reads it as "
            f"a gap and never predicts it, so it can be neither scored nor conditioned on; remove it{spelled}."
        )


def _validate(context_ids, continuation_ids, shift: bool) -> None:
    if len(continuation_ids) == 0:
        raise ValueError(
            "`continuation_ids` is empty: there is nothing to score; pass at least one continuation token."
        )
    if shift and len(context_ids) == 0:
        raise ValueError(
            "`context_ids` is empty, but under `shift` the first token of a sequence is never predicted; prepend a "
            "BOS/EOS token as the context (lm-eval does this with its prefix token)."
        )


def _groups(num_context: int, length: int, block_size: int | None) -> list[tuple[int, int]]:
    """Target ranges `[start, end)`: the whole continuation, or its part inside each block."""
    if block_size is None:
        return [(num_context, length)]
    groups = []
    start = num_context
    while start < length:
        end = min((start // block_size + 1) * block_size, length)
        groups.append((start, end))
        start = end
    return groups


def _pair_rows(
    pair: int,
    ids: torch.Tensor,
    num_context: int,
    *,
    mc_samples: int,
    mask_token_id: int,
    block_size: int | None,
    two_stream: bool,
    generator: torch.Generator | None,
    estimator: str = "elbo",
) -> list[_Row]:
    """The rows of one (context, continuation) pair: `mc_samples` ELBO samples (or the `left_to_right` rows, all
    counted as sample 0) plus the greedy row(s).

    1. groups of targets (the continuation, or its part of each block);
    2. per group, stratified counts `k_j` (shuffled over samples) and a uniform subset of size `k_j` per sample;
    3. rows: one per sample (all groups at once: bidirectional, or block attention on the two-stream layout) or one
       per (sample, group) truncated at the group's block end (block attention without clean context).
    """
    length = ids.shape[0]
    # 1. groups
    groups = _groups(num_context, length, block_size)
    if estimator == "left_to_right":
        return _left_to_right_rows(pair, ids, num_context, groups, mask_token_id, block_size, two_stream)
    # 2. stratified counts and subsets, per group: is_masked[j, i] and weights[j, i]
    is_masked = torch.zeros(mc_samples, length, dtype=torch.bool)  # [M, L]
    weights = torch.zeros(mc_samples, length, dtype=torch.float64)  # [M, L]
    for start, end in groups:
        n = end - start
        u = torch.rand((), generator=generator, dtype=torch.float64)  # []
        strata = torch.randperm(mc_samples, generator=generator).to(torch.float64)  # [M]
        k = (n * (u + strata) / mc_samples).floor().long().clamp(max=n - 1) + 1  # [M] in 1..n
        scores = torch.rand(mc_samples, n, generator=generator)  # [M, n]
        ranks = scores.argsort(dim=1).argsort(dim=1)  # [M, n] a uniform random order per sample
        chosen = ranks < k[:, None]  # [M, n] the first k of the order: a uniform subset of size k
        is_masked[:, start:end] = chosen
        weights[:, start:end] = chosen * (n / k[:, None].to(torch.float64))
    # 3. rows
    greedy_masked = torch.zeros(length, dtype=torch.bool)  # [L]
    greedy_masked[num_context:] = True
    rows = []
    if block_size is None or two_stream:
        for j in range(mc_samples):
            rows.append(_Row(pair, j, ids.masked_fill(is_masked[j], mask_token_id), ids, weights[j], is_masked[j]))
        rows.append(
            _Row(pair, -1, ids.masked_fill(greedy_masked, mask_token_id), ids, torch.zeros(length), greedy_masked)
        )
        return rows
    for start, end in groups:
        row_end = min(-(-end // block_size) * block_size, length)  # the end of the block: later blocks absent
        in_group = torch.zeros(length, dtype=torch.bool)
        in_group[start:end] = True
        for j in range(mc_samples):
            masked = (is_masked[j] & in_group)[:row_end]
            noisy = ids[:row_end].masked_fill(masked, mask_token_id)
            rows.append(_Row(pair, j, noisy, ids[:row_end], (weights[j] * in_group)[:row_end], masked))
        masked = in_group[:row_end]
        rows.append(
            _Row(
                pair, -1, ids[:row_end].masked_fill(masked, mask_token_id), ids[:row_end], torch.zeros(row_end), masked
            )
        )
    return rows


def _left_to_right_rows(pair, ids, num_context, groups, mask_token_id, block_size, two_stream) -> list[_Row]:
    """The rows of the `left_to_right` estimator (module docstring): row `j` masks positions `start + j .. end - 1` of
    every group and scores position `start + j` (weight 1), so that the rows sum to
    `sum_G sum_j log p(y_{start+j} | c, earlier blocks, y_{start..start+j-1})`; plus the greedy row(s)."""
    length = ids.shape[0]
    rows = []
    if block_size is None or two_stream:  # every group in one row per j
        for j in range(max(end - start for start, end in groups)):
            masked = torch.zeros(length, dtype=torch.bool)
            weights = torch.zeros(length, dtype=torch.float64)
            for start, end in groups:
                if start + j < end:
                    masked[start + j : end] = True
                    weights[start + j] = 1.0
            rows.append(_Row(pair, 0, ids.masked_fill(masked, mask_token_id), ids, weights, masked))
        greedy = torch.zeros(length, dtype=torch.bool)
        greedy[num_context:] = True
        rows.append(_Row(pair, -1, ids.masked_fill(greedy, mask_token_id), ids, torch.zeros(length), greedy))
        return rows
    for start, end in groups:  # block attention without clean context: the input ends at the group's block
        row_end = min(-(-end // block_size) * block_size, length)
        for first in range(start, end):
            masked = torch.zeros(row_end, dtype=torch.bool)
            masked[first:end] = True
            weights = torch.zeros(row_end, dtype=torch.float64)
            weights[first] = 1.0
            rows.append(
                _Row(pair, 0, ids[:row_end].masked_fill(masked, mask_token_id), ids[:row_end], weights, masked)
            )
        masked = torch.zeros(row_end, dtype=torch.bool)
        masked[start:end] = True
        rows.append(
            _Row(
                pair, -1, ids[:row_end].masked_fill(masked, mask_token_id), ids[:row_end], torch.zeros(row_end), masked
            )
        )
    return rows


def _right_pad(tensors: list[torch.Tensor], width: int, value, dtype: torch.dtype, device) -> torch.Tensor:
    """Stack 1D tensors into `[len(tensors), width]`, filling the right end with `value`."""
    out = torch.full((len(tensors), width), value, dtype=dtype)
    for row, tensor in enumerate(tensors):
        out[row, : tensor.shape[0]] = tensor
    return out.to(device)


@torch.no_grad()
def _score_rows(
    model, rows: list[_Row], batch_size: int, two_stream: bool, progress: bool = False
) -> tuple[list[float], list[bool]]:
    """Per row: `sum_i weights_i * log p(y_i | x_t)`, and whether the argmax hits every masked target (greedy).
    `progress`: a tqdm bar of scored rows on stderr (plain tqdm: shown even when transformers' bars are off)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), desc="Scoring", unit="row", disable=not progress, dynamic_ncols=True)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda index: -rows[index].noisy_ids.shape[0])  # similar lengths together
    results: dict[int, tuple[float, bool]] = {}
    for first in range(0, len(order), batch_size):
        chunk = [rows[index] for index in order[first : first + batch_size]]
        width = max(row.noisy_ids.shape[0] for row in chunk)
        noisy_ids = _right_pad([row.noisy_ids for row in chunk], width, 0, torch.long, device)  # [b, W]
        clean_ids = _right_pad([row.clean_ids for row in chunk], width, 0, torch.long, device)  # [b, W]
        weights = _right_pad([row.weights for row in chunk], width, 0.0, torch.float64, device)  # [b, W]
        is_masked = _right_pad([row.is_masked for row in chunk], width, False, torch.bool, device)  # [b, W]
        attention_mask = _right_pad(
            [torch.ones_like(row.noisy_ids) for row in chunk], width, 0, torch.long, device
        )  # [b, W]
        logits = model(
            input_ids=noisy_ids,
            attention_mask=attention_mask,
            clean_input_ids=clean_ids if two_stream else None,
        ).logits  # [b, W, V]
        masked_logits = logits[is_masked].float()  # [N, V] only masked positions are scored
        targets = clean_ids[is_masked]  # [N]
        logprob = -F.cross_entropy(masked_logits, targets, reduction="none").double()  # [N]
        hit = masked_logits.argmax(-1) == targets  # [N]
        row_of = is_masked.nonzero()[:, 0]  # [N]
        row_score = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(
            0, row_of, logprob * weights[is_masked]
        )  # [b]
        row_miss = torch.zeros(len(chunk), dtype=torch.long, device=device).index_add_(0, row_of, (~hit).long())  # [b]
        for index, score, miss in zip(order[first : first + batch_size], row_score.tolist(), row_miss.tolist()):
            results[index] = (score, miss == 0)
        bar.update(len(chunk))
    bar.close()
    return [results[index][0] for index in range(len(rows))], [results[index][1] for index in range(len(rows))]


def _as_ids(ids) -> torch.Tensor:
    return torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long).flatten()


@torch.no_grad()
def loglikelihood_batch(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mc_samples: int = 32,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    estimator: str = "elbo",
    progress: bool = False,
) -> list[LikelihoodEstimate]:
    r"""Monte-Carlo ELBO estimates of `log p(continuation | context)` for many pairs, batched over samples and pairs.

    Outline:
    1. validate and truncate: the context is cut from the left so that context + continuation fit the model's
       context window (`architectures.context_window`; not cut when the window is unknown);
    2. rows: per pair, `mc_samples` masked copies with stratified mask counts (module docstring, Eq. 2), plus the
       all-masked greedy row(s);
    3. score the rows in batches of `batch_size` (right padding), on the two-stream layout under block attention
       with clean context;
    4. per pair: mean and standard error over samples (the block terms of a sample add up).

    Args:
        model (`DiffusionLM`): the diffusion LM (put in eval mode by the caller).
        requests (`Sequence[tuple[Sequence[int], Sequence[int]]]`): `(context_ids, continuation_ids)` pairs of token
            ids inside the vocabulary, without the mask token; under `shift` the context needs at least one token (a
            BOS/EOS prefix when the context is empty).
        mc_samples (`int`, defaults to 32): Monte-Carlo samples per pair, a positive integer.
        batch_size (`int`, defaults to 32): rows per forward pass, a positive integer.
        generator (`torch.Generator`, *optional*): a CPU generator, for reproducible estimates.
        estimator (`str`, defaults to `"elbo"`): `"elbo"`, the Monte-Carlo ELBO above; or `"left_to_right"`, the
            deterministic log-likelihood of the model's own semi-autoregressive decoding order (module docstring):
            no variance (`stderr` 0, `mc_samples` unused) and one forward per position of the largest group (the
            block size under block attention with clean context).
        progress (`bool`, defaults to `False`): a progress bar of the scored rows on stderr.

    Returns:
        `list[LikelihoodEstimate]`, one per request.

    Example:
    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft_diffusion import DiffusionConfig, get_diffusion_model
    >>> from peft_diffusion.evaluation import loglikelihood_batch
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                                     num_hidden_layers=1, num_attention_heads=2))
    >>> model = get_diffusion_model(base, DiffusionConfig(attention="bidirectional", mask_token_id=63)).eval()
    >>> estimates = loglikelihood_batch(model, [([1, 5], [6, 7]), ([1], [9])], mc_samples=4,
    ...                                 generator=torch.Generator().manual_seed(0))
    >>> [estimate.num_tokens for estimate in estimates]
    [2, 1]
    ```
    """
    _check_mc_samples(mc_samples)
    _check_positive_int("batch_size", batch_size, "use e.g. 32 (rows per forward pass).")
    _check_estimator(estimator)
    if estimator == "left_to_right":
        mc_samples = 1  # one deterministic sample: the sum of its rows
    config = model.config
    block_size = config.attention_block_size
    two_stream = config.uses_clean_context
    max_length = context_window(model.causal_lm.config)  # None: unknown, the context is not truncated
    rows: list[_Row] = []
    num_tokens = []
    # 1.-2. validation, truncation, rows
    for pair, (context_ids, continuation_ids) in enumerate(requests):
        context, continuation = _as_ids(context_ids), _as_ids(continuation_ids)
        _check_scorable(model, context, f"`requests[{pair}]` context")
        _check_scorable(model, continuation, f"`requests[{pair}]` continuation")
        _validate(context, continuation, config.shift)
        if max_length is not None:
            keep = max_length - continuation.shape[0]
            if keep < (1 if config.shift else 0):
                raise ValueError(
                    f"The continuation has {continuation.shape[0]} tokens but the model's context window is "
                    f"{max_length}; score it in windows with `nll_per_token`."
                )
            context = context[max(0, context.shape[0] - keep) :] if keep > 0 else context[:0]
        ids = torch.cat([context, continuation])  # [L]
        rows += _pair_rows(
            pair,
            ids,
            context.shape[0],
            mc_samples=mc_samples,
            mask_token_id=config.mask_token_id,
            block_size=block_size,
            two_stream=two_stream,
            generator=generator,
            estimator=estimator,
        )
        num_tokens.append(continuation.shape[0])
    # 3. scores
    with token_rows_merged(model), lean_inference(model):
        scores, greedy = _score_rows(model, rows, batch_size, two_stream, progress)
    # 4. per pair: sum the block terms of each sample, then mean and standard error over samples
    samples = torch.zeros(len(num_tokens), mc_samples, dtype=torch.float64)  # [P, M]
    is_greedy = [True] * len(num_tokens)
    for row, score, hit in zip(rows, scores, greedy):
        if row.sample < 0:
            is_greedy[row.pair] &= hit
        else:
            samples[row.pair, row.sample] += score
    means = samples.mean(dim=1)  # [P]
    stderrs = samples.std(dim=1) / math.sqrt(mc_samples) if mc_samples > 1 else torch.zeros_like(means)  # [P]
    return [
        LikelihoodEstimate(float(means[p]), float(stderrs[p]), num_tokens[p], is_greedy[p])
        for p in range(len(num_tokens))
    ]


def loglikelihood(
    model,
    context_ids: Sequence[int] | torch.Tensor,
    continuation_ids: Sequence[int] | torch.Tensor,
    *,
    mc_samples: int = 32,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    estimator: str = "elbo",
) -> LikelihoodEstimate:
    r"""Monte-Carlo ELBO estimate of `log p(continuation | context)`: a lower bound on the log-likelihood.

    The estimator (module docstring, Eq. 2): `mean_j sum_G (n_G / k_{G,j}) sum_{i in S_{G,j}} log p(y_i | x_t)` with
    the mask counts `k` stratified over `1..n_G`, the context clean, one group per block under block attention.

    Args:
        model (`DiffusionLM`): the diffusion LM (in eval mode).
        context_ids (`Sequence[int]` or `torch.LongTensor` of shape `(context_length,)`): the context tokens.
        continuation_ids (`Sequence[int]` or `torch.LongTensor` of shape `(continuation_length,)`): the tokens to
            score, at least one. Neither may hold the mask token or an id outside the vocabulary.
        mc_samples (`int`, defaults to 32): Monte-Carlo samples, a positive integer.
        batch_size (`int`, defaults to 32): samples per forward pass.
        generator (`torch.Generator`, *optional*): a CPU generator, for reproducible estimates.
        estimator (`str`, defaults to `"elbo"`): `"elbo"` or the deterministic `"left_to_right"` (see
            `loglikelihood_batch`).

    Returns:
        `LikelihoodEstimate` (`logprob`, `stderr`, `num_tokens`, `is_greedy`).

    Example:
    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft_diffusion import DiffusionConfig, get_diffusion_model
    >>> from peft_diffusion.evaluation import loglikelihood
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                                     num_hidden_layers=1, num_attention_heads=2))
    >>> model = get_diffusion_model(base, DiffusionConfig(attention="bidirectional", mask_token_id=63)).eval()
    >>> estimate = loglikelihood(model, [1, 5, 9], [6, 7, 8], mc_samples=8, generator=torch.Generator().manual_seed(0))
    >>> estimate.num_tokens, estimate.logprob < 0
    (3, True)
    ```
    """
    _check_scorable(model, _as_ids(context_ids), "`context_ids`")
    _check_scorable(model, _as_ids(continuation_ids), "`continuation_ids`")
    return loglikelihood_batch(
        model,
        [(context_ids, continuation_ids)],
        mc_samples=mc_samples,
        batch_size=batch_size,
        generator=generator,
        estimator=estimator,
    )[0]


def nll_per_token(
    model,
    texts: Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer=None,
    prefix_token_id: int | None = None,
    max_length: int | None = None,
    mc_samples: int = 32,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    estimator: str = "elbo",
    progress: bool = False,
) -> PerplexityBound:
    r"""Per-token NLL (bound) and perplexity of a text dataset, in rolling windows at the model's context.

    Each document `x_1..x_N` is preceded by `prefix_token_id` and cut into consecutive windows of
    `max_length - 1` tokens; each window is scored by `loglikelihood` given the token right before it (the prefix
    for the first window), so every token is scored exactly once (lm-eval's rolling windows). With the ELBO the
    bound is `nll = -sum ELBO / num_tokens` (>= the true NLL per token in expectation); with `"left_to_right"`,
    `nll = -sum LTR / num_tokens` is the exact NLL of the distribution the one-token-per-step left-to-right
    sampler draws from (module docstring, Eq. 3): a real likelihood of a real generator, not a bound on the any-order
    mixture. `perplexity = exp(nll)`.

    Args:
        model (`DiffusionLM`): the diffusion LM (in eval mode).
        texts (`Sequence[str]` or `Sequence[Sequence[int]]`): documents, as strings (needs `tokenizer`) or token ids;
            without the mask token.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): tokenizes string documents (without special tokens).
        prefix_token_id (`int`, *optional*): the token before each document; defaults to the tokenizer's (else the
            base config's) BOS token, then EOS.
        max_length (`int`, *optional*): window length including the conditioning token; defaults to the model's
            context window (`architectures.context_window`), and is required when that is unknown.
        mc_samples (`int`, defaults to 32): Monte-Carlo samples per window.
        batch_size (`int`, defaults to 32): rows per forward pass.
        generator (`torch.Generator`, *optional*): a CPU generator, for reproducible estimates.
        estimator (`str`, defaults to `"elbo"`): `"elbo"` (Monte-Carlo bound) or `"left_to_right"` (deterministic,
            `mc_samples` unused); see `loglikelihood_batch`.
        progress (`bool`, defaults to `False`): a progress bar of the scored rows on stderr.

    Returns:
        `PerplexityBound` (`nll`, `perplexity`, `stderr`, `num_tokens`).
    """
    _check_mc_samples(mc_samples)
    _check_estimator(estimator)
    max_length = max_length or context_window(model.causal_lm.config)
    if max_length is None:
        raise ValueError(
            "The model's context window is unknown (its config sets none of "
            "`architectures.CONTEXT_WINDOW_KEYS`); pass `max_length`, the window length to score in."
        )
    if max_length < 2:
        raise ValueError(f"`max_length` must be >= 2 (one conditioning token and one scored token), got {max_length}.")
    if prefix_token_id is None:
        sources = [tokenizer, model.config.base_config] if tokenizer is not None else [model.config.base_config]
        for source in sources:
            for name in ("bos_token_id", "eos_token_id"):
                value = getattr(source, name, None)
                value = value[0] if isinstance(value, (list, tuple)) else value
                if prefix_token_id is None and value is not None:
                    prefix_token_id = int(value)
    if prefix_token_id is None:
        raise ValueError("No BOS/EOS token to start documents with; pass `prefix_token_id`.")
    _check_scorable(model, _as_ids([prefix_token_id]), "`prefix_token_id`")
    requests = []
    for index, text in enumerate(texts):
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError("`texts` holds strings: pass the `tokenizer`, or pass token ids.")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = list(text)
        _check_scorable(model, _as_ids(ids), f"`texts[{index}]`")
        window = max_length - 1
        for start in range(0, len(ids), window):
            previous = ids[start - 1] if start > 0 else prefix_token_id
            requests.append(([previous], ids[start : start + window]))
    if not requests:
        raise ValueError("`texts` holds no tokens to score.")
    estimates = loglikelihood_batch(
        model,
        requests,
        mc_samples=mc_samples,
        batch_size=batch_size,
        generator=generator,
        estimator=estimator,
        progress=progress,
    )
    num_tokens = sum(estimate.num_tokens for estimate in estimates)
    nll = -sum(estimate.logprob for estimate in estimates) / num_tokens
    stderr = math.sqrt(sum(estimate.stderr**2 for estimate in estimates)) / num_tokens
    return PerplexityBound(nll=nll, perplexity=math.exp(nll), stderr=stderr, num_tokens=num_tokens)


@torch.no_grad()
def ar_nll_per_token(model, texts_ids: Sequence[Sequence[int]], prefix_token_id: int, max_length: int) -> float:
    r"""Exact NLL per token of a causal LM on the windows `nll_per_token` scores: the AR side of that comparison.

    1. Cut each document `x_1..x_N` into consecutive windows of `max_length - 1` tokens (lm-eval's rolling windows,
       the same cut as `nll_per_token`), each preceded by the token right before it (`prefix_token_id` for the
       first window), so every token is scored exactly once.
    2. Sum `-log p(x_i | x_<i)` over the window's tokens, in float32, from one causal forward per window.
    3. Return the total divided by the number of scored tokens (nats per token; `exp` of it is the perplexity).

    `metrics.generative_perplexity` scores decoded texts under an evaluator with its own tokenizer; this scores token
    ids under the model that produced them, window for window beside the diffusion bound.

    Args:
        model (`PreTrainedModel`): a causal LM returning `.logits` `[1, L, V]`, in eval mode (e.g. the AR base, or a
            `DiffusionLM`'s `causal_lm` with the adapter disabled).
        texts_ids (`Sequence[Sequence[int]]`): documents as token ids (without special tokens).
        prefix_token_id (`int`): the token before each document (BOS, else EOS).
        max_length (`int`): window length including the conditioning token; at least 2.

    Returns:
        `float`: the NLL per token (nats).

    Raises:
        `ValueError`: `max_length` below 2, or `texts_ids` holds no token.

    Example:
    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(config).eval()
    >>> nll = ar_nll_per_token(model, [[5, 9, 17, 3]], prefix_token_id=1, max_length=3)
    >>> 0.0 < nll < 10.0
    True

    ```
    """
    if max_length < 2:
        raise ValueError(f"`max_length` must be >= 2 (one conditioning token and one scored token), got {max_length}.")
    device = next(model.parameters()).device
    window = max_length - 1
    total, count = 0.0, 0
    for ids in texts_ids:
        ids = list(ids)
        # 1. consecutive windows, each given the token before it
        for start in range(0, len(ids), window):
            previous = ids[start - 1] if start > 0 else prefix_token_id
            row = torch.tensor([[previous] + ids[start : start + window]], device=device)  # [1, 1 + w]
            # 2. position i predicts token i + 1
            logits = model(input_ids=row).logits[0, :-1].float()  # [w, V]
            total += F.cross_entropy(logits, row[0, 1:], reduction="sum").item()
            count += row.shape[1] - 1
    if count == 0:
        raise ValueError("`texts_ids` holds no tokens to score.")
    # 3. mean over scored tokens
    return total / count
