"""Behaviour of the unmasking rules in `peft_diffusion.samplers` (pure tensor math, no model)."""

import dataclasses
import math

import pytest
import torch

from peft_diffusion.samplers import (
    SAMPLERS,
    Sampler,
    get_sampler,
    num_tokens_per_step,
    propose_tokens,
    register_sampler,
    select_threshold,
    select_topk,
    step,
)

VOCAB_SIZE = 16
MASK_TOKEN_ID = 15
THRESHOLDS = [None, 0.5]


def contract_cases():
    return [
        pytest.param(name, threshold, id=f"{name}-{'topk' if threshold is None else f'threshold{threshold}'}")
        for name in sorted(SAMPLERS)
        for threshold in THRESHOLDS
    ]


def make_logits(batch_size=3, length=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(batch_size, length, VOCAB_SIZE, generator=generator)  # [B, L, V]


def make_is_masked(batch_size=3, length=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    is_masked = torch.rand(batch_size, length, generator=generator) < 0.6  # [B, L]
    is_masked[:, 0] = True  # every row has at least one mask
    return is_masked


def run_step(logits, is_masked, num_to_commit, name, threshold, seed=0, temperature=1.0):
    generator = torch.Generator().manual_seed(seed)
    return step(
        logits,
        is_masked,
        num_to_commit,
        sampler=name,
        threshold=threshold,
        temperature=temperature,
        generator=generator,
        mask_token_id=MASK_TOKEN_ID,
    )


def probs_to_logits(rows):
    """Logits whose softmax over a VOCAB_SIZE vocabulary is `rows` (padded with zero mass), one position per row."""
    probs = torch.zeros(1, len(rows), VOCAB_SIZE)
    for i, row in enumerate(rows):
        probs[0, i, : len(row)] = torch.tensor(row)
    return torch.log(probs)  # [1, L, V], -inf on zero mass


# ----------------------------------------------------------------------------------------------------------------------
# Contract: every registered sampler, with and without threshold
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, threshold", contract_cases())
def test_commits_only_masked_positions(name, threshold):
    logits, is_masked = make_logits(), make_is_masked()
    num_to_commit = torch.tensor([8, 2, 3])
    _, commit = run_step(logits, is_masked, num_to_commit, name, threshold)
    assert commit.dtype == torch.bool
    assert not (commit & ~is_masked).any()


@pytest.mark.parametrize("name, threshold", contract_cases())
def test_commits_at_least_one_per_row_until_block_is_decoded(name, threshold):
    logits, is_masked = make_logits(), make_is_masked()
    is_masked[2] = False  # a finished row stays finished
    num_to_commit = torch.ones(3, dtype=torch.long) if threshold is None else None  # threshold: no budget at all
    length = is_masked.shape[1]
    for step_id in range(length):
        if not is_masked.any():
            break
        _, commit = run_step(logits, is_masked, num_to_commit, name, threshold, seed=step_id)
        rows_with_masks = is_masked.any(dim=-1)
        assert (commit.sum(dim=-1) >= 1)[rows_with_masks].all()
        assert not commit[~rows_with_masks].any()
        is_masked = is_masked & ~commit
    assert not is_masked.any()


@pytest.mark.parametrize("name, threshold", contract_cases())
def test_respects_per_row_budget(name, threshold):
    logits, is_masked = make_logits(), make_is_masked()
    num_masked = is_masked.sum(dim=-1)
    num_to_commit = torch.tensor([0, 2, 100])  # none, some, more than the row has
    _, commit = run_step(logits, is_masked, num_to_commit, name, threshold)
    expected = torch.minimum(num_to_commit, num_masked)
    if threshold is None:
        assert torch.equal(commit.sum(dim=-1), expected)
    else:  # the budget is a minimum on top of the threshold rule's at-least-one
        assert (commit.sum(dim=-1) >= torch.clamp(expected, min=1)).all()


@pytest.mark.parametrize("name, threshold", contract_cases())
def test_deterministic_with_seeded_generator(name, threshold):
    logits, is_masked = make_logits(), make_is_masked()
    num_to_commit = torch.tensor([1, 2, 3])
    tokens_a, commit_a = run_step(logits, is_masked, num_to_commit, name, threshold, seed=123)
    tokens_b, commit_b = run_step(logits, is_masked, num_to_commit, name, threshold, seed=123)
    assert torch.equal(tokens_a, tokens_b)
    assert torch.equal(commit_a, commit_b)


@pytest.mark.parametrize("name, threshold", contract_cases())
def test_rows_are_independent(name, threshold):
    logits, is_masked = make_logits(), make_is_masked()
    num_to_commit = torch.tensor([2, 2, 2])
    tokens, commit = run_step(logits, is_masked, num_to_commit, name, threshold)

    other_logits, other_is_masked, other_budget = logits.clone(), is_masked.clone(), num_to_commit.clone()
    other_logits[1] = make_logits(seed=7)[1]
    other_is_masked[1] = ~is_masked[1]
    other_budget[1] = 5
    other_tokens, other_commit = run_step(other_logits, other_is_masked, other_budget, name, threshold)
    for row in (0, 2):
        assert torch.equal(tokens[row], other_tokens[row])
        assert torch.equal(commit[row], other_commit[row])


@pytest.mark.parametrize("name, threshold", contract_cases())
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mask_token_is_never_proposed(name, threshold, temperature):
    logits = make_logits()
    logits[..., MASK_TOKEN_ID] = 100.0  # the largest logit everywhere
    is_masked = torch.ones(3, 8, dtype=torch.bool)
    tokens, commit = run_step(logits, is_masked, torch.tensor([8, 8, 8]), name, threshold, temperature=temperature)
    assert not (tokens == MASK_TOKEN_ID).any()
    assert commit.all()


@pytest.mark.parametrize("name, threshold", contract_cases())
def test_greedy_commits_argmax_tokens(name, threshold):
    logits, is_masked = make_logits(), make_is_masked()
    tokens, _ = run_step(logits, is_masked, torch.tensor([1, 1, 1]), name, threshold, temperature=0.0)
    assert torch.equal(tokens, logits[..., :MASK_TOKEN_ID].argmax(dim=-1))


@pytest.mark.parametrize("name, threshold", contract_cases())
def test_block_is_decoded_in_steps_with_the_llada_schedule(name, threshold):
    logits, is_masked = make_logits(), make_is_masked()
    steps = 3
    schedule = num_tokens_per_step(is_masked.sum(dim=-1), steps)  # [B, steps]
    for step_id in range(steps):
        budget = schedule[:, step_id]
        _, commit = run_step(logits, is_masked, budget, name, threshold, seed=step_id)
        if threshold is None:
            assert torch.equal(commit.sum(dim=-1), budget)
        is_masked = is_masked & ~commit
    assert not is_masked.any()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_registered_samplers_are_frozen_dataclasses_satisfying_the_protocol(name):
    sampler = get_sampler(name)
    assert isinstance(sampler, Sampler)
    assert dataclasses.is_dataclass(sampler) and type(sampler).__dataclass_params__.frozen
    probs = make_logits().softmax(dim=-1)
    confidence = sampler.confidence(probs, probs.argmax(dim=-1), generator=torch.Generator().manual_seed(0))
    assert confidence.shape == (3, 8) and confidence.is_floating_point()
    assert ((confidence >= 0) & (confidence <= 1)).all()  # one threshold scale for every built-in score


# ----------------------------------------------------------------------------------------------------------------------
# Token proposal
# ----------------------------------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_and_probs_are_softmax():
    logits = make_logits()
    tokens, probs = propose_tokens(logits)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, logits.softmax(dim=-1))


def test_mask_token_gets_zero_probability_and_probs_renormalise():
    logits = make_logits()
    logits[..., MASK_TOKEN_ID] = 100.0
    tokens, probs = propose_tokens(logits, mask_token_id=MASK_TOKEN_ID)
    assert (probs[..., MASK_TOKEN_ID] == 0).all()
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3, 8))
    assert torch.equal(tokens, logits[..., :MASK_TOKEN_ID].argmax(dim=-1))


