"""Extension points: a sampler, a noise schedule, a masking policy and an attention pattern registered from outside
the package are used through `DiffusionConfig`, the loss, the trainer and `generate()`, unchanged.

Each registered piece records that it was called, so a consumer that bypasses the registry makes the test fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import MASK_ID, tiny_causal_lm
from test_model import word_tokenizer
from test_trainer import dataset, lora, training_args

from peft_diffusion import DiffusionConfig, get_diffusion_model
from peft_diffusion.attention import ATTENTION_PATTERNS, AttentionPattern, register_attention_pattern
from peft_diffusion.corruption import MASKING_POLICIES, register_masking_policy
from peft_diffusion.noise import NOISE_SCHEDULES, register_noise_schedule
from peft_diffusion.samplers import SAMPLERS, register_sampler
from peft_diffusion.trainer import DiffusionTrainer

CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


@pytest.fixture
def registered():
    """Register one of each under test names; remove them afterwards."""

    @register_noise_schedule("test_square")
    class SquareSchedule:
        def alpha(self, t):
            _count("schedule")
            return 1 - t**2

        def alpha_derivative(self, t):
            return -2 * t

    @register_masking_policy("test_every_other")
    def every_other_masking(t, schedule, positions, is_target, strength):
        """Uniform masking rate, but only even positions are ever masked (weight doubled to stay unbiased)."""
        _count("masking")
        alpha = schedule.alpha(t)
        mask_prob = torch.where(is_target & (positions % 2 == 0), 1 - alpha, torch.zeros_like(t))
        weight = torch.where(mask_prob > 0, -schedule.alpha_derivative(t) / (1 - alpha), torch.zeros_like(t))
        return mask_prob, weight

    @register_sampler("test_leftmost")
    @dataclass(frozen=True)
    class LeftmostSampler:
        def confidence(self, probs, tokens, *, generator=None):
            _count("sampler")
            return -torch.arange(tokens.shape[1], dtype=torch.float32, device=tokens.device).expand(tokens.shape)

    @register_attention_pattern("test_pairs")
    class PairsPattern(AttentionPattern):
        """Block-causal attention over blocks of 2, without clean context."""

        def rule(self, layout):
            _count("pattern")
            blocks = layout.positions // 2
            return lambda b, q, k: blocks[b, k] <= blocks[b, q]

        def block_size(self, config):
            return 2

    CALLS.clear()
    yield
    for registry, name in [
        (NOISE_SCHEDULES, "test_square"),
        (MASKING_POLICIES, "test_every_other"),
        (SAMPLERS, "test_leftmost"),
        (ATTENTION_PATTERNS, "test_pairs"),
    ]:
        registry.pop(name, None)


def config(**overrides):
    settings = dict(
        attention="test_pairs", noise_schedule="test_square", masking="test_every_other", mask_token_id=MASK_ID
    )
    settings.update(overrides)
    return DiffusionConfig(**settings)


def test_the_config_accepts_registered_names_only(registered):
    assert config().attention_block_size == 2
    for field in ("attention", "noise_schedule", "masking"):
        with pytest.raises(ValueError, match=f"`{field}` must be one of"):
            config(**{field: "test_unregistered"})
    with pytest.raises(ValueError, match="`attention` must be one of"):
        config(attention="causal")  # registered, but a reference pattern only


def test_the_attention_pattern_reaches_the_model(registered):
    """Under the pairs pattern, token j reaches position i (no shift) iff j // 2 <= i // 2."""
    model = get_diffusion_model(tiny_causal_lm("llama", "eager"), config(shift=False)).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        base = model(input_ids=input_ids).logits
        for j in range(6):
            changed = input_ids.clone()
            changed[0, j] = 11
            moved = (model(input_ids=changed).logits - base).abs().amax(-1)[0] > 1e-6
            assert moved.tolist() == [j // 2 <= i // 2 for i in range(6)], j
    assert CALLS["pattern"] > 0


def test_the_loss_uses_the_schedule_and_the_policy(registered):
    model = get_diffusion_model(tiny_causal_lm("llama", "sdpa"), config())
    input_ids = torch.randint(3, MASK_ID - 1, (2, 8), generator=torch.Generator().manual_seed(0))
    t = torch.full((2, 4), 0.5)  # per block of 2
    out = model(input_ids=input_ids, labels=input_ids.clone(), t=t, generator=torch.Generator().manual_seed(1))
    assert CALLS["masking"] > 0 and CALLS["schedule"] > 0
    masked_positions = out.metrics["masked_fraction"]
    assert torch.isfinite(out.loss)
    assert masked_positions <= 0.5 + 1e-6  # odd positions are never masked


def test_the_trainer_and_generate_use_them(registered, tmp_path):
    trainer = DiffusionTrainer(
        tiny_causal_lm("llama", "sdpa"),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=dataset("text"),
        processing_class=word_tokenizer(),
        diffusion_config=config(mask_token_id=None),
        peft_config=lora(),
    )
    trainer.train()
    assert CALLS["masking"] >= 2 and CALLS["pattern"] >= 2
    model = trainer.model.eval()
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(
        input_ids=prompt, max_new_tokens=4, steps=4, sampler="test_leftmost", return_dict_in_generate=True
    )
    assert CALLS["sampler"] >= 4
    assert out.sequences.shape == (1, 7)
