import math

import pytest
import torch

from peft_diffusion.corruption import (
    MASKING_POLICIES,
    Corruption,
    apply_mask,
    complementary,
    corrupt,
    get_masking_policy,
    position_dependent_masking,
    register_masking_policy,
    uniform_masking,
)
from peft_diffusion.noise import (
    NOISE_SCHEDULES,
    LinearNoiseSchedule,
    elbo_weight,
    expand_time,
    get_noise_schedule,
    group_time,
    register_noise_schedule,
    sample_time,
)
from peft_diffusion.trainer import eos_targets

MASK_ID = 99


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _within(observed: float, expected: float, std: float, sigmas: float = 4.0) -> bool:
    return abs(observed - expected) <= sigmas * std


# ------------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("name", sorted(NOISE_SCHEDULES))
def test_schedule_contract(name):
    schedule = get_noise_schedule(name)
    t = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)  # [201]
    alpha = schedule.alpha(t)  # [201]
    assert alpha[0].item() == 1.0
    assert abs(alpha[-1].item()) < 1e-6
    assert (alpha.diff() < 0).all(), "alpha_t must decrease strictly"
    interior = t[1:-1]
    step = 1e-6
    finite_difference = (schedule.alpha(interior + step) - schedule.alpha(interior - step)) / (2 * step)
    torch.testing.assert_close(schedule.alpha_derivative(interior), finite_difference, rtol=1e-6, atol=1e-6)
    weight = elbo_weight(schedule, t[1:])  # [200]
    assert torch.isfinite(weight).all() and (weight > 0).all()
    torch.testing.assert_close(weight, -schedule.alpha_derivative(t[1:]) / (1 - alpha[1:]))


def test_linear_elbo_weight_is_one_over_t():
    t = torch.tensor([1e-3, 0.1, 0.37, 0.5, 1.0])
    weight = elbo_weight("linear", t)
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, 1.0 / t, rtol=1e-6, atol=0)


def test_cosine_elbo_weight_is_accurate_at_small_t_in_float32():
    # 1 - cos(pi t / 2) cancels catastrophically in float32; the weight is computed in float64
    t = torch.tensor([1e-3, 1e-2])
    half_angle = math.pi * t.double() / 4
    exact = (math.pi / 2) * torch.sin(2 * half_angle) / (2 * torch.sin(half_angle) ** 2)
    torch.testing.assert_close(elbo_weight("cosine", t), exact.float(), rtol=1e-6, atol=0)


def test_get_noise_schedule_accepts_an_unregistered_instance():
    class Square:
        def alpha(self, t):
            return 1 - t**2

        def alpha_derivative(self, t):
            return -2 * t

    schedule = Square()
    assert get_noise_schedule(schedule) is schedule
    torch.testing.assert_close(elbo_weight(schedule, torch.tensor([0.5])), torch.tensor([4.0]))


def test_unknown_noise_schedule_raises():
    with pytest.raises(ValueError, match=r"noise_schedule.*cosine.*linear.*'bogus'"):
        get_noise_schedule("bogus")
    with pytest.raises(ValueError, match="noise_schedule"):
        get_noise_schedule(3)
    with pytest.raises(ValueError, match="noise_schedule.*'bogus'"):
        corrupt(
            torch.ones(1, 2, dtype=torch.long),
            torch.ones(1, 2, dtype=torch.bool),
            torch.ones(1),
            mask_token_id=MASK_ID,
            schedule="bogus",
        )


def test_registering_a_taken_name_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_noise_schedule("linear")(LinearNoiseSchedule)
    with pytest.raises(ValueError, match="already registered"):
        register_masking_policy("uniform")(uniform_masking)


# ------------------------------------------------------------------------------------------------ time


def test_sample_time_shape_range_and_reproducibility():
    t = sample_time(64, 3, eps=0.1, generator=_generator())
    assert t.shape == (64, 3) and t.dtype == torch.float32
    assert (t > 0.1).all() and (t <= 1.0).all()
    torch.testing.assert_close(t, sample_time(64, 3, eps=0.1, generator=_generator()))


def test_antithetic_sample_time_is_stratified():
    eps = 0.01
    t = sample_time(8, 4, eps=eps, antithetic=True, generator=_generator())  # [8, 4]
    assert t.shape == (8, 4)
    u = ((1 - t) / (1 - eps)).flatten().sort().values  # [32]
    torch.testing.assert_close(u.diff(), torch.full((31,), 1 / 32), rtol=0, atol=1e-5)


