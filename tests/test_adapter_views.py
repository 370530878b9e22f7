"""`AdapterViews`: the base view is the untouched base bit for bit, the lean adapter view is the PEFT adapter model up
to float rounding, and both give the PEFT model back exactly as it was (modules and weights), also on an error;
generate / infill / loglikelihood run through the lean layers and give what PEFT's layers give."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MASK_ID, tiny_causal_lm
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear

from peft_diffusion import DiffusionConfig, adapter_views, get_diffusion_model, loglikelihood
from peft_diffusion.adapter_views import AdapterViews

IDS = torch.tensor([[1, 5, 6, 9, 3, 2, 8, 4], [7, 7, 2, 1, 4, 5, 6, 3]])


def converted(arch, **lora):
    """(an untouched deep copy of the base, the converted model with a random adapter: drafter != base)."""
    base = tiny_causal_lm(arch)
    reference = copy.deepcopy(base).eval()
    torch.manual_seed(0)
    lora = LoraConfig(**{"r": 4, "target_modules": "all-linear", "init_lora_weights": False, **lora})
    config = DiffusionConfig(attention="block", block_size=4, mask_token_id=MASK_ID)
    return reference, get_diffusion_model(base, config, peft_config=lora).eval()


def snapshot(model):
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
    )


def assert_unchanged(model, before):
    modules, weights = snapshot(model)
    assert modules == before[0]
    assert weights.keys() == before[1].keys()
    assert all(torch.equal(weights[name], before[1][name]) for name in weights)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])  # gpt2: Conv1D layers (fan_in_fan_out)
@torch.no_grad()
def test_base_is_the_base_and_drafter_is_the_adapter_model(arch):
    reference, model = converted(arch)
    before = snapshot(model)
    vocab = reference.config.vocab_size
    views = AdapterViews(model.model, vocab)
    assert len(views.swaps) > 0

    expected_base = reference(input_ids=IDS).logits
    expected_drafter = model(input_ids=IDS).logits  # through PEFT's layers
    with views.base():
        assert not any(isinstance(module, LoraLinear) for module in model.modules())
        assert torch.equal(model.causal_lm(input_ids=IDS).logits[..., :vocab], expected_base[..., :vocab])
    with views.adapter():
        assert not any(isinstance(module, LoraLinear) for module in model.modules())
        drafted = model(input_ids=IDS).logits
    assert not torch.equal(drafted, expected_base)  # the adapter is on in the adapter view
    torch.testing.assert_close(drafted, expected_drafter, rtol=1e-5, atol=1e-5)
    assert_unchanged(model, before)
    assert torch.equal(model(input_ids=IDS).logits, expected_drafter)  # PEFT's layers are back, on


@torch.no_grad()
def test_layers_it_cannot_replace_are_switched_off_in_the_base_view():
    # DoRA is a LoRA variant: its layers stay PEFT's, switched off by `enable_adapters(False)`.
    reference, model = converted("llama", use_dora=True)
    views = AdapterViews(model.model, reference.config.vocab_size)
    assert views.swaps == [] and len(views.switched) > 0
    expected, expected_drafter = reference(input_ids=IDS).logits, model(input_ids=IDS).logits
    with views.base():
        assert torch.equal(model.causal_lm(input_ids=IDS).logits[..., : expected.shape[-1]], expected)
    with views.adapter():  # PEFT's own layers, on
        assert torch.equal(model(input_ids=IDS).logits, expected_drafter)
    assert all(not layer.disable_adapters for layer in views.switched)


@torch.no_grad()
def test_an_error_inside_a_view_restores_the_model():
    _, model = converted("llama")
    before = snapshot(model)
    views = AdapterViews(model.model, MASK_ID)
    for view in (views.base, views.adapter):
        with pytest.raises(RuntimeError, match="inside"), view():
            raise RuntimeError("inside")
        assert_unchanged(model, before)


@torch.no_grad()
def test_active_dropout_keeps_peft_s_layers():
    _, model = converted("llama", lora_dropout=0.5)
    model.train()  # dropout on: the lean layer has none, so nothing is replaced
    assert AdapterViews(model.model).swaps == []
    model.eval()
    assert len(AdapterViews(model.model).swaps) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_infill_and_likelihood_through_lean_layers_match_peft_s(arch, monkeypatch):
    _, model = converted(arch)
    seen = []
    original_forward = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: seen.append(1) or original_forward(self, *a, **k))
    prompts = IDS[:, :5]
    gap = IDS.clone()
    gap[:, 2:6] = MASK_ID

    def gen():
        return torch.Generator().manual_seed(0)

    def run():
        seen.clear()
        out = (
            model.generate(prompts, max_new_tokens=8, threshold=0.9),
            model.infill(gap),
            model.generate(prompts, max_new_tokens=8, do_sample=True, generator=gen()),
            torch.tensor(loglikelihood(model, IDS[0, :4], IDS[0, 4:], mc_samples=4, generator=gen()).logprob),
        )
        return out, len(seen)

    merged, calls = run()
    assert calls == 0  # no forward went through PEFT's LoRA layers
    monkeypatch.setattr(adapter_views, "_is_plain_lora_linear", lambda module: False)
    through_peft, calls = run()
    assert calls > 0
    for a, b in zip(merged, through_peft):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # tokens: equal


def test_lean_inference_is_a_no_op_with_gradients():
    _, model = converted("llama")
    with torch.enable_grad(), adapter_views.lean_inference(model):
        assert any(isinstance(module, LoraLinear) for module in model.modules())
    with torch.no_grad(), adapter_views.lean_inference(model):
        assert not any(isinstance(module, LoraLinear) for module in model.modules())
    assert any(isinstance(module, LoraLinear) for module in model.modules())


# ----------------------------------------------------------------------------------------------------------------------
# The LM head over a few rows on CPU
# ----------------------------------------------------------------------------------------------------------------------


def test_head_rows_first_equals_the_linear_head_and_is_removed_afterwards():
    base = tiny_causal_lm("llama")
    head = base.get_output_embeddings()
    hidden = torch.randn(2, 3, head.in_features)
    expected = torch.nn.functional.linear(hidden, head.weight, head.bias)
    calls = []
    original = adapter_views._head_rows_first

    def counted(*args):
        calls.append(1)
        return original(*args)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapter_views, "_head_rows_first", counted)
        with adapter_views.head_rows_first(base, rows=6):
            got = head(hidden)
        assert "forward" not in vars(head)
        with adapter_views.head_rows_first(base, rows=1):  # one row: F.linear's own path is the fast one
            head(hidden)
        with pytest.raises(RuntimeError), adapter_views.head_rows_first(base, rows=6):
            raise RuntimeError("inside")
        assert "forward" not in vars(head)
    assert calls == [1]
    torch.testing.assert_close(got, expected)
    with adapter_views.head_rows_first(base, rows=6):  # gradients on: training keeps the module's own forward
        assert "forward" not in vars(head)


def test_the_diffusion_forward_uses_the_weight_first_head_on_cpu_inference_only(monkeypatch):
    model = get_diffusion_model(
        tiny_causal_lm("llama"), DiffusionConfig(attention="block", block_size=2, mask_token_id=MASK_ID)
    ).eval()
    input_ids = torch.tensor([[1, 5, 6, 7]])
    reference = model(input_ids=input_ids).logits.detach()  # gradients on: the head's own F.linear
    calls = []
    original = adapter_views._head_rows_first
    monkeypatch.setattr(adapter_views, "_head_rows_first", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert calls == [1]
    torch.testing.assert_close(logits, reference)
    model(input_ids=input_ids).logits.sum().backward()  # training: not used
    assert calls == [1]


def test_head_rows_first_reaches_a_head_under_trainable_tokens():
    """A tied head with the mask row trained (PEFT's TrainableTokensWrapper around it): with the rows merged, as
    inference runs, the wrapper calls its base layer, and that is where the weight-first product goes."""
    from peft.utils import AuxiliaryTrainingWrapper

    from peft_diffusion.conversion import token_rows_merged

    base = tiny_causal_lm("llama", tie_word_embeddings=True)
    model = get_diffusion_model(
        base,
        DiffusionConfig(attention="block", block_size=2, mask_token_id=MASK_ID),
        peft_config=LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=[MASK_ID]),
    ).eval()
    assert isinstance(model.causal_lm.get_output_embeddings(), AuxiliaryTrainingWrapper)
    input_ids = torch.tensor([[1, 5, 6, MASK_ID]])
    reference = model(input_ids=input_ids).logits.detach()  # gradients on: PEFT's own path
    calls = []
    original = adapter_views._head_rows_first
    with pytest.MonkeyPatch.context() as patch, torch.no_grad(), token_rows_merged(model.model):
        patch.setattr(adapter_views, "_head_rows_first", lambda *args: calls.append(1) or original(*args))
        logits = model(input_ids=input_ids).logits
    assert calls == [1]
    torch.testing.assert_close(logits, reference)
