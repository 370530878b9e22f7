"""Monte-Carlo ELBO likelihoods (`peft_diffusion.evaluation`) and the lm-evaluation-harness model
(`peft_diffusion.integrations.lm_eval`).

The exact references: for a continuation of n <= 4 tokens every mask pattern (and every decoding order) can be
enumerated, so the expected ELBO and the exact random-order likelihood are computable.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math

import pytest
import torch
from conftest import MASK_ID, tiny_causal_lm

from peft_diffusion import DiffusionConfig, get_diffusion_model
from peft_diffusion.evaluation import ar_nll_per_token, loglikelihood, loglikelihood_batch, nll_per_token


def diffusion(attention="bidirectional", block_size=4, clean_context=True, shift=True, seed=0):
    config = DiffusionConfig(
        attention=attention, block_size=block_size, clean_context=clean_context, shift=shift, mask_token_id=MASK_ID
    )
    return get_diffusion_model(tiny_causal_lm("llama", "sdpa", seed=seed), config).eval()


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


CONTEXT = [5, 17, 42]
CONTINUATION = [9, 33, 71, 12]


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


def left_to_right_reference(model, ids, groups):
    """Eq. (3) from the enumeration: per group, position i scored with i..end-1 masked (the input cut at the block's
    end, earlier tokens clean)."""
    total = 0.0
    for start, end, end_of_block in groups:
        table = subset_logprobs(model, ids[:end_of_block], start, end)
        total += sum(float(table[frozenset(range(i, end))][i]) for i in range(start, end))
    return total


@pytest.mark.parametrize(
    ("attention", "block_size", "clean_context", "groups"),
    [
        ("bidirectional", 4, True, [(3, 7, 7)]),
        ("block", 2, True, [(3, 4, 4), (4, 6, 6), (6, 7, 7)]),
        ("block", 2, False, [(3, 4, 4), (4, 6, 6), (6, 7, 7)]),
    ],
)
def test_left_to_right_is_the_exact_likelihood_of_left_to_right_decoding(attention, block_size, clean_context, groups):
    model = diffusion(attention, block_size=block_size, clean_context=clean_context)
    ids = CONTEXT + CONTINUATION
    estimate = loglikelihood(model, CONTEXT, CONTINUATION, estimator="left_to_right")
    assert estimate.stderr == 0.0 and estimate.num_tokens == 4
    assert estimate.logprob == pytest.approx(left_to_right_reference(model, ids, groups), abs=1e-4)
    # deterministic, whatever the generator and mc_samples
    again = loglikelihood(
        model, CONTEXT, CONTINUATION, estimator="left_to_right", mc_samples=7, generator=generator(5)
    )
    assert again.logprob == estimate.logprob


def test_left_to_right_with_block_size_one_is_the_causal_likelihood():
    model = diffusion("block", block_size=1)
    estimate = loglikelihood(model, CONTEXT, CONTINUATION, estimator="left_to_right")
    assert estimate.logprob == pytest.approx(causal_logprob(model, CONTEXT + CONTINUATION, len(CONTEXT)), abs=1e-4)


@pytest.mark.parametrize(("attention", "block_size"), [("block", 2), ("block", 4), ("bidirectional", 4)])
def test_the_left_to_right_sampler_draws_what_the_left_to_right_likelihood_scores(attention, block_size):
    """Greedy decoding with `sampler="left_to_right"`, one token per step, equals a hand loop of truncated forwards
    (each position's argmax given the tokens before it, the rest of its block masked, later blocks absent), and the
    estimator's log-likelihood of that answer is the sum of the loop's log-probabilities."""
    model = diffusion(attention, block_size=block_size)
    length = 5
    answer = model.generate(
        torch.tensor([CONTEXT]), max_new_tokens=length, steps=length, sampler="left_to_right", eos_token_id=[]
    )[0, len(CONTEXT) :].tolist()
    ids, total, stop = list(CONTEXT), 0.0, len(CONTEXT) + length
    for position in range(len(CONTEXT), stop):
        end = min((position // block_size + 1) * block_size, stop) if attention == "block" else stop
        row = ids + [MASK_ID] * (end - position)
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([row])).logits[0, position].float().log_softmax(-1)  # [V]
        token = int(logprobs.argmax())
        ids.append(token)
        total += float(logprobs[token])
    assert answer == ids[len(CONTEXT) :]
    assert loglikelihood(model, CONTEXT, answer, estimator="left_to_right").logprob == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("block_size", [4, 8])
def test_the_prefix_sampler_commits_the_leftmost_mask_and_the_confident_run_after_it(block_size):
    """`sampler="prefix"` with a threshold equals a hand loop of truncated forwards: each step commits the longest
    run of masked positions from the left of the block whose argmax probabilities all reach the threshold, and at
    least the leftmost one; never a confident position after an unsure one. With one token per step it is
    `left_to_right`."""
    model = diffusion("block", block_size=block_size)
    length, threshold = 8, 0.011  # the tiny random model's probabilities are about 1/V: 0.011 passes some of them
    # steps=length: the schedule's minimum is one token per step, so the threshold alone makes a step commit more
    out = model.generate(torch.tensor([CONTEXT]), max_new_tokens=length, steps=length, threshold=threshold,
                         sampler="prefix", eos_token_id=[], return_dict_in_generate=True)  # fmt: skip
    ids, stop, forwards = list(CONTEXT), len(CONTEXT) + length, 0
    while len(ids) < stop:
        end = min((len(ids) // block_size + 1) * block_size, stop)  # this block; later blocks absent
        canvas = ids + [MASK_ID] * (end - len(ids))
        while MASK_ID in canvas[len(ids) :]:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([canvas])).logits[0].float()  # [L, V]
            forwards += 1
            logits[:, MASK_ID] = float("-inf")  # the mask token is never proposed
            probs, tokens = logits.softmax(-1).max(-1)
            position = canvas.index(MASK_ID)
            sure = bool(probs[position] >= threshold)
            canvas[position] = int(tokens[position])  # the leftmost mask always
            position += 1
            while sure and position < end and probs[position] >= threshold:  # then the run, if it began sure
                canvas[position] = int(tokens[position])
                position += 1
        ids = canvas
    assert out.sequences[0, len(CONTEXT) :].tolist() == ids[len(CONTEXT) :]
    assert out.nfe == forwards < length  # some step committed a run of two or more
    confidence = model.generate(torch.tensor([CONTEXT]), max_new_tokens=length, steps=length, threshold=threshold,
                                sampler="confidence", eos_token_id=[])  # fmt: skip
    assert confidence[0, len(CONTEXT) :].tolist() != ids[len(CONTEXT) :]  # the rule matters on this model
    one_per_step = {
        name: model.generate(
            torch.tensor([CONTEXT]), max_new_tokens=length, steps=length, sampler=name, eos_token_id=[]
        ).tolist()  # fmt: skip
        for name in ("prefix", "left_to_right")
    }
    assert one_per_step["prefix"] == one_per_step["left_to_right"]


def test_unknown_estimator_is_named():
    with pytest.raises(
        ValueError, match=r"`estimator` must be one of \['elbo', 'left_to_right'\], got estimator='ar'"
    ):
        loglikelihood(diffusion(), CONTEXT, CONTINUATION, estimator="ar")


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


def test_nll_per_token_left_to_right_is_the_sampler_nll_over_the_same_windows():
    model = diffusion("block", block_size=2)
    documents = [[9, 33, 71, 12, 8, 60, 101], [4, 5]]
    result = nll_per_token(model, documents, prefix_token_id=1, max_length=4, estimator="left_to_right")
    # windows of 3 tokens given the token before them; blocks of 2 over each window's positions [0, 4)
    expected = 0.0
    for document in documents:
        ids = [1] + document
        for start in range(1, len(ids), 3):
            window = ids[start - 1 : start + 3]
            ends = [min(b + 2, len(window)) for b in range(0, len(window), 2)]
            groups = [(max(1, b), end, end) for b, end in zip(range(0, len(window), 2), ends) if end > max(1, b)]
            expected += left_to_right_reference(model, window, groups)
    assert result.num_tokens == 9 and result.stderr == 0.0
    assert result.nll == pytest.approx(-expected / 9, abs=1e-4)
    elbo = nll_per_token(model, documents, prefix_token_id=1, max_length=4, mc_samples=2, generator=generator())
    assert elbo.nll != pytest.approx(result.nll, abs=1e-3)  # a different quantity, not the bound relabelled
    with pytest.raises(ValueError, match=r"`estimator` must be one of"):
        nll_per_token(model, documents, prefix_token_id=1, estimator="ar")


def test_ar_nll_per_token_rolls_the_same_windows_over_documents():
    model = tiny_causal_lm("llama", "sdpa").eval()
    documents = [[9, 33, 71, 12, 8, 60, 101], [4, 5]]
    # windows of 3 tokens, each given only the token before it (the prefix token first): 3 + 3 + 1 and 2 tokens
    rows = [[1, 9, 33, 71], [71, 12, 8, 60], [60, 101], [1, 4, 5]]
    expected = 0.0
    with torch.no_grad():
        for row in rows:
            logprobs = model(input_ids=torch.tensor([row])).logits[0, :-1].float().log_softmax(-1)  # [w, V]
            expected -= float(logprobs.gather(1, torch.tensor(row[1:])[:, None]).sum())
    nll = ar_nll_per_token(model, documents, prefix_token_id=1, max_length=4)
    assert nll == pytest.approx(expected / 9, rel=1e-5)
    # a longer window conditions on more tokens, so the figure changes
    assert ar_nll_per_token(model, documents, prefix_token_id=1, max_length=16) != pytest.approx(nll, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "continuation", "kwargs", "match"),
    [
        (CONTEXT, [], {}, "`continuation_ids` is empty"),
        (CONTEXT, CONTINUATION, {"mc_samples": 0}, "`mc_samples` must be a positive integer"),
        ([], CONTINUATION, {}, "`context_ids` is empty"),
        (CONTEXT, list(range(3, 126)) * 2, {}, "context window is 128"),
        (CONTEXT, CONTINUATION, {"batch_size": 0}, "`batch_size` must be a positive integer"),
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


def test_ar_nll_per_token_bad_input_raises():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=r"`max_length` must be >= 2.*got 1"):
        ar_nll_per_token(model, [[4, 5]], prefix_token_id=1, max_length=1)
    with pytest.raises(ValueError, match="no tokens"):
        ar_nll_per_token(model, [[]], prefix_token_id=1, max_length=8)


# --------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness
# --------------------------------------------------------------------------------------------------------------

TASK_YAML = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{context}}}}"
doc_to_target: "{target}"
{extra}
"""


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(120)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2")


@pytest.fixture
def lm_eval_setup(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    model = diffusion("bidirectional")
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    docs = [
        {"context": "w5 w6 w7", "target": "w8", "choices": ["w8", "w9"], "label": 0},
        {"context": "w10 w11", "target": "w12 w13", "choices": ["w12", "w40 w41"], "label": 1},
        {"context": "w20", "target": "w21", "choices": ["w21", "w22"], "label": 0},
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    tasks = {
        "tiny_loglikelihood": ("loglikelihood", " {{target}}", "metric_list:\n  - metric: acc"),
        "tiny_choice": ("multiple_choice", "{{label}}", "doc_to_choice: choices\nmetric_list:\n  - metric: acc"),
        "tiny_rolling": (
            "loglikelihood_rolling",
            "{{context}} {{target}}",
            "metric_list:\n  - metric: word_perplexity",
        ),
        "tiny_generate": (
            "generate_until",
            "{{target}}",
            "generation_kwargs:\n  until: [w2]\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match",
        ),
    }
    for name, (output_type, target, extra) in tasks.items():
        (tmp_path / f"{name}.yaml").write_text(
            TASK_YAML.format(name=name, data=data, output_type=output_type, target=target, extra=extra)
        )
    return lm_eval, TaskManager(include_path=str(tmp_path), include_defaults=False), tmp_path / "model"


@pytest.mark.slow  # two full simple_evaluate runs: about 3 s on an idle 2-core machine
def test_lm_eval_runs_offline_on_local_tasks_and_is_deterministic(lm_eval_setup):
    lm_eval, task_manager, path = lm_eval_setup
    from peft_diffusion.integrations.lm_eval import DiffusionLMEval

    def run():
        lm = DiffusionLMEval(pretrained=str(path), mc_samples=4, batch_size=8, max_new_tokens=4)
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=["tiny_loglikelihood", "tiny_choice", "tiny_rolling", "tiny_generate"],
            task_manager=task_manager,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            log_samples=False,
        )["results"]

    first, second = run(), run()
    assert first == second
    assert set(first) == {"tiny_loglikelihood", "tiny_choice", "tiny_rolling", "tiny_generate"}
    assert 0.0 <= first["tiny_choice"]["acc,none"] <= 1.0
    assert first["tiny_rolling"]["word_perplexity,none"] > 1.0
    assert 0.0 <= first["tiny_generate"]["exact_match,none"] <= 1.0


def test_lm_eval_loglikelihood_matches_the_estimator(lm_eval_setup):
    _, _, path = lm_eval_setup
    from lm_eval.api.instance import Instance

    from peft_diffusion.integrations.lm_eval import DiffusionLMEval

    lm = DiffusionLMEval(pretrained=str(path), mc_samples=4, seed=7)
    request = Instance("loglikelihood", {}, ("w5 w6 w7", " w8 w9"), 0)
    [(logprob, is_greedy)] = lm.loglikelihood([request])
    expected = loglikelihood(lm.model, [5, 6, 7], [8, 9], mc_samples=4, generator=generator(7))
    assert logprob == pytest.approx(expected.logprob) and is_greedy == expected.is_greedy
    # an empty context is conditioned on the BOS token
    [(empty, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("", "w8"), 0)])
    assert empty == pytest.approx(loglikelihood(lm.model, [1], [8], mc_samples=4, generator=generator(7)).logprob)
    # the deterministic estimator through lm-eval
    ltr = DiffusionLMEval(model=lm.model, tokenizer=lm.tokenizer, estimator="left_to_right")
    [(logprob, _)] = ltr.loglikelihood([request])
    assert logprob == pytest.approx(loglikelihood(lm.model, [5, 6, 7], [8, 9], estimator="left_to_right").logprob)
    # generate_until stops at the stop sequence
    [text] = lm.generate_until([Instance("generate_until", {}, ("w5 w6", {"until": ["w2"], "max_gen_toks": 3}), 0)])
    assert "w2" not in text.split()


def test_lm_eval_bad_model_args_raise(lm_eval_setup):
    _, _, path = lm_eval_setup
    from peft_diffusion.integrations.lm_eval import DiffusionLMEval

    with pytest.raises(ValueError, match="Unknown model_args"):
        DiffusionLMEval(pretrained=str(path), mc_sample=4)
    with pytest.raises(ValueError, match="`mc_samples` must be a positive integer"):
        DiffusionLMEval(pretrained=str(path), mc_samples=0)
    with pytest.raises(ValueError, match="exactly one of"):
        DiffusionLMEval()


def test_lm_eval_missing_gives_an_install_hint(monkeypatch):
    import builtins
    import importlib
    import sys

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    # import the integration afresh (restored afterwards), with lm-eval missing
    monkeypatch.delitem(sys.modules, "peft_diffusion.integrations.lm_eval", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match=r"pip install \"peft-diffusion\[eval\]\""):
        importlib.import_module("peft_diffusion.integrations.lm_eval")


def test_lm_eval_model_is_registered_under_its_name_and_reached_by_the_cli():
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from peft_diffusion.cli import eval as eval_command
    from peft_diffusion.integrations.lm_eval import DiffusionLMEval

    assert get_model("peft_diffusion") is DiffusionLMEval
    assert "integrations.lm_eval import DiffusionLMEval" in inspect.getsource(eval_command._lm_eval)


def test_progress_bar_of_scored_rows_only_when_asked(capsys):
    """`progress=True` shows a bar of the scored rows on stderr (what the benchmarks, lm-eval and long runs want);
    the default stays silent for callers that loop with their own bar; the estimates do not depend on it."""
    model = diffusion()
    requests = [([1, 5], [6, 7]), ([1], [9, 4, 2])]
    quiet = loglikelihood_batch(model, requests, mc_samples=3, batch_size=2, generator=generator())
    assert "Scoring" not in capsys.readouterr().err
    shown = loglikelihood_batch(model, requests, mc_samples=3, batch_size=2, generator=generator(), progress=True)
    err = capsys.readouterr().err
    assert "Scoring" in err and "row" in err
    assert [e.logprob for e in shown] == [e.logprob for e in quiet]