def test_antithetic_sample_time_lowers_variance_of_the_mean():
    generator = _generator(1)
    iid = torch.stack([sample_time(32, generator=generator).mean() for _ in range(300)])
    antithetic = torch.stack([sample_time(32, antithetic=True, generator=generator).mean() for _ in range(300)])
    # iid: var = 1 / (12 * 32); stratified: var = 1 / (12 * 32^2), 32 times lower
    assert antithetic.var() < 0.1 * iid.var()
    assert _within(antithetic.mean().item(), 0.5, 0.01)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5])
def test_sample_time_rejects_eps_outside_unit_interval(eps):
    with pytest.raises(ValueError, match=r"`eps` must be in \(0, 1\)"):
        sample_time(4, eps=eps)


def test_expand_time_per_sequence_and_per_block():
    t = torch.tensor([0.2, 0.7])
    assert torch.equal(expand_time(t, 3), torch.tensor([[0.2] * 3, [0.7] * 3]))
    assert torch.equal(expand_time(t[:, None], 3, block_size=2), torch.tensor([[0.2] * 3, [0.7] * 3]))
    per_block = torch.tensor([[0.1, 0.5, 0.9]])
    expected = torch.tensor([[0.1, 0.1, 0.5, 0.5, 0.9]])  # last block shorter
    assert torch.equal(expand_time(per_block, 5, block_size=2), expected)


def test_expand_time_rejects_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="block_size"):
        expand_time(torch.rand(2, 3), 6)
    with pytest.raises(ValueError, match=r"ceil\(seq_len / block_size\) = 3"):
        expand_time(torch.rand(2, 2), 6, block_size=2)
    with pytest.raises(ValueError, match="shape"):
        expand_time(torch.rand(2, 2, 2), 6)
    with pytest.raises(ValueError, match="block_size"):
        expand_time(torch.rand(2, 1), 6, block_size=0)


def test_group_time_gives_each_block_of_each_document_its_own_draw():
    draws = torch.arange(1, 11, dtype=torch.float32)[None] / 10  # [1, 10]: 0.1 .. 1.0
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])  # two packed documents of 5 tokens
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    by_block = group_time(draws, positions, doc_ids, block_size=2)
    assert torch.equal(by_block, torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.5, 0.6, 0.6, 0.8, 0.8, 1.0]]))
    by_document = group_time(draws, positions, doc_ids)
    assert torch.equal(by_document, torch.tensor([[0.1] * 5 + [0.6] * 5]))
    # a per-token time goes through expand_time unchanged
    assert torch.equal(expand_time(by_block, 10, block_size=2), by_block)
    with pytest.raises(ValueError, match="one shape"):
        group_time(draws[:, :5], positions, doc_ids)