def test_top_k_one_equals_greedy_even_when_sampling():
    logits = make_logits()
    generator = torch.Generator().manual_seed(0)
    tokens, probs = propose_tokens(logits, temperature=2.0, top_k=1, generator=generator)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert torch.equal(probs.max(dim=-1).values, torch.ones(3, 8))


def test_top_k_keeps_k_tokens():
    _, probs = propose_tokens(make_logits(), temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert ((probs > 0).sum(dim=-1) == 3).all()


def test_top_p_keeps_smallest_nucleus_reaching_p():
    logits = probs_to_logits([[0.5, 0.3, 0.15, 0.05]])
    _, probs = propose_tokens(logits, top_p=0.7)
    torch.testing.assert_close(probs[0, 0, :4], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    _, probs = propose_tokens(logits, top_p=0.3)  # the most likely token always stays
    torch.testing.assert_close(probs[0, 0, :4], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_sampling_follows_the_tempered_distribution():
    target = torch.tensor([0.7, 0.2, 0.1])
    logits = torch.log(target).expand(1, 4000, 3)  # [1, L, 3]
    tokens, probs = propose_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens.flatten(), minlength=3).float() / tokens.numel()
    torch.testing.assert_close(frequencies, target, atol=0.03, rtol=0)
    _, hot_probs = propose_tokens(logits, temperature=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hot_probs[0, 0], target.sqrt() / target.sqrt().sum())


def test_different_seeds_give_different_samples():
    logits = torch.zeros(1, 64, VOCAB_SIZE)
    tokens_a, _ = propose_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    tokens_b, _ = propose_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(tokens_a, tokens_b)


# ----------------------------------------------------------------------------------------------------------------------
# Orderings: which position each sampler commits first
# ----------------------------------------------------------------------------------------------------------------------

# Position 0: highest top-1 probability. Position 1: biggest top-1/top-2 gap. Position 2: lowest entropy.
ORDERING_ROWS = [
    [0.60, 0.39, 0.01],  # top-1 0.60, margin 0.21, entropy 0.72
    [0.55, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05],  # top-1 0.55, margin 0.50, entropy 1.65
    [0.50, 0.50],  # top-1 0.50, margin 0.00, entropy 0.69
]


@pytest.mark.parametrize("name, expected_position", [("confidence", 0), ("margin", 1), ("entropy", 2)])
def test_sampler_commits_its_preferred_position_first(name, expected_position):
    logits = probs_to_logits(ORDERING_ROWS)
    is_masked = torch.ones(1, 3, dtype=torch.bool)
    _, commit = step(logits, is_masked, torch.tensor([1]), sampler=name)
    assert commit[0].nonzero().flatten().tolist() == [expected_position]


# Argmax probabilities 0.95, 0.97, 0.50, 0.99, 0.98 at positions 0-4.
PREFIX_ROWS = [[0.95, 0.05], [0.97, 0.03], [0.50, 0.25, 0.25], [0.99, 0.01], [0.98, 0.02]]


@pytest.mark.parametrize(
    ("masked", "threshold", "budget", "expected"),
    [
        ([1, 1, 1, 1, 1], 0.9, 1, [0, 1]),  # the confident run from the left, not the confident 3 and 4 after 2
        ([0, 1, 1, 1, 1], 0.9, 1, [1]),  # a committed position is skipped; 1 sure, then 2 unsure: stop
        ([1, 0, 0, 1, 1], 0.9, 1, [0, 3, 4]),  # the run continues across committed (given) positions
        ([0, 0, 1, 1, 1], 0.9, 1, [2]),  # the leftmost mask is unsure: it alone, not the sure ones after it
        ([1, 1, 1, 1, 1], None, 3, [0, 1, 2]),  # a fixed budget: the leftmost masks, whatever their scores
        ([1, 1, 1, 1, 1], 0.9, 3, [0, 1, 2]),  # a budget above the run: still from the left
    ],
)
def test_prefix_commits_the_confident_run_from_the_left(masked, threshold, budget, expected):
    logits = probs_to_logits(PREFIX_ROWS)
    is_masked = torch.tensor([masked], dtype=torch.bool)
    _, commit = step(logits, is_masked, torch.tensor([budget]), sampler="prefix", threshold=threshold)
    assert commit[0].nonzero().flatten().tolist() == expected
    if masked == [1, 1, 1, 1, 1] and threshold is not None and budget == 1:  # confidence takes every sure position
        _, commit = step(logits, is_masked, torch.tensor([budget]), sampler="confidence", threshold=threshold)
        assert commit[0].nonzero().flatten().tolist() == [0, 1, 3, 4]


def test_confidence_is_the_probability_of_the_proposed_token():
    probs = torch.tensor([[[0.1, 0.7, 0.2], [0.3, 0.3, 0.4]]])
    tokens = torch.tensor([[0, 2]])
    torch.testing.assert_close(get_sampler("confidence").confidence(probs, tokens), torch.tensor([[0.1, 0.4]]))


def test_margin_and_entropy_scores():
    probs = torch.tensor([[[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]])
    tokens = probs.argmax(dim=-1)
    torch.testing.assert_close(get_sampler("margin").confidence(probs, tokens), torch.tensor([[0.2, 1.0]]))
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    torch.testing.assert_close(
        get_sampler("entropy").confidence(probs, tokens), torch.tensor([[math.exp(-entropy), 1.0]])
    )


def test_random_scores_ignore_the_model():
    probs_a = make_logits(seed=0).softmax(dim=-1)
    probs_b = make_logits(seed=1).softmax(dim=-1)
    sampler = get_sampler("random")
    scores_a = sampler.confidence(probs_a, probs_a.argmax(dim=-1), generator=torch.Generator().manual_seed(0))
    scores_b = sampler.confidence(probs_b, probs_b.argmax(dim=-1), generator=torch.Generator().manual_seed(0))
    scores_c = sampler.confidence(probs_a, probs_a.argmax(dim=-1), generator=torch.Generator().manual_seed(1))
    assert torch.equal(scores_a, scores_b)
    assert not torch.equal(scores_a, scores_c)


# ----------------------------------------------------------------------------------------------------------------------
# Selection rules and schedule
# ----------------------------------------------------------------------------------------------------------------------


def test_select_topk_picks_highest_masked_positions():
    confidence = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3], [0.2, 0.8, 0.6, 0.4, 0.0]])
    is_masked = torch.tensor([[False, True, True, True, True], [True, True, True, False, False]])
    commit = select_topk(confidence, is_masked, torch.tensor([2, 0]))
    assert commit.tolist() == [[False, False, True, True, False], [False] * 5]


