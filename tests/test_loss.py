import math

import pytest
import torch

from peft_diffusion.corruption import complementary, corrupt, get_masking_policy
from peft_diffusion.loss import DiffusionLossOutput, diffusion_loss
from peft_diffusion.noise import get_noise_schedule, sample_time

VOCAB = 7
MASK_ID = 6


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, VOCAB, generator=generator)  # [2, 6, V]
    input_ids = torch.randint(0, VOCAB - 1, (2, 6), generator=generator)  # [2, 6]
    # row 0: prompt 0..1, answer 2..5; row 1: prompt 0, answer 1..3, padding 4..5
    is_target = torch.tensor([[False, False, True, True, True, True], [False, True, True, True, False, False]])
    # masked prompt/padding positions must be ignored too
    is_masked = torch.tensor([[True, False, True, False, True, True], [False, True, False, True, True, False]])
    elbo_weight = torch.tensor([[9.0, 9.0, 2.0, 2.0, 2.0, 2.0], [5.0, 1.25, 1.25, 1.25, 9.0, 9.0]])
    return logits, input_ids, is_masked, is_target, elbo_weight


def _manual_weighted_sum(logits, input_ids, is_masked, is_target, elbo_weight):
    total, num_masked = 0.0, 0
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            if is_masked[b, i] and is_target[b, i]:
                row = logits[b, i].double()
                log_z = math.log(sum(math.exp(v) for v in row.tolist()))
                total += elbo_weight[b, i].item() * (log_z - row[input_ids[b, i]].item())
                num_masked += 1
    return total, num_masked


@pytest.mark.parametrize("normalization", ["targets", "masked"])
def test_loss_matches_hand_computation(normalization):
    logits, input_ids, is_masked, is_target, elbo_weight = _batch()
    out = diffusion_loss(logits, input_ids, is_masked, is_target, elbo_weight, normalization=normalization)
    assert isinstance(out, DiffusionLossOutput)
    total, num_masked = _manual_weighted_sum(logits, input_ids, is_masked, is_target, elbo_weight)
    assert num_masked == 5 and out.num_masked.item() == 5 and out.num_targets.item() == 7
    expected = total / (7 if normalization == "targets" else 5)
    torch.testing.assert_close(out.loss.item(), expected, rtol=1e-5, atol=1e-6)
    # masked_ce is the unweighted mean over masked targets
    plain, _ = _manual_weighted_sum(logits, input_ids, is_masked, is_target, torch.ones_like(elbo_weight))
    torch.testing.assert_close(out.masked_ce.item(), plain / 5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_items_in_batch", [3, torch.tensor(3)])
def test_loss_divides_by_num_items_in_batch(num_items_in_batch):
    logits, input_ids, is_masked, is_target, elbo_weight = _batch()
    out = diffusion_loss(logits, input_ids, is_masked, is_target, elbo_weight, num_items_in_batch=num_items_in_batch)
    total, _ = _manual_weighted_sum(logits, input_ids, is_masked, is_target, elbo_weight)
    torch.testing.assert_close(out.loss.item(), total / 3, rtol=1e-5, atol=1e-6)


def test_prompt_padding_and_clean_tokens_do_not_reach_the_loss():
    logits, input_ids, is_masked, is_target, elbo_weight = _batch()
    logits.requires_grad_(True)
    out = diffusion_loss(logits, input_ids, is_masked, is_target, elbo_weight)
    out.loss.backward()
    is_scored = is_masked & is_target
    assert (logits.grad[~is_scored] == 0).all()
    assert (logits.grad[is_scored].abs().sum(-1) > 0).all()
    # an infinite weight where nothing is scored must not turn into nan (0 * inf)
    elbo_weight = torch.where(is_scored, elbo_weight, math.inf)
    logits.grad = None
    out_inf = diffusion_loss(logits, input_ids, is_masked, is_target, elbo_weight)
    out_inf.loss.backward()
    torch.testing.assert_close(out_inf.loss, out.loss)
    assert torch.isfinite(logits.grad).all()


def test_no_masked_token_gives_zero_loss_still_connected_to_logits():
    logits, input_ids, _, is_target, elbo_weight = _batch()
    logits.requires_grad_(True)
    for normalization in ("targets", "masked"):
        out = diffusion_loss(
            logits, input_ids, torch.zeros_like(is_target), is_target, elbo_weight, normalization=normalization
        )
        assert out.loss.item() == 0.0 and out.masked_ce.item() == 0.0 and out.num_masked.item() == 0
        assert out.loss.grad_fn is not None
        out.loss.backward()
        assert logits.grad is not None and (logits.grad == 0).all()


def test_log_softmax_runs_in_float32():
    logits, input_ids, is_masked, is_target, elbo_weight = _batch()
    out = diffusion_loss(logits.bfloat16(), input_ids, is_masked, is_target, elbo_weight)
    reference = diffusion_loss(logits.bfloat16().float(), input_ids, is_masked, is_target, elbo_weight)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, reference.loss)