def test_corrupt_reads_positions_inside_packed_documents():
    input_ids = torch.arange(3, 13)[None]  # [1, 10]
    is_target = torch.ones_like(input_ids, dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    t = torch.full((1, 10), 0.3)
    packed = corrupt(
        input_ids, is_target, t, mask_token_id=0, masking="position_dependent", strength=2.0, positions=positions
    )
    # the second document's tokens are masked like the first one's, not like positions 5..9
    torch.testing.assert_close(packed.mask_prob[:, 5:], packed.mask_prob[:, :5])
    single = corrupt(
        input_ids[:, :5], is_target[:, :5], t[:, :5], mask_token_id=0, masking="position_dependent", strength=2.0
    )
    torch.testing.assert_close(packed.mask_prob[:, :5], single.mask_prob)
    assert not torch.allclose(
        corrupt(input_ids, is_target, t, mask_token_id=0, masking="position_dependent", strength=2.0).mask_prob[:, 5:],
        single.mask_prob,
    )
    with pytest.raises(ValueError, match="`positions` must have the shape"):
        corrupt(input_ids, is_target, t, mask_token_id=0, positions=positions[:, :5])


# ------------------------------------------------------------------------------------------------ masking policies


def _positions(batch_size: int, seq_len: int, block_size: int | None = None) -> torch.Tensor:
    positions = torch.arange(seq_len)
    if block_size is not None:
        positions = positions % block_size
    return positions.expand(batch_size, -1)


@pytest.mark.parametrize("name", sorted(MASKING_POLICIES))
@pytest.mark.parametrize("schedule", sorted(NOISE_SCHEDULES))
def test_masking_policy_contract(name, schedule):
    policy = get_masking_policy(name)
    generator = _generator()
    is_target = torch.rand(6, 12, generator=generator) < 0.7  # [6, 12]
    t = sample_time(6, generator=generator).expand(-1, 12)  # [6, 12]
    mask_prob, weight = policy(t, get_noise_schedule(schedule), _positions(6, 12, 4), is_target, 0.0)
    assert mask_prob.shape == weight.shape == (6, 12)
    assert (mask_prob[~is_target] == 0).all() and (weight[~is_target] == 0).all()
    assert ((mask_prob >= 0) & (mask_prob <= 1)).all()
    assert torch.isfinite(weight).all() and (weight[is_target] > 0).all()


@pytest.mark.parametrize("schedule", sorted(NOISE_SCHEDULES))
def test_uniform_masking_rate_matches_one_minus_alpha(schedule):
    input_ids = torch.randint(0, 50, (64, 128), generator=_generator())
    is_target = torch.ones(64, 128, dtype=torch.bool)
    t = torch.full((64,), 0.3)
    out = corrupt(input_ids, is_target, t, mask_token_id=MASK_ID, schedule=schedule, generator=_generator(1))
    rate = 1 - get_noise_schedule(schedule).alpha(torch.tensor(0.3, dtype=torch.float64)).item()
    count = out.is_masked.sum().item()
    total = is_target.numel()
    assert _within(count, total * rate, math.sqrt(total * rate * (1 - rate)))
    torch.testing.assert_close(out.mask_prob, torch.full_like(out.mask_prob, rate))
    torch.testing.assert_close(out.elbo_weight, elbo_weight(schedule, out.t))


@pytest.mark.parametrize("masking,strength", [("uniform", 0.0), ("position_dependent", 3.0)])
def test_corrupt_masks_only_targets(masking, strength):
    generator = _generator()
    input_ids = torch.randint(0, 50, (8, 20), generator=generator)  # [8, 20]
    is_target = torch.zeros(8, 20, dtype=torch.bool)
    is_target[:, 5:16] = True  # prompt 0..4, answer 5..15, padding 16..19
    t = torch.ones(8, 1)  # everything that can be masked is masked
    out = corrupt(
        input_ids, is_target, t, mask_token_id=MASK_ID, masking=masking, strength=strength, generator=generator
    )
    assert isinstance(out, Corruption)
    assert torch.equal(out.is_masked, is_target)
    assert torch.equal(out.noisy_ids[~is_target], input_ids[~is_target])
    assert (out.noisy_ids[is_target] == MASK_ID).all()
    # at intermediate times too: nothing off target ever changes
    out = corrupt(
        input_ids,
        is_target,
        torch.full((8,), 0.5),
        mask_token_id=MASK_ID,
        masking=masking,
        strength=strength,
        generator=generator,
    )
    assert not (out.is_masked & ~is_target).any()
    assert torch.equal(out.noisy_ids, torch.where(out.is_masked, MASK_ID, input_ids))


def test_corrupt_per_block_times_follow_the_blocks():
    input_ids = torch.arange(12).expand(4, -1)
    is_target = torch.ones(4, 12, dtype=torch.bool)
    t = torch.tensor([[1.0, 1e-9, 1.0]]).expand(4, -1)  # block 1 (positions 4..7) stays clean
    out = corrupt(input_ids, is_target, t, mask_token_id=MASK_ID, block_size=4, generator=_generator())
    assert out.is_masked[:, :4].all() and not out.is_masked[:, 4:8].any() and out.is_masked[:, 8:].all()
    assert torch.equal(out.t, expand_time(t, 12, 4))


def test_corrupt_rejects_rows_without_target():
    input_ids = torch.zeros(2, 4, dtype=torch.long)
    is_target = torch.tensor([[True, True, False, False], [False, False, False, False]])
    with pytest.raises(ValueError, match=r"`labels` without any target token: rows \[1\]"):
        corrupt(input_ids, is_target, torch.ones(2), mask_token_id=MASK_ID)


def test_corrupt_rejects_bad_shapes_and_unknown_masking():
    input_ids = torch.zeros(2, 4, dtype=torch.long)
    is_target = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="is_target"):
        corrupt(input_ids, is_target.long(), torch.ones(2), mask_token_id=MASK_ID)
    with pytest.raises(ValueError, match="batch size 2"):
        corrupt(input_ids, is_target, torch.ones(3), mask_token_id=MASK_ID)
    with pytest.raises(ValueError, match=r"`masking` must be one of .*position_dependent.*uniform.*'bogus'"):
        corrupt(input_ids, is_target, torch.ones(2), mask_token_id=MASK_ID, masking="bogus")