def test_select_topk_prefers_masked_positions_even_at_minus_infinity():
    confidence = torch.full((1, 4), -math.inf)
    is_masked = torch.tensor([[False, False, True, True]])
    commit = select_topk(confidence, is_masked, torch.tensor([2]))
    assert commit.tolist() == [[False, False, True, True]]


def test_select_threshold_commits_all_above_and_at_least_the_best():
    confidence = torch.tensor([[0.95, 0.92, 0.3, 0.99], [0.2, 0.6, 0.1, 0.0], [0.9, 0.9, 0.9, 0.9]])
    is_masked = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4])
    commit = select_threshold(confidence, is_masked, 0.9)
    assert commit.tolist() == [[True, True, False, False], [False, True, False, False], [False] * 4]


def test_select_threshold_with_budget_is_union_with_topk():
    confidence = torch.tensor([[0.95, 0.1, 0.3, 0.2]])
    is_masked = torch.ones(1, 4, dtype=torch.bool)
    commit = select_threshold(confidence, is_masked, 0.9, num_to_commit=torch.tensor([2]))
    assert commit.tolist() == [[True, False, True, False]]
    commit = select_threshold(confidence, is_masked, 0.05, num_to_commit=torch.tensor([2]))
    assert commit.all()


def test_threshold_one_commits_exactly_one_unless_certain():
    logits = probs_to_logits([[0.9, 0.1], [1.0], [0.8, 0.2]])
    is_masked = torch.ones(1, 3, dtype=torch.bool)
    _, commit = step(logits, is_masked, None, threshold=1.0)
    assert commit.tolist() == [[False, True, False]]


