"""The diffusion objective through `DiffusionLM.forward(labels=...)`: hand computations and training smoke tests."""

from __future__ import annotations

import pytest
import torch
from conftest import MASK_ID, tiny_causal_lm
from peft import LoraConfig

from peft_diffusion import DiffusionConfig, get_diffusion_model
from peft_diffusion.corruption import corrupt
from peft_diffusion.noise import group_time, sample_time
from peft_diffusion.trainer import annealing_ratio


def batch(seed=0, length=8):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, MASK_ID - 1, (2, length), generator=generator)
    labels = input_ids.clone()
    labels[0, :2] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    return input_ids, labels, attention_mask


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("attention", ["bidirectional", "block"])
def test_loss_equals_hand_computation(attention, shift):
    model = get_diffusion_model(
        tiny_causal_lm("llama"),
        DiffusionConfig(attention=attention, block_size=4, shift=shift, mask_token_id=MASK_ID),
    ).eval()
    input_ids, labels, attention_mask = batch()
    is_masked = torch.zeros_like(input_ids, dtype=torch.bool)
    is_masked[:, [0, 1, 3, 4, 6, 7]] = True  # includes prompt, padding and position 0: never scored
    num_blocks = 2 if attention == "block" else 1
    t = torch.tensor([[0.5, 0.25], [0.8, 0.4]])[:, :num_blocks]
    out = model(input_ids=input_ids, labels=labels, attention_mask=attention_mask, t=t, is_masked=is_masked)

    # By hand: x_t, the model's logits on it, CE at masked targets weighted by 1/t, over the number of targets.
    is_target = (labels != -100) & attention_mask.bool()
    if shift:
        is_target[:, 0] = False
    noisy = torch.where(is_masked & is_target, MASK_ID, input_ids)
    clean = input_ids if attention == "block" else None
    logits = model(input_ids=noisy, attention_mask=attention_mask, clean_input_ids=clean).logits
    log_probs = torch.log_softmax(logits.float(), -1)
    total = 0.0
    for b in range(2):
        for i in range(8):
            if is_masked[b, i] and is_target[b, i]:
                time = t[b, i // 4] if attention == "block" else t[b, 0]
                total += -log_probs[b, i, input_ids[b, i]] / time
    expected = total / is_target.sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.metrics["num_targets"] == is_target.sum()
    # the loss by noise level: unweighted CE of the masked targets summed per t bucket [0, .25, .5, .75, 1]
    ce_sums, counts = torch.zeros(4), torch.zeros(4, dtype=torch.long)
    for b in range(2):
        for i in range(8):
            if is_masked[b, i] and is_target[b, i]:
                time = t[b, i // 4] if attention == "block" else t[b, 0]
                bucket = min(int(time / 0.25), 3)
                ce_sums[bucket] += -log_probs[b, i, input_ids[b, i]]
                counts[bucket] += 1
    torch.testing.assert_close(out.metrics["ce_sum_by_t"], ce_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.metrics["masked_by_t"], counts)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("shift", [True, False])
def test_block_loss_equals_hand_computation_on_truncated_forwards(shift, arch):
    """Block attention with clean context, the reference logits taken without the two-stream layout: for block b the
    model runs on [clean blocks < b ; noisy block b] alone (what decoding sees), and the 1/t-weighted masked CE is
    summed by hand over the targets and divided by their number."""
    config = DiffusionConfig(attention="block", block_size=4, shift=shift, mask_token_id=MASK_ID, clean_context=True)
    model = get_diffusion_model(tiny_causal_lm(arch), config).eval()
    input_ids, labels, attention_mask = batch(seed=3, length=12)  # row 0: prompt 0..1; row 1: padding 10..11
    generator = torch.Generator().manual_seed(5)
    is_masked = torch.rand(2, 12, generator=generator) < 0.6
    t = torch.tensor([[0.7, 0.3, 0.9], [0.2, 0.6, 0.5]])  # one time per block
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels, attention_mask=attention_mask, t=t, is_masked=is_masked)
    is_target = (labels != -100) & attention_mask.bool()
    if shift:
        is_target[:, 0] = False
    noisy = torch.where(is_masked & is_target, MASK_ID, input_ids)
    total = torch.zeros((), dtype=torch.float64)
    for row in range(2):
        for b in range(3):
            end = 4 * (b + 1)
            truncated = torch.cat([input_ids[row, : 4 * b], noisy[row, 4 * b : end]])[None]  # [1, end]
            with torch.no_grad():
                logits = model(input_ids=truncated, attention_mask=attention_mask[row : row + 1, :end]).logits
            log_probs = torch.log_softmax(logits[0].double(), -1)  # [end, V]
            for i in range(4 * b, end):
                if is_masked[row, i] and is_target[row, i]:
                    total += -log_probs[i, input_ids[row, i]] / t[row, b].double()
    expected = total / is_target.sum()
    assert (is_masked & is_target).sum() >= 6
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=5e-6)