def test_strength_validation():
    input_ids = torch.zeros(2, 4, dtype=torch.long)
    is_target = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"`strength` .* must be >= 0, got strength=-1"):
        corrupt(
            input_ids, is_target, torch.ones(2), mask_token_id=MASK_ID, masking="position_dependent", strength=-1.0
        )
    with pytest.raises(ValueError, match="`strength` only applies to masking='position_dependent'"):
        corrupt(input_ids, is_target, torch.ones(2), mask_token_id=MASK_ID, strength=0.5)


# ------------------------------------------------------------------------------------------------ position-dependent


def _position_dependent(t: float, strength: float, seq_len: int = 16, schedule: str = "linear"):
    t_tokens = torch.full((1, seq_len), t, dtype=torch.float64)
    is_target = torch.ones(1, seq_len, dtype=torch.bool)
    return position_dependent_masking(
        t_tokens, get_noise_schedule(schedule), _positions(1, seq_len), is_target, strength
    )


@pytest.mark.parametrize("schedule", sorted(NOISE_SCHEDULES))
def test_strength_zero_is_exactly_uniform(schedule):
    input_ids = torch.randint(0, 50, (16, 24), generator=_generator())
    is_target = torch.rand(16, 24, generator=_generator(1)) < 0.8
    is_target[:, 0] = True
    t = sample_time(16, 3, generator=_generator(2))
    t[0, 0] = 1.0  # the end point, where every probability reaches 1
    kwargs = dict(mask_token_id=MASK_ID, schedule=schedule, block_size=8)
    uniform = corrupt(input_ids, is_target, t, masking="uniform", generator=_generator(3), **kwargs)
    tilted = corrupt(
        input_ids, is_target, t, masking="position_dependent", strength=0.0, generator=_generator(3), **kwargs
    )
    for field in ("noisy_ids", "is_masked", "t", "mask_prob", "elbo_weight"):
        assert torch.equal(getattr(uniform, field), getattr(tilted, field)), field


def test_position_dependent_masks_later_tokens_more_at_small_t():
    batch_size, seq_len = 4096, 16
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    is_target = torch.ones(batch_size, seq_len, dtype=torch.bool)
    out = corrupt(
        input_ids,
        is_target,
        torch.full((batch_size,), 0.2),
        mask_token_id=MASK_ID,
        masking="position_dependent",
        strength=2.0,
        generator=_generator(),
    )
    mask_prob = out.mask_prob[0]  # [16]
    assert (mask_prob.diff() > 0).all()
    assert mask_prob[-1] > 2 * mask_prob[0]
    # every position is masked at its claimed rate
    rate = out.is_masked.float().mean(0)  # [16]
    std = (mask_prob * (1 - mask_prob) / batch_size).sqrt()
    assert ((rate - mask_prob).abs() <= 4 * std).all()
    first, last = out.is_masked[:, :4].float().mean().item(), out.is_masked[:, -4:].float().mean().item()
    assert last - first > 4 * math.sqrt(0.25 / (4 * batch_size) * 2)


@pytest.mark.parametrize("schedule", sorted(NOISE_SCHEDULES))
@pytest.mark.parametrize(("strength", "t"), [(2.0, 0.3), (8.0, 0.6)])
def test_position_dependent_probabilities_follow_the_paper_formula(schedule, strength, t):
    """Efficient-DLM's tilt written directly: the i-th target of a group of n targets is masked with probability
    min(1, (1 - alpha_t) n exp(beta (1 - t) i) / sum_j exp(beta (1 - t) j)), beta = strength / n (the documented
    relation `masking_strength` = beta x n, n = the block length for a block of answer tokens); the library's
    probabilities and the empirical frequencies over many draws both match it (strength 8 at t = 0.6 clips)."""
    batch_size, seq_len, block_size = 20000, 16, 8
    is_target = torch.ones(batch_size, seq_len, dtype=torch.bool)
    is_target[:, :3] = False  # a prompt: block 0 holds 5 targets, block 1 holds 8
    out = corrupt(
        torch.zeros(batch_size, seq_len, dtype=torch.long),
        is_target,
        torch.full((batch_size,), t),
        mask_token_id=MASK_ID,
        schedule=schedule,
        masking="position_dependent",
        strength=strength,
        block_size=block_size,
        generator=_generator(4),
    )
    rate = 1 - get_noise_schedule(schedule).alpha(torch.tensor(t, dtype=torch.float64)).item()
    expected = [0.0] * 3
    for n in (5, 8):  # the two groups, in order
        beta = strength / n
        tilt = [math.exp(beta * (1 - t) * i) for i in range(n)]
        expected += [min(1.0, rate * n * w / sum(tilt)) for w in tilt]
    expected = torch.tensor(expected, dtype=torch.float64)  # [16]
    torch.testing.assert_close(out.mask_prob[0].double(), expected, rtol=1e-6, atol=1e-7)
    frequency = out.is_masked.double().mean(0)  # [16]
    std = (expected * (1 - expected) / batch_size).sqrt().clamp(min=1e-9)
    assert ((frequency - expected).abs() <= 4.5 * std).all(), (frequency, expected)
    assert (expected[8:] == 1.0).any() == (strength == 8.0)