def test_loss_rejects_bad_arguments():
    logits, input_ids, is_masked, is_target, elbo_weight = _batch()
    with pytest.raises(ValueError, match=r"`normalization` must be one of \['targets', 'masked'\], got .*'tokens'"):
        diffusion_loss(logits, input_ids, is_masked, is_target, elbo_weight, normalization="tokens")
    with pytest.raises(ValueError, match="`logits` must have shape"):
        diffusion_loss(logits[:, :5], input_ids, is_masked, is_target, elbo_weight)
    with pytest.raises(ValueError, match="`elbo_weight` must have the shape"):
        diffusion_loss(logits, input_ids, is_masked, is_target, elbo_weight[:, :1])
    with pytest.raises(ValueError, match="`num_items_in_batch` must be positive"):
        diffusion_loss(logits, input_ids, is_masked, is_target, elbo_weight, num_items_in_batch=0)


# ------------------------------------------------------------------------------------------------ unbiasedness

CASES = [
    ("linear", "uniform", 0.0, False),
    ("cosine", "uniform", 0.0, False),
    ("linear", "position_dependent", 1.5, False),
    ("cosine", "position_dependent", 1.5, False),
    ("linear", "position_dependent", 8.0, False),  # clipped regime
    ("linear", "uniform", 0.0, True),
    ("cosine", "uniform", 0.0, True),
]


@pytest.mark.parametrize("schedule,masking,strength,use_complement", CASES)
def test_targets_normalized_loss_is_an_unbiased_elbo_estimate(schedule, masking, strength, use_complement):
    """For a model whose prediction ignores the context, the NELBO per target is
    sum_i CE_i (1 - mask_prob_i(eps)) / n, because E_t[elbo_weight_i * mask_prob_i] = int_eps^1 mask_prob_i' dt.
    The complement has the same expectation: its weight times its mask rate is again mask_prob_i'.
    The Monte-Carlo mean of the loss over t ~ U(eps, 1] and the masks must hit it within 4 sigma."""
    batch_size, seq_len, eps = 4096, 12, 1e-3
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB - 1, (1, seq_len), generator=generator).expand(batch_size, -1)
    logits = torch.randn(1, seq_len, VOCAB, generator=generator).expand(batch_size, -1, -1)  # context-free
    is_target = torch.ones(batch_size, seq_len, dtype=torch.bool)
    is_target[:, :2] = False  # a prompt
    t = sample_time(batch_size, eps=eps, antithetic=True, generator=generator)  # [B, 1]
    first = corrupt(
        input_ids,
        is_target,
        t,
        mask_token_id=MASK_ID,
        schedule=schedule,
        masking=masking,
        strength=strength,
        generator=generator,
    )
    corruption = complementary(first, input_ids, is_target, MASK_ID) if use_complement else first
    per_row = _per_row_loss(logits, input_ids, corruption, is_target)  # [B]
    # exact expectation
    ce = torch.nn.functional.cross_entropy(logits[0].double(), input_ids[0], reduction="none")  # [L]
    positions = torch.arange(seq_len)[None]
    policy = get_masking_policy(masking)
    start_prob, _ = policy(
        torch.full((1, seq_len), eps, dtype=torch.float64),
        get_noise_schedule(schedule),
        positions,
        is_target[:1],
        strength,
    )
    expected = (ce * (1 - start_prob[0]))[is_target[0]].sum().item() / is_target[0].sum().item()
    std = per_row.std().item() / math.sqrt(batch_size)
    assert abs(per_row.mean().item() - expected) <= 4 * std + 1e-3 * expected, (per_row.mean().item(), expected)
    # the whole-batch loss is the mean of the per-row losses (equal target counts)
    batch_loss = diffusion_loss(logits, input_ids, corruption.is_masked, is_target, corruption.elbo_weight).loss
    torch.testing.assert_close(batch_loss, per_row.mean().float(), rtol=1e-4, atol=1e-5)


