"""Monte-Carlo ELBO likelihoods and the lm-evaluation-harness model class.

The exact references: for a continuation of n <= 4 tokens every mask pattern (and every decoding order) can be
enumerated, so the expected ELBO and the exact random-order likelihood are computable.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import MASK_ID, tiny_causal_lm

from peft_diffusion import DiffusionConfig, get_diffusion_model
from peft_diffusion.evaluation import loglikelihood, loglikelihood_batch, nll_per_token


def diffusion(attention="bidirectional", block_size=4, clean_context=True, shift=True, seed=0):
    config = DiffusionConfig(
        attention=attention, block_size=block_size, clean_context=clean_context, shift=shift, mask_token_id=MASK_ID
    )
    return get_diffusion_model(tiny_causal_lm("llama", "sdpa", seed=seed), config).eval()


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


CONTEXT = [5, 17, 42]
CONTINUATION = [9, 33, 71, 12]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine are 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def subset_logprobs(model, ids, start, end):
    """`{S: log p(ids_i | ids with S masked) for every i}` over all non-empty subsets S of [start, end), in one
    forward without the two-stream layout (earlier tokens clean, as a block model sees them after truncation)."""
    subsets = [
        frozenset(subset) for k in range(1, end - start + 1) for subset in itertools.combinations(range(start, end), k)
    ]
    is_masked = torch.tensor([[i in subset for i in range(len(ids))] for subset in subsets])  # [2^n - 1, L]
    clean = torch.tensor([ids]).expand(len(subsets), -1)  # [2^n - 1, L]
    logprobs = model(input_ids=clean.masked_fill(is_masked, MASK_ID)).logits.log_softmax(-1)  # [2^n - 1, L, V]
    token_logprobs = logprobs.gather(2, clean[..., None])[..., 0].double()  # [2^n - 1, L]
    return dict(zip(subsets, token_logprobs))


def exact_group_elbo(model, ids, start, end):
    """Eq. (1): sum over non-empty subsets S of the targets [start, end) of sum_{i in S} l_i(S) / (k C(n, k))."""
    n = end - start
    table = subset_logprobs(model, ids, start, end)
    return sum(float(sum(table[s][i] for i in s)) / (len(s) * math.comb(n, len(s))) for s in table)


def random_order_loglikelihood(model, ids, start):
    """Exact log p(y | c) of the sampler that unmasks one uniformly random position at a time, and the mean over
    orders of the log of each order's product (the any-order AR form of the ELBO)."""
    n = len(ids) - start
    table = subset_logprobs(model, ids, start, len(ids))
    logs = [
        float(sum(table[frozenset(order[step:])][position] for step, position in enumerate(order)))
        for order in itertools.permutations(range(start, len(ids)))
    ]
    log_mean_prob = torch.logsumexp(torch.tensor(logs, dtype=torch.float64), 0).item() - math.log(math.factorial(n))
    return log_mean_prob, sum(logs) / len(logs)


# --------------------------------------------------------------------------------------------------------------
# The estimator against exact values
# --------------------------------------------------------------------------------------------------------------


def test_elbo_matches_enumeration_and_lower_bounds_the_random_order_likelihood():
    model = diffusion("bidirectional")
    ids = CONTEXT + CONTINUATION
    exact_elbo = exact_group_elbo(model, ids, len(CONTEXT), len(ids))
    exact_loglik, order_mean = random_order_loglikelihood(model, ids, len(CONTEXT))
    # The subset weights 1 / (k C(n, k)) are the any-order AR bound: the two enumerations agree.
    assert exact_elbo == pytest.approx(order_mean, abs=1e-4)
    # Jensen: the ELBO is below the exact random-order likelihood (strictly, for a model with inconsistent conditionals).
    assert exact_elbo < exact_loglik
    estimate = loglikelihood(model, CONTEXT, CONTINUATION, mc_samples=64, generator=generator())
    assert estimate.num_tokens == 4 and estimate.stderr > 0
    assert abs(estimate.logprob - exact_elbo) < 4 * estimate.stderr
    # The estimate is a bound, not the likelihood: it lower-bounds exact_loglik up to Monte-Carlo error.
    assert estimate.logprob < exact_loglik + 4 * estimate.stderr


def test_block_estimate_sums_per_block_elbos_given_clean_earlier_blocks():
    # block_size 2, context of 3: groups are position 3 (with context token 2 clean in its block), 4-5 and 6.
    model = diffusion("block", block_size=2)
    ids = CONTEXT + CONTINUATION
    exact = sum(
        exact_group_elbo(model, ids[:end_of_block], start, end)
        for start, end, end_of_block in [(3, 4, 4), (4, 6, 6), (6, 7, 7)]
    )
    estimate = loglikelihood(model, CONTEXT, CONTINUATION, mc_samples=64, generator=generator())
    assert abs(estimate.logprob - exact) < 4 * estimate.stderr + 1e-6


def test_two_stream_equals_truncated_per_block_scoring():
    two_stream = diffusion("block", block_size=2, clean_context=True)
    truncated = diffusion("block", block_size=2, clean_context=False)
    a = loglikelihood(two_stream, CONTEXT, CONTINUATION + [3, 4], mc_samples=8, generator=generator(3))
    b = loglikelihood(truncated, CONTEXT, CONTINUATION + [3, 4], mc_samples=8, generator=generator(3))
    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert a.stderr == pytest.approx(b.stderr, abs=1e-4)