def test_position_dependent_is_near_uniform_close_to_t_one():
    mask_prob, _ = _position_dependent(t=0.999, strength=2.0)
    assert (mask_prob - 0.999).abs().max() < 2e-3
    mask_prob, _ = _position_dependent(t=1.0, strength=2.0)
    torch.testing.assert_close(mask_prob, torch.ones_like(mask_prob))


@pytest.mark.parametrize("schedule", sorted(NOISE_SCHEDULES))
@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.95])
def test_position_dependent_keeps_the_expected_masked_count(schedule, t):
    # groups are blocks of 8 with a prompt inside the first block: counts are per group, over targets only
    batch_size, seq_len, block_size = 2048, 16, 8
    is_target = torch.ones(batch_size, seq_len, dtype=torch.bool)
    is_target[:, :3] = False
    out = corrupt(
        torch.zeros(batch_size, seq_len, dtype=torch.long),
        is_target,
        torch.full((batch_size,), t),
        mask_token_id=MASK_ID,
        schedule=schedule,
        masking="position_dependent",
        strength=2.0,
        block_size=block_size,
        generator=_generator(),
    )
    rate = 1 - get_noise_schedule(schedule).alpha(torch.tensor(t, dtype=torch.float64)).item()
    # the claim: sum over the targets of a group of mask_prob == (1 - alpha_t) * n (no clipping for strength <= 2)
    torch.testing.assert_close(out.mask_prob[0, :8].sum().item(), 5 * rate, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mask_prob[0, 8:].sum().item(), 8 * rate, rtol=1e-6, atol=1e-6)
    assert out.mask_prob[0, 3] < out.mask_prob[0, 7] and out.mask_prob[0, 8] < out.mask_prob[0, 15]
    # and the empirical count follows it
    counts = out.is_masked.sum(-1).double()  # [B]
    std = math.sqrt((out.mask_prob[0] * (1 - out.mask_prob[0])).sum().item() / batch_size)
    assert _within(counts.mean().item(), 13 * rate, std)


def test_position_dependent_clips_at_one_with_zero_weight():
    mask_prob, weight = _position_dependent(t=0.6, strength=10.0)
    assert mask_prob.max() == 1.0
    is_clipped = mask_prob == 1.0
    assert is_clipped[0, -1] and not is_clipped[0, 0]
    assert (weight[is_clipped] == 0).all() and (weight[~is_clipped] > 0).all()
    assert mask_prob.sum() < 0.6 * 16  # clipping loses expected count, as documented