@pytest.mark.parametrize("steps", [1, 3, 4, 7, 20])
def test_num_tokens_per_step_is_an_even_split(steps):
    num_masked = torch.tensor([0, 1, 7, 12, 32])
    schedule = num_tokens_per_step(num_masked, steps)
    assert schedule.shape == (5, steps) and schedule.dtype == torch.long
    assert torch.equal(schedule.sum(dim=-1), num_masked)
    assert (schedule.max(dim=-1).values - schedule.min(dim=-1).values <= 1).all()
    assert (schedule[:, :-1] >= schedule[:, 1:]).all()  # the extra tokens go to the first steps


def test_num_tokens_per_step_matches_llada():
    assert num_tokens_per_step(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]


def test_num_tokens_per_step_with_steps_per_row_and_block():
    """A tensor of steps (the decoding plan's, per row and block): each count split over its own steps, then 0."""
    num_masked = torch.tensor([[3, 8, 5, 0], [7, 8, 1, 0]])  # [B, K]
    steps = torch.tensor([[1, 4, 3, 0], [3, 4, 1, 0]])  # [B, K]
    schedule = num_tokens_per_step(num_masked, steps)  # [B, K, S]
    assert schedule.shape == (2, 4, 4)
    assert torch.equal(schedule.sum(dim=-1), num_masked)
    assert torch.equal((schedule > 0).sum(dim=-1), steps)  # every planned step commits, the others do not
    assert schedule[0, 2].tolist() == [2, 2, 1, 0]
    for row in range(2):  # each entry is the scalar schedule of its own count and steps, zero-padded
        for block in range(3):
            alone = num_tokens_per_step(num_masked[row, block, None], int(steps[row, block]))[0]
            assert torch.equal(schedule[row, block, : len(alone)], alone)