def _per_row_loss(logits, input_ids, corruption, is_target):
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), input_ids.flatten(), reduction="none")
    ce = ce.view_as(input_ids)  # [B, L]
    is_scored = corruption.is_masked & is_target
    weighted = torch.where(is_scored, corruption.elbo_weight.double() * ce, 0.0)  # [B, L]
    return weighted.sum(-1) / is_target.sum(-1)  # [B]


# --------------------------------------------------------------------------------------------------------------
# The AR teacher's term
# --------------------------------------------------------------------------------------------------------------


def test_teacher_kl_matches_the_hand_sum_and_gives_no_mass_to_excluded_tokens():
    from peft_diffusion.loss import teacher_kl

    logits, _, is_masked, is_target, _ = _batch()
    logits.requires_grad_(True)
    teacher = torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(1))
    teacher[..., MASK_ID] = float("-inf")  # e.g. the mask token
    is_scored = is_masked & is_target
    kl = teacher_kl(logits, teacher, is_scored)
    for b in range(2):
        for i in range(6):
            if not is_scored[b, i]:
                assert kl[b, i] == 0
                continue
            q = [math.exp(v) for v in logits[b, i].tolist()]
            log_q = [math.log(v / sum(q)) for v in q]
            p = [math.exp(v) for v in teacher[b, i].tolist()]  # exp(-inf) = 0
            expected = sum(pv / sum(p) * (math.log(pv / sum(p)) - lq) for pv, lq in zip(p, log_q) if pv > 0)
            assert kl[b, i].item() == pytest.approx(expected, rel=1e-5)
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~is_scored] == 0).all() and (logits.grad[is_scored].abs().sum(-1) > 0).all()


def test_teacher_kl_is_zero_when_the_student_is_the_teacher():
    from peft_diffusion.loss import teacher_kl

    logits = torch.randn(1, 4, VOCAB)
    assert teacher_kl(logits, logits.clone(), torch.ones(1, 4, dtype=torch.bool)).abs().max() < 1e-6


# --------------------------------------------------------------------------------------------------------------
# Certainty forcing (dParallel)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_certainty_entropy_is_the_hand_entropy_of_the_right_predictions_only(temperature):
    from peft_diffusion.loss import certainty_entropy

    logits, input_ids, is_masked, is_target, _ = _batch()
    input_ids = input_ids.clone()
    input_ids[0, :3] = logits[0, :3].argmax(-1)  # some targets the model predicts right
    logits[..., MASK_ID] = float("-inf")  # a token without mass adds nothing (and no NaN)
    logits.requires_grad_(True)
    is_scored = is_masked & is_target
    entropy = certainty_entropy(logits, input_ids, is_scored, temperature)
    right = is_scored & (logits.argmax(-1) == input_ids)
    assert right.any() and (is_scored & ~right).any()  # both kinds are in the batch
    for b in range(2):
        for i in range(6):
            if not right[b, i]:
                assert entropy[b, i] == 0
                continue
            q = [math.exp(v / temperature) for v in logits[b, i].tolist()]
            expected = -sum(v / sum(q) * math.log(v / sum(q)) for v in q if v > 0)
            assert entropy[b, i].item() == pytest.approx(expected, rel=1e-5)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~right] == 0).all() and (logits.grad[right].abs().sum(-1) > 0).all()
    # a small step against the gradient sharpens every right prediction (its top probability rises)
    top = torch.softmax(logits.detach(), -1).max(-1).values
    stepped = torch.softmax(logits.detach() - 0.1 * logits.grad, -1).max(-1).values
    assert (stepped[right] > top[right]).all()


def test_certainty_entropy_of_nothing_scored_is_zero_and_on_the_graph():
    from peft_diffusion.loss import certainty_entropy

    logits = torch.randn(1, 4, VOCAB, requires_grad=True)
    entropy = certainty_entropy(logits, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool))
    assert entropy.abs().max() == 0 and entropy.requires_grad


def test_first_in_block_keeps_the_first_set_position_of_each_block_and_document():
    from peft_diffusion.objective import first_in_block

    is_set = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])  # two packed documents
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    # blocks of 2: doc 0 -> [0,1] [2,3] [4,5]; doc 1 -> [6,7] [8,9]
    expected = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(first_in_block(is_set, positions, doc_ids, 2), expected)
    # no blocks: the first set position of each document
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(first_in_block(is_set, positions, doc_ids, None), expected)