@pytest.mark.parametrize("schedule", sorted(NOISE_SCHEDULES))
@pytest.mark.parametrize("strength", [0.5, 2.0, 10.0])
def test_position_dependent_per_token_schedule_is_monotone_with_consistent_weight(schedule, strength):
    times = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    mask_prob = torch.cat([_position_dependent(t.item(), strength, schedule=schedule)[0] for t in times])  # [100, 16]
    assert (mask_prob.diff(dim=0) >= -1e-12).all(), "mask_prob_i(t) must be nondecreasing: a valid forward process"
    # weight == d log mask_prob_i / dt (central finite difference) wherever mask_prob_i < 1
    step = 1e-6
    for t in (0.05, 0.3, 0.6, 0.9):
        prob, weight = _position_dependent(t, strength, schedule=schedule)
        prob_up, _ = _position_dependent(t + step, strength, schedule=schedule)
        prob_down, _ = _position_dependent(t - step, strength, schedule=schedule)
        is_free = prob_up < 1.0
        finite_difference = (prob_up.log() - prob_down.log()) / (2 * step)
        torch.testing.assert_close(weight[is_free], finite_difference[is_free], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(weight).all() and (weight[is_free] > 0).all()


# ------------------------------------------------------------------------------------------------ complementary


@pytest.mark.parametrize("masking,strength", [("uniform", 0.0), ("position_dependent", 1.0)])
def test_complementary_covers_each_target_exactly_once(masking, strength):
    generator = _generator()
    input_ids = torch.randint(0, 50, (8, 24), generator=generator)
    is_target = torch.rand(8, 24, generator=generator) < 0.7
    is_target[:, -1] = True
    t = sample_time(8, 3, generator=generator)
    first = corrupt(
        input_ids,
        is_target,
        t,
        mask_token_id=MASK_ID,
        masking=masking,
        strength=strength,
        block_size=8,
        generator=generator,
    )
    second = complementary(first, input_ids, is_target, MASK_ID)
    assert torch.equal(first.is_masked ^ second.is_masked, is_target)
    assert not (first.is_masked & second.is_masked).any()
    assert torch.equal(second.noisy_ids, torch.where(second.is_masked, MASK_ID, input_ids))
    torch.testing.assert_close(second.mask_prob, torch.where(is_target, 1 - first.mask_prob, 0.0))
    assert torch.isfinite(second.elbo_weight).all() and (second.elbo_weight >= 0).all()


def test_complementary_weight_is_one_over_one_minus_t_for_linear():
    input_ids = torch.zeros(3, 5, dtype=torch.long)
    is_target = torch.ones(3, 5, dtype=torch.bool)
    t = torch.tensor([0.25, 0.5, 1.0])
    first = corrupt(input_ids, is_target, t, mask_token_id=MASK_ID, generator=_generator())
    second = complementary(first, input_ids, is_target, MASK_ID)
    torch.testing.assert_close(second.t, 1 - first.t)
    torch.testing.assert_close(second.elbo_weight[:2], (1 / (1 - t[:2, None])).expand(-1, 5))
    assert (second.elbo_weight[2] == 0).all() and not second.is_masked[2].any()  # t = 1: complement is clean


# ------------------------------------------------------------------------------------------------ apply_mask, EOS


def test_apply_mask():
    input_ids = torch.tensor([[1, 2, 3]])
    is_masked = torch.tensor([[False, True, False]])
    assert torch.equal(apply_mask(input_ids, is_masked, MASK_ID), torch.tensor([[1, MASK_ID, 3]]))
    with pytest.raises(ValueError, match="is_masked"):
        apply_mask(input_ids, is_masked.long(), MASK_ID)


EOS, PAD = 2, 0


def _instruction_batch():
    # row 0: right padding; row 1: left padding; row 2: no target at all
    input_ids = torch.tensor([[5, 6, 7, EOS, PAD, PAD], [PAD, 5, 6, 7, EOS, 8], [5, 6, PAD, PAD, PAD, PAD]])
    labels = torch.tensor([[-100, -100, 7, EOS, PAD, -100], [-100, -100, -100, 7, EOS, 8], [-100] * 6])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    return labels, input_ids, attention_mask


def test_eos_targets_none_drops_padding_targets():
    labels, input_ids, attention_mask = _instruction_batch()
    new_ids, new_labels, new_attention = eos_targets(labels, input_ids, attention_mask, EOS)  # default "none"
    assert torch.equal(new_ids, input_ids) and torch.equal(new_attention, attention_mask)
    assert torch.equal(new_labels[0], torch.tensor([-100, -100, 7, EOS, -100, -100]))
    assert torch.equal(new_labels[1:], labels[1:])


def test_eos_targets_all_makes_trailing_padding_eos_targets():
    labels, input_ids, attention_mask = _instruction_batch()
    new_ids, new_labels, new_attention = eos_targets(labels, input_ids, attention_mask, EOS, policy="all")
    assert torch.equal(new_ids[0], torch.tensor([5, 6, 7, EOS, EOS, EOS]))
    assert torch.equal(new_labels[0], torch.tensor([-100, -100, 7, EOS, EOS, EOS]))
    assert torch.equal(new_attention[0], torch.ones(6, dtype=torch.long))
    # left padding is not after the answer; a row without target is left alone
    for row in (1, 2):
        assert torch.equal(new_ids[row], input_ids[row]) and torch.equal(new_attention[row], attention_mask[row])
        assert torch.equal(new_labels[row], labels[row])
    assert torch.equal(labels, _instruction_batch()[0]), "inputs must not be modified"


def test_eos_targets_rejects_unknown_policy():
    with pytest.raises(ValueError, match=r"`policy` must be one of \['none', 'all'\], got policy='some'"):
        eos_targets(*_instruction_batch(), EOS, policy="some")