def test_num_tokens_per_step_rejects_zero_steps_for_masked_counts():
    with pytest.raises(ValueError, match=r"`steps` must be >= 1 wherever `num_masked` > 0"):
        num_tokens_per_step(torch.tensor([4, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"`steps` must be >= 1 wherever `num_masked` > 0 \(and never negative\)"):
        num_tokens_per_step(torch.tensor([4, 0]), torch.tensor([2, -1]))


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------


def test_get_sampler_accepts_any_object_with_confidence():
    class Leftmost:
        def confidence(self, probs, tokens, *, generator=None):
            return -torch.arange(tokens.shape[1], dtype=torch.float32).expand(tokens.shape)

    sampler = Leftmost()
    assert get_sampler(sampler) is sampler
    is_masked = torch.tensor([[False, True, True, True]])
    _, commit = step(make_logits(1, 4), is_masked, torch.tensor([2]), sampler=sampler)
    assert commit.tolist() == [[False, True, True, False]]


def test_register_sampler_adds_to_registry():
    @register_sampler("test_leftmost")
    @dataclasses.dataclass(frozen=True)
    class Leftmost:
        def confidence(self, probs, tokens, *, generator=None):
            return -torch.arange(tokens.shape[1], dtype=torch.float32).expand(tokens.shape)

    try:
        assert isinstance(get_sampler("test_leftmost"), Leftmost)
    finally:
        del SAMPLERS["test_leftmost"]


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match=r"`sampler` must be one of \[.*'confidence'.*\], got sampler='nope'"):
        get_sampler("nope")
    with pytest.raises(ValueError, match="`sampler`"):
        step(make_logits(), make_is_masked(), torch.tensor([1, 1, 1]), sampler="nope")


def test_non_sampler_object_raises():
    with pytest.raises(TypeError, match="`sampler` must be a name"):
        get_sampler(3)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'confidence' is already registered"):
        register_sampler("confidence")(type("Other", (), {}))


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_threshold_out_of_range_raises(threshold):
    with pytest.raises(ValueError, match=rf"`threshold` must be in \(0, 1\], got threshold={threshold}"):
        select_threshold(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), threshold)
    with pytest.raises(ValueError, match="`threshold` must be in"):
        step(make_logits(), make_is_masked(), None, threshold=threshold)