def capture_loss_inputs(monkeypatch) -> list[dict]:
    """Record what the objective hands to `diffusion_loss`: the noisy logits' inputs, the masked positions, the
    targets and the ELBO weights of every copy (the objective's own view of its corruption)."""
    from peft_diffusion import objective as objective_module

    calls = []
    loss = objective_module.diffusion_loss

    def recording(logits, input_ids, is_masked, is_target, weight, **kwargs):
        calls.append(dict(input_ids=input_ids, is_masked=is_masked, is_target=is_target, weight=weight))
        return loss(logits, input_ids, is_masked, is_target, weight, **kwargs)

    monkeypatch.setattr(objective_module, "diffusion_loss", recording)
    return calls


def capture_noisy_ids(model) -> list[torch.Tensor]:
    """Record the `input_ids` (x_t) of every inner forward (the objective's forward on the corrupted copies)."""
    seen = []
    forward = model.forward

    def recording(*args, **kwargs):
        if kwargs.get("labels") is None:
            seen.append(kwargs["input_ids"])
        return forward(*args, **kwargs)

    model.forward = recording
    return seen


@pytest.mark.parametrize("shift", [True, False])
def test_sampled_corruption_touches_only_targets_and_is_seeded(shift, monkeypatch):
    """Exactly which tokens change: only targets (labels != -100, real tokens, not a document's first token under the
    shift) become the mask token, every other token is fed unchanged; the draw is the documented one."""
    model = get_diffusion_model(
        tiny_causal_lm("llama"), DiffusionConfig(mask_token_id=MASK_ID, block_size=4, shift=shift)
    )
    input_ids, labels, attention_mask = batch(length=16)
    labels[1, -2:] = input_ids[1, -2:]  # padding with labels: the attention mask alone keeps it clean
    calls, seen = capture_loss_inputs(monkeypatch), capture_noisy_ids(model)
    first = model(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        time_eps=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    noisy = seen[0]  # [2, 16]
    is_target = (labels != -100) & attention_mask.bool()
    if shift:
        is_target[:, 0] = False
    assert torch.equal(calls[0]["is_target"], is_target)
    is_masked = calls[0]["is_masked"]
    assert is_masked.any() and not (is_masked & ~is_target).any()
    assert torch.equal(noisy, torch.where(is_masked, MASK_ID, input_ids))  # masked -> mask id, the rest unchanged
    # with t >= 0.5 a quarter of the 24 targets is masked with overwhelming probability
    assert (is_masked & is_target).sum() >= 0.25 * is_target.sum()
    # the draw is `sample_time` then `corrupt` on one generator, as documented
    generator = torch.Generator().manual_seed(1)
    positions = torch.arange(16).expand(2, -1)
    t = group_time(sample_time(2, 16, eps=0.5, generator=generator), positions, torch.zeros_like(positions), 4)
    expected = corrupt(input_ids, is_target, t, mask_token_id=MASK_ID, block_size=4, generator=generator)
    assert torch.equal(is_masked, expected.is_masked)
    torch.testing.assert_close(calls[0]["weight"], expected.elbo_weight)
    again = model(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        time_eps=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    other = model(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        time_eps=0.5,
        generator=torch.Generator().manual_seed(2),
    )
    assert first.loss == again.loss and first.loss != other.loss


@pytest.mark.parametrize("masking", ["uniform", "position_dependent"])
def test_packed_documents_are_noised_per_document_block(masking):
    """Under padding-free packing, times and positions follow the documents' blocks, as the attention does."""
    strength = 1.0 if masking == "position_dependent" else 0.0
    config = DiffusionConfig(
        attention="block", block_size=4, shift=True, mask_token_id=MASK_ID, masking=masking, masking_strength=strength
    )
    model = get_diffusion_model(tiny_causal_lm("llama"), config).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, MASK_ID - 1, (1, 12), generator=generator)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])  # two documents of 6 tokens
    labels = input_ids.clone()
    drawn = model(
        input_ids=input_ids, labels=labels, position_ids=position_ids, generator=torch.Generator().manual_seed(7)
    )

    # By hand: one draw per column, read at the first column of each (document, block) group; positions restart.
    generator = torch.Generator().manual_seed(7)
    t = group_time(sample_time(1, 12, generator=generator), position_ids, torch.tensor([[0] * 6 + [1] * 6]), 4)
    assert torch.equal(t[0, 6:10], t[0, 6].expand(4)) and t[0, 6] != t[0, 4] and t[0, 4] != t[0, 0]
    is_target = torch.ones_like(input_ids, dtype=torch.bool)
    is_target[0, [0, 6]] = False  # document starts have no left neighbour under the shift
    corruption = corrupt(
        input_ids,
        is_target,
        t,
        mask_token_id=MASK_ID,
        masking=masking,
        strength=strength,
        block_size=4,
        generator=generator,
        positions=position_ids,
    )
    given = model(input_ids=input_ids, labels=labels, position_ids=position_ids, t=t, is_masked=corruption.is_masked)
    assert corruption.is_masked.any()
    torch.testing.assert_close(drawn.loss, given.loss, rtol=0, atol=0)
    torch.testing.assert_close(drawn.metrics["mean_t"], (t * is_target).sum() / is_target.sum())


