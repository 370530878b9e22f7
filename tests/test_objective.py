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


def test_sampled_corruption_touches_only_targets_and_is_seeded():
    model = get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(mask_token_id=MASK_ID, block_size=4))
    input_ids, labels, attention_mask = batch()
    first = model(input_ids=input_ids, labels=labels, generator=torch.Generator().manual_seed(1)).loss
    again = model(input_ids=input_ids, labels=labels, generator=torch.Generator().manual_seed(1)).loss
    other = model(input_ids=input_ids, labels=labels, generator=torch.Generator().manual_seed(2)).loss
    assert first == again and first != other


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


def test_complementary_masking_scores_every_target_once():
    model = get_diffusion_model(
        tiny_causal_lm("llama"), DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID)
    )
    input_ids, labels, attention_mask = batch()
    out = model(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        complementary_masking=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.logits.shape[0] == 4 and torch.isfinite(out.loss)


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