def test_steps_zero_raises():
    with pytest.raises(ValueError, match="`steps` must be >= 1, got steps=0"):
        num_tokens_per_step(torch.tensor([4]), 0)


def test_missing_budget_without_threshold_raises():
    with pytest.raises(ValueError, match="`num_to_commit` is required when `threshold` is None"):
        step(make_logits(), make_is_masked(), None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1.0}, "`temperature` must be >= 0"),
        ({"top_k": 0}, "`top_k` must be >= 1"),
        ({"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"`top_p` must be in \(0, 1\]"),
    ],
)
def test_bad_proposal_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        propose_tokens(make_logits(), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The entropy-bounded (EB) selection
# ---------------------------------------------------------------------------------------------------------------


def eb_by_hand(confidence, entropy, is_masked, bound, minimum=1):
    """Longest prefix in confidence order with sum(H) - max(H) <= bound, at least `minimum`; loops, per row."""
    commits = []
    for row in range(confidence.shape[0]):
        order = sorted((i for i in range(confidence.shape[1]) if is_masked[row, i]), key=lambda i: -confidence[row, i])
        chosen = []
        for i in order:
            trial = [float(entropy[row, j]) for j in chosen + [i]]
            if sum(trial) - max(trial) <= bound:
                chosen.append(i)
            else:
                break
        chosen = order[: max(len(chosen), min(minimum, len(order)))]
        commits.append([i in chosen for i in range(confidence.shape[1])])
    return torch.tensor(commits)


@pytest.mark.parametrize("bound", [0.0, 0.3, 1.0, 5.0])
def test_entropy_bound_selection_matches_the_hand_rule(bound):
    from peft_diffusion.samplers import select_entropy_bound

    generator = torch.Generator().manual_seed(0)
    confidence = torch.rand(6, 10, generator=generator)
    entropy = torch.rand(6, 10, generator=generator)
    is_masked = torch.rand(6, 10, generator=generator) < 0.7
    is_masked[0] = False  # a finished row commits nothing
    got = select_entropy_bound(confidence, entropy, is_masked, bound)
    assert torch.equal(got, eb_by_hand(confidence, entropy, is_masked, bound))
    minimum = torch.full((6,), 3)
    got = select_entropy_bound(confidence, entropy, is_masked, bound, num_to_commit=minimum)
    assert torch.equal(got, eb_by_hand(confidence, entropy, is_masked, bound, minimum=3))


def test_entropy_bound_in_generate_commits_adaptively():
    from conftest import MASK_ID, tiny_causal_lm

    from peft_diffusion import DiffusionConfig, get_diffusion_model

    model = get_diffusion_model(
        tiny_causal_lm("llama"), DiffusionConfig(attention="block", block_size=4, mask_token_id=MASK_ID)
    ).eval()
    prompt = torch.tensor([[1, 5, 6, 7]])
    settings = dict(max_new_tokens=8, steps=8, return_dict_in_generate=True)
    one_by_one = model.generate(prompt, **settings)
    tight = model.generate(prompt, entropy_bound=0.0, **settings)
    loose = model.generate(prompt, entropy_bound=1e9, **settings)
    assert torch.equal(tight.sequences, one_by_one.sequences) and tight.nfe == one_by_one.nfe == 8
    assert loose.nfe == 2  # every block committed whole at its first step
    with pytest.raises(ValueError, match="Pass one adaptive rule"):
        model.generate(prompt, entropy_bound=0.5, threshold=0.9, max_new_tokens=8)
    with pytest.raises(ValueError, match="`entropy_bound` must be a finite number >= 0"):
        model.generate(prompt, entropy_bound=-1.0, max_new_tokens=8)