@pytest.mark.parametrize("masking", ["uniform", "position_dependent"])
def test_complementary_masking_scores_every_target_once(masking, monkeypatch):
    """Each target is masked in exactly one copy of the pair, prompt/padding/first tokens in neither; both copies
    carry the time floor: no weight above 1 / time_eps (the primary's 1/t for t >= eps, the complement's
    p / max(1 - p, eps))."""
    strength = 1.0 if masking == "position_dependent" else 0.0
    config = DiffusionConfig(
        attention="block", block_size=4, mask_token_id=MASK_ID, masking=masking, masking_strength=strength
    )
    model = get_diffusion_model(tiny_causal_lm("llama"), config)
    input_ids, labels, attention_mask = batch(length=16)
    calls, seen = capture_loss_inputs(monkeypatch), capture_noisy_ids(model)
    eps = 0.25
    out = model(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        complementary_masking=True,
        time_eps=eps,
        generator=torch.Generator().manual_seed(0),
    )
    is_target = (labels != -100) & attention_mask.bool()
    is_target[:, 0] = False  # shift: a document's first token is never a target
    is_masked, weight = calls[0]["is_masked"], calls[0]["weight"]  # [4, 16]: the primary rows, then the complement
    primary, second = is_masked[:2], is_masked[2:]
    assert torch.equal(primary ^ second, is_target) and not (primary & second).any()
    assert torch.equal(seen[0], torch.where(is_masked, MASK_ID, input_ids.repeat(2, 1)))
    assert out.logits.shape[0] == 4 and torch.isfinite(out.loss)
    # the weights by hand from the same draw: the primary's, and p / max(1 - p, eps) times it for the complement
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(16).expand(2, -1)
    t = group_time(sample_time(2, 16, eps=eps, generator=generator), positions, torch.zeros_like(positions), 4)
    assert (t >= eps).all()
    first = corrupt(
        input_ids,
        is_target,
        t,
        mask_token_id=MASK_ID,
        masking=masking,
        strength=strength,
        block_size=4,
        generator=generator,
    )
    assert torch.equal(primary, first.is_masked)
    p = first.mask_prob
    expected = torch.where(is_target & (p < 1), first.elbo_weight * p / (1 - p).clamp(min=eps), 0.0)
    torch.testing.assert_close(weight[:2], first.elbo_weight)
    torch.testing.assert_close(weight[2:], expected)
    if masking == "uniform":  # 1/t and 1/max(1 - t, eps): both at most 1 / eps
        scored = is_masked & is_target.repeat(2, 1)
        assert (weight[scored] > 0).all() and (weight[scored] <= 1 / eps + 1e-4).all()
    if masking == "uniform":  # near t = 1 the floor caps the complement at 1 / eps (1 / (1 - t) would be 1000)
        model(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            t=torch.full((2, 4), 0.999),
            complementary_masking=True,
            time_eps=eps,
        )
        second_weight = calls[-1]["weight"][2:]
        torch.testing.assert_close(second_weight[is_target], torch.full_like(second_weight[is_target], 1 / eps))