def causal_logprob(model, ids, start):
    """The causal LM's log p(ids[start:] | ids[:start]), the mask token excluded from the softmax."""
    with torch.no_grad():
        logits = model.causal_lm(input_ids=torch.tensor([ids])).logits[0].float()  # [L, V]
    logits[:, MASK_ID] = -math.inf
    logprobs = logits.log_softmax(-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))


def test_block_size_one_with_clean_context_is_the_causal_likelihood():
    model = diffusion("block", block_size=1)
    estimate = loglikelihood(model, CONTEXT, CONTINUATION, mc_samples=3, generator=generator())
    assert estimate.stderr == 0.0
    assert estimate.logprob == pytest.approx(causal_logprob(model, CONTEXT + CONTINUATION, len(CONTEXT)), abs=1e-4)


def test_stderr_shrinks_like_one_over_sqrt_samples():
    model = diffusion("bidirectional")
    continuation = [9, 33, 71, 12, 8, 60, 101, 4]

    def mean_variance(mc_samples):
        stderrs = [
            loglikelihood(model, CONTEXT, continuation, mc_samples=mc_samples, generator=generator(seed)).stderr
            for seed in range(3)
        ]
        return sum(s * s for s in stderrs) / len(stderrs)

    ratio = math.sqrt(mean_variance(16) / mean_variance(64))
    assert 1.5 < ratio < 2.7


# --------------------------------------------------------------------------------------------------------------
# Determinism, batching, greedy
# --------------------------------------------------------------------------------------------------------------


def test_deterministic_with_a_generator_and_random_without():
    model = diffusion("bidirectional")
    a = loglikelihood(model, CONTEXT, CONTINUATION, mc_samples=4, generator=generator(1))
    b = loglikelihood(model, CONTEXT, CONTINUATION, mc_samples=4, generator=generator(1))
    c = loglikelihood(model, CONTEXT, CONTINUATION, mc_samples=4, generator=generator(2))
    assert a == b and a.logprob != c.logprob


@pytest.mark.parametrize("attention", ["bidirectional", "block"])
def test_batch_size_and_padding_do_not_change_estimates(attention):
    model = diffusion(attention, block_size=2)
    requests = [(CONTEXT, CONTINUATION), ([7], [20, 21]), ([3, 4, 5, 6, 7, 8], [30])]
    big = loglikelihood_batch(model, requests, mc_samples=4, batch_size=64, generator=generator())
    small = loglikelihood_batch(model, requests, mc_samples=4, batch_size=3, generator=generator())
    alone = loglikelihood(model, *requests[0], mc_samples=4, generator=generator())
    for x, y in zip(big, small):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4) and x.is_greedy == y.is_greedy
    assert big[0].logprob == pytest.approx(alone.logprob, abs=1e-4)


def test_is_greedy_follows_one_step_argmax():
    model = diffusion("bidirectional")
    with torch.no_grad():
        noisy = torch.tensor([CONTEXT + [MASK_ID] * 3])
        argmax = model(input_ids=noisy).logits[0, len(CONTEXT) :].argmax(-1).tolist()
    assert loglikelihood(model, CONTEXT, argmax, mc_samples=1).is_greedy
    assert not loglikelihood(model, CONTEXT, [(argmax[0] + 1) % MASK_ID] + argmax[1:], mc_samples=1).is_greedy


def test_nll_per_token_rolls_windows_over_documents():
    model = diffusion("block", block_size=1)  # exact: the causal likelihood
    documents = [[9, 33, 71, 12, 8, 60, 101], [4, 5]]
    bound = nll_per_token(model, documents, prefix_token_id=1, max_length=4, mc_samples=2)
    # windows of 3 tokens, each given the token before it (the prefix token first)
    expected = 0.0
    for document in documents:
        ids = [1] + document
        for start in range(1, len(ids), 3):
            expected += causal_logprob(model, ids[start - 1 : start + 3], 1)
    assert bound.num_tokens == 9
    assert bound.nll == pytest.approx(-expected / 9, abs=1e-4)
    assert bound.perplexity == pytest.approx(math.exp(bound.nll))


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "continuation", "kwargs", "match"),
    [
        (CONTEXT, [], {}, "`continuation_ids` is empty"),
        (CONTEXT, CONTINUATION, {"mc_samples": 0}, "`mc_samples` must be >= 1"),
        ([], CONTINUATION, {}, "`context_ids` is empty"),
        (CONTEXT, list(range(3, 126)) * 2, {}, "context window is 128"),
        (CONTEXT, CONTINUATION, {"batch_size": 0}, "`batch_size` must be >= 1"),
    ],
)
def test_bad_input_raises(context, continuation, kwargs, match):
    with pytest.raises(ValueError, match=match):
        loglikelihood(diffusion(), context, continuation, **kwargs)


def test_nll_per_token_bad_input_raises():
    model = diffusion()
    with pytest.raises(ValueError, match="pass the `tokenizer`"):
        nll_per_token(model, ["some text"])
    with pytest.raises(ValueError, match="no tokens"):
        nll_per_token(model, [[]], prefix_token_id=1)


_ = json  # used by the lm-eval tests below