def test_labels_without_targets_raise():
    model = get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(mask_token_id=MASK_ID))
    input_ids, labels, _ = batch()
    labels[0] = -100
    with pytest.raises(ValueError, match="without any target token"):
        model(input_ids=input_ids, labels=labels)
    with pytest.raises(ValueError, match="needs the time"):
        model(input_ids=input_ids, labels=batch()[1], is_masked=torch.ones_like(input_ids, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape of `input_ids`"):
        model(input_ids=input_ids, labels=labels[:, :4])


def test_annealing_ratio_schedule():
    assert [annealing_ratio(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert annealing_ratio(3, 0) == 1.0
    with pytest.raises(ValueError, match="anneal_steps"):
        annealing_ratio(1, -1)


CONFIGS = {
    "diffullama": dict(attention="annealed", shift=True),
    "bidirectional": dict(attention="bidirectional", shift=True),
    "efficient_dlm": dict(
        attention="block", block_size=4, shift=False, masking="position_dependent", masking_strength=1.0
    ),
    "block_shift": dict(attention="block", block_size=4, shift=True),
}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_thirty_steps_lower_the_loss(name, lora):
    torch.manual_seed(0)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear") if lora else None
    # LoRA needs a base whose features carry signal: a larger init than the near-uniform default.
    base = tiny_causal_lm("llama", initializer_range=0.3 if lora else 0.02)
    model = get_diffusion_model(
        base, DiffusionConfig(mask_token_id=MASK_ID, **CONFIGS[name]), peft_config=peft_config
    ).train()
    # A learnable corpus: two fixed repeating sequences.
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 2, [20, 22, 24, 26, 28, 30, 32, 34] * 2])
    labels = input_ids.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2 if lora else 3e-3)
    generator = torch.Generator().manual_seed(0)

    def evaluate():
        with torch.no_grad():
            eval_generator = torch.Generator().manual_seed(123)
            return sum(
                model(input_ids=input_ids, labels=labels, generator=eval_generator).loss.item() for _ in range(8)
            )

    before = evaluate()
    for step in range(30):
        model.annealing_ratio = annealing_ratio(step, 20)
        loss = model(input_ids=input_ids, labels=labels, generator=generator, antithetic_time=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_two_stream_head_on_needed_rows_equals_the_full_head(arch):
    """The LM head runs only on the rows a prediction reads (noisy half + clean rows before block starts); the
    logits equal those of the full head over all 2L rows (the reference: the head on every row)."""
    model = get_diffusion_model(
        tiny_causal_lm(arch), DiffusionConfig(attention="block", block_size=4, mask_token_id=MASK_ID)
    ).eval()
    input_ids, labels, attention_mask = batch(length=12)
    noisy = input_ids.clone()
    noisy[:, 1::3] = MASK_ID
    kwargs = dict(input_ids=noisy, clean_input_ids=input_ids, attention_mask=attention_mask)
    calls = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    with torch.no_grad():
        fast = model(**kwargs).logits
        model._takes_logits_to_keep = False  # the full head over [x_t ; x_0]
        full = model(**kwargs).logits
    handle.remove()
    assert calls[1] == 24
    # noisy rows 0..10 except 3 and 7 (positions 4 and 8 start blocks and read the clean rows 12 + 3, 12 + 7)
    assert calls[0] == 9 + 2
    torch.testing.assert_close(fast, full)
