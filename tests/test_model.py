"""DiffusionLM: conversion, mask token, PEFT/full/QLoRA, save/load/push round trips, bad input."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import MASK_ID, VOCAB_SIZE, tiny_causal_lm
from peft import LoraConfig, PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import peft_diffusion
from peft_diffusion import DiffusionConfig, DiffusionLM, get_diffusion_model
from peft_diffusion.architectures import check_architecture


def word_tokenizer(vocab_size=VOCAB_SIZE - 8, **special):
    """A real fast tokenizer over `vocab_size` word tokens (fewer than the tiny model's rows)."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2", **special)


def lora(**kwargs):
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kwargs)


def random_ids(length=10, batch=2, seed=0):
    return torch.randint(3, MASK_ID - 1, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


def test_config_round_trips_with_base_config_as_sub_config(tmp_path):
    base = tiny_causal_lm("qwen3")
    config = DiffusionConfig(attention="annealed", block_size=8, shift=False, mask_token_id=5, base_config=base.config)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "diffusion_lm" and saved["base_config"]["model_type"] == "qwen3"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DiffusionConfig)
    assert type(loaded.base_config).__name__ == "Qwen3Config"
    assert (loaded.attention, loaded.block_size, loaded.shift, loaded.mask_token_id) == ("annealed", 8, False, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": "sideways"}, "`attention` must be one of"),
        ({"block_size": 0}, "`block_size` must be a positive integer"),
        ({"block_size": -4}, "`block_size` must be a positive integer"),
        ({"noise_schedule": "quadratic"}, "`noise_schedule` must be one of"),
        ({"masking": "random"}, "`masking` must be one of"),
        ({"masking_strength": -1.0}, r"`masking_strength` must be a number in \[0, 10\]"),
        ({"mask_token_id": -1}, "`mask_token_id` must be a non-negative int"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**kwargs)


def test_config_rejects_mask_token_outside_base_vocab():
    base = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="outside the base model's embedding matrix"):
        DiffusionConfig(mask_token_id=VOCAB_SIZE, base_config=base.config)


# --------------------------------------------------------------------------------------------------------------
# Mask token
# --------------------------------------------------------------------------------------------------------------


def test_mask_token_takes_a_spare_row_without_resizing():
    tokenizer = word_tokenizer()  # 120 tokens, 128 embedding rows
    model = get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(), tokenizer=tokenizer)
    assert model.config.mask_token_id == 120 == tokenizer.mask_token_id
    assert model.config.mask_token == "<|mask|>"
    assert model.get_input_embeddings().weight.shape[0] == VOCAB_SIZE


def test_mask_token_added_with_mean_initialised_row_when_the_matrix_is_full():
    tokenizer = word_tokenizer(vocab_size=VOCAB_SIZE)
    base = tiny_causal_lm("llama")
    mean_row = base.get_input_embeddings().weight.mean(0)
    model = get_diffusion_model(base, DiffusionConfig(), tokenizer=tokenizer)
    embeddings = model.get_input_embeddings().weight
    assert model.config.mask_token_id == VOCAB_SIZE and embeddings.shape[0] == VOCAB_SIZE + 1
    assert model.config.base_config.vocab_size == VOCAB_SIZE + 1
    # transformers' mean resizing samples around the old mean: the new row is close to it.
    assert torch.allclose(embeddings[VOCAB_SIZE], mean_row, atol=0.05)


def test_mask_token_reuses_the_tokenizers_mask_token_and_reserved_tokens():
    tokenizer = word_tokenizer(mask_token="w7")
    model = get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(), tokenizer=tokenizer)
    assert model.config.mask_token_id == 7
    reserved = word_tokenizer()
    reserved.add_special_tokens({"additional_special_tokens": ["<|reserved_special_token_0|>"]})
    model = get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(), tokenizer=reserved)
    assert model.config.mask_token_id == 120
    assert reserved.mask_token == "<|reserved_special_token_0|>"


def test_mask_token_is_never_predicted():
    model = get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(mask_token_id=MASK_ID))
    logits = model(input_ids=random_ids()).logits
    assert (logits.argmax(-1) != MASK_ID).all()
    assert torch.isfinite(logits).all()  # a finite minimum, so softmax and cross-entropy never see NaN
    assert (logits[..., MASK_ID] == torch.finfo(logits.dtype).min).all()
    assert torch.softmax(logits, -1)[..., MASK_ID].max() == 0


# --------------------------------------------------------------------------------------------------------------
# Shift
# --------------------------------------------------------------------------------------------------------------


def test_shift_reads_the_previous_hidden_state():
    base = tiny_causal_lm("llama")
    input_ids = random_ids()
    shifted = get_diffusion_model(base, DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID))
    plain = DiffusionLM(DiffusionConfig.from_dict({**shifted.config.to_dict(), "shift": False}), model=base)
    with torch.no_grad():
        with_shift, without_shift = shifted(input_ids=input_ids).logits, plain(input_ids=input_ids).logits
    torch.testing.assert_close(with_shift[:, 1:], without_shift[:, :-1])
    torch.testing.assert_close(with_shift[:, 0], without_shift[:, 0])  # position 0 reads itself


# --------------------------------------------------------------------------------------------------------------
# PEFT, full finetuning, QLoRA
# --------------------------------------------------------------------------------------------------------------


def test_lora_trains_only_the_adapter_and_the_mask_row():
    tokenizer = word_tokenizer(vocab_size=VOCAB_SIZE)  # forces a new embedding row
    model = get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(), tokenizer=tokenizer, peft_config=lora())
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name or "trainable_tokens" in name for name in trainable)
    assert any("trainable_tokens" in name for name in trainable)
    model.train()
    ids = random_ids()
    ids[:, 3] = model.config.mask_token_id
    loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    assert all(grad is not None for grad in grads.values())


def test_full_finetuning_trains_everything():
    model = get_diffusion_model(tiny_causal_lm("gpt2"), DiffusionConfig(mask_token_id=MASK_ID))
    assert all(param.requires_grad for param in model.parameters())
    assert not model.is_peft


@pytest.mark.parametrize("peft", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(peft):
    def grads(checkpointing):
        base = tiny_causal_lm("llama")
        model = get_diffusion_model(
            base, DiffusionConfig(mask_token_id=MASK_ID), peft_config=lora() if peft else None
        ).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model(input_ids=random_ids(), clean_input_ids=random_ids(seed=1)).logits.float().pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-5, rtol=1e-4)


def test_qlora_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    base = tiny_causal_lm("llama", hidden_size=64, intermediate_size=128)
    base.save_pretrained(tmp_path / "base")
    model = get_diffusion_model(
        str(tmp_path / "base"), DiffusionConfig(mask_token_id=MASK_ID), peft_config=lora(), load_in_4bit=True
    )
    assert model.causal_lm.is_loaded_in_4bit
    model.train()
    model(input_ids=random_ids()).logits.float().pow(2).mean().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ImportError, match=r"peft-diffusion\[qlora\]"):
        get_diffusion_model(str(tmp_path), DiffusionConfig(mask_token_id=MASK_ID), load_in_4bit=True)


# --------------------------------------------------------------------------------------------------------------
# Save / load / push
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_adapter_round_trip(tmp_path, arch):
    base = tiny_causal_lm(arch)
    base.save_pretrained(tmp_path / "base")
    tokenizer = word_tokenizer(vocab_size=VOCAB_SIZE)  # mask token added: the base grows by one row
    config = DiffusionConfig(attention="block", block_size=4)
    model = get_diffusion_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config, tokenizer=tokenizer, peft_config=lora()
    )
    model.config.base_model_name_or_path = str(tmp_path / "base")
    with torch.no_grad():  # make the mask row differ from its initial value, as after training
        model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].add_(0.5)
    model.eval()
    model.generation_config.sampler = "prefix"  # a decoding setting saved with the model (as `convert` does)
    ids = random_ids()
    ids[:, 5] = model.config.mask_token_id
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "diffusion_config.json"} <= files
    assert "config.json" not in files

    loaded = DiffusionLM.from_pretrained(tmp_path / "adapter").eval()
    assert loaded.is_peft and loaded.config.block_size == 4 and loaded.config.mask_token_id == VOCAB_SIZE
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    assert loaded.generation_config.sampler == "prefix"  # and generate uses it by default
    prompt = ids[:1, :4]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6), model.generate(prompt, max_new_tokens=6))

    # The adapter is a standard PEFT adapter: stock PeftModel loads it on a (resized) base.
    stock_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    stock_base.resize_token_embeddings(VOCAB_SIZE + 1)
    stock = PeftModel.from_pretrained(stock_base, tmp_path / "adapter")
    assert any("lora_A" in name for name, _ in stock.named_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_full_model_round_trip_through_auto_classes(tmp_path, arch):
    model = get_diffusion_model(
        tiny_causal_lm(arch), DiffusionConfig(attention="bidirectional", shift=False, mask_token_id=MASK_ID)
    ).eval()
    model.generation_config.sampler, model.generation_config.threshold = "prefix", 0.5
    ids = random_ids()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert isinstance(loaded, DiffusionLM) and loaded.config.attention == "bidirectional"
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    again = DiffusionLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(again(input_ids=ids).logits, expected)
    for restored in (loaded, again):  # the decoding settings too (transformers' GenerationConfig would drop them)
        assert (restored.generation_config.sampler, restored.generation_config.threshold) == ("prefix", 0.5)
    if model.causal_lm.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("peft", [False, True])
def test_push_to_hub_uploads_what_from_pretrained_loads(tmp_path, monkeypatch, peft):
    import transformers.utils.hub as hub

    base = tiny_causal_lm("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_diffusion_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        DiffusionConfig(mask_token_id=MASK_ID, base_model_name_or_path=str(tmp_path / "base")),
        peft_config=lora() if peft else None,
    ).eval()
    uploaded = tmp_path / "hub"
    monkeypatch.setattr(
        hub, "hf_api", lambda: SimpleNamespace(create_repo=lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    )
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: SimpleNamespace(save=lambda path: None))

    def upload(self, working_dir, repo_id, **kwargs):
        shutil.copytree(working_dir, uploaded)
        return repo_id

    monkeypatch.setattr(DiffusionLM, "_upload_modified_files", upload)
    assert model.push_to_hub("me/tiny-diffusion") == "me/tiny-diffusion"
    loaded = DiffusionLM.from_pretrained(uploaded, attn_implementation="eager").eval()
    ids = random_ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.is_peft == peft


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "match"),
    [("mamba", "selective state-space"), ("lfm2", "convolutions"), ("falcon_h1", "mamba")],
)
def test_non_attention_mixers_are_refused(model_type, match):
    with pytest.raises(ValueError, match=match):
        check_architecture(SimpleNamespace(model_type=model_type))


def test_hybrid_layer_types_are_refused():
    with pytest.raises(ValueError, match="layer_types"):
        check_architecture(
            SimpleNamespace(model_type="new_hybrid", layer_types=["full_attention", "linear_attention"])
        )


def unknown_architecture():
    """A real llama renamed to a model type the table does not know (as remote code or a newer transformers)."""
    base = tiny_causal_lm("llama")
    base.config.model_type = "my_remote_llama"
    return base


def test_unverified_architecture_is_probed(monkeypatch):
    # An architecture outside the table takes the generic path after a probe, which must actually run.
    from peft_diffusion import conversion as conversion_module

    calls = []
    probe = conversion_module.probe_architecture
    monkeypatch.setattr(
        conversion_module, "probe_architecture", lambda causal_lm: calls.append(causal_lm) or probe(causal_lm)
    )
    model = get_diffusion_model(
        unknown_architecture(), DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID)
    )
    assert model.config.base_config.model_type == "my_remote_llama"
    assert calls == [model.causal_lm]
    get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID))
    assert len(calls) == 1  # verified types are not probed


@pytest.mark.parametrize(("backend", "probed_backends"), [("eager", ["eager"]), ("sdpa", ["sdpa", "eager"])])
def test_the_probe_runs_every_check(backend, probed_backends, monkeypatch):
    """The probe of an unknown architecture really runs: one perturbation forward per pattern of `CHECK_PATTERNS` on
    each backend, on a tiny copy of the model's own class, each under its diffusion layout; not just no exception."""
    from peft_diffusion import _compat
    from peft_diffusion import probe as probe_module

    forwards = []
    influence = probe_module._influence
    layouts = []
    attention = probe_module.diffusion_attention

    def recording_attention(layout):
        layouts.append(layout.pattern + ("+clean" if layout.is_clean is not None else ""))
        return attention(layout)

    def recording_influence(causal_lm, input_ids, position_ids, tolerance):
        forwards.append((type(causal_lm).__name__, _compat.attn_implementation(causal_lm.config), input_ids.shape[1]))
        return influence(causal_lm, input_ids, position_ids, tolerance)

    monkeypatch.setattr(probe_module, "_influence", recording_influence)
    monkeypatch.setattr(probe_module, "diffusion_attention", recording_attention)
    base = unknown_architecture()
    base.set_attn_implementation(backend)
    get_diffusion_model(base, DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID))
    patterns = probe_module.CHECK_PATTERNS
    assert len(forwards) == len(patterns) * len(probed_backends)
    assert [implementation for _, implementation, _ in forwards] == [b for b in probed_backends for _ in patterns]
    assert {name for name, _, _ in forwards} == {type(base).__name__}
    length = probe_module.CHECK_LENGTH
    assert sorted({width for _, _, width in forwards}) == [length, 2 * length]  # the two-stream layout ran
    expected = ["block+clean" if p == "block+clean_context" else p.split("+")[0] for p in patterns]
    assert layouts == expected * len(probed_backends)


def test_probe_rejects_a_model_that_ignores_the_mask(monkeypatch):
    from peft_diffusion import probe as probe_module

    monkeypatch.setattr(probe_module, "diffusion_attention", lambda layout: _null_context())
    with pytest.raises(ValueError, match="'my_remote_llama' failed the diffusion attention probe"):
        get_diffusion_model(unknown_architecture(), DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID))


class _null_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_bad_conversion_inputs():
    with pytest.raises(ValueError, match="No mask token"):
        get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig())
    with pytest.raises(ValueError, match="outside the embedding matrix"):
        get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(mask_token_id=VOCAB_SIZE + 5))
    with pytest.raises(ValueError, match="does not belong to `model`"):
        get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(), tokenizer=word_tokenizer(vocab_size=200))
    with pytest.raises(ValueError, match="already a PeftModel"):
        from peft import get_peft_model

        get_diffusion_model(get_peft_model(tiny_causal_lm("llama"), lora()), DiffusionConfig(mask_token_id=MASK_ID))
    with pytest.raises(ValueError, match="only attention='bidirectional'"):
        base = tiny_causal_lm("llama")
        base.config._attn_implementation = "flash_attention_2"
        get_diffusion_model(base, DiffusionConfig(attention="block", mask_token_id=MASK_ID))


def test_causal_first_token_round_trips_and_older_files_load_without_it(tmp_path):
    config = DiffusionConfig(attention="block", block_size=4, mask_token_id=MASK_ID, causal_first_token=True)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["causal_first_token"] is True
    assert DiffusionConfig.from_pretrained(tmp_path).causal_first_token is True
    # a file written before the field existed: its model was trained with the first token seeing its block
    older = {key: value for key, value in config.to_dict().items() if key != "causal_first_token"}
    assert DiffusionConfig.from_dict(older).causal_first_token is False
    with pytest.raises(ValueError, match=r"`causal_first_token` must be bool, got causal_first_token='yes'"):
        DiffusionConfig(causal_first_token="yes")
    with pytest.raises(ValueError, match="causal_first_token=True needs the first token to see only itself"):
        base = tiny_causal_lm("llama")
        base.config._attn_implementation = "flash_attention_2"
        get_diffusion_model(base, DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID,
                                                  causal_first_token=True))  # fmt: skip


def test_forward_bad_inputs():
    model = get_diffusion_model(
        tiny_causal_lm("llama"), DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID)
    )
    with pytest.raises(ValueError, match="clean_input_ids"):
        model(input_ids=random_ids(), clean_input_ids=random_ids())
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=random_ids(), attention_mask=torch.ones(2, 3))


@pytest.mark.gpu
def test_bidirectional_flash_attention_on_gpu():
    pytest.importorskip("flash_attn")
    base = tiny_causal_lm("llama", "flash_attention_2").to("cuda", torch.bfloat16)
    model = get_diffusion_model(base, DiffusionConfig(attention="bidirectional", shift=False, mask_token_id=MASK_ID))
    ids = random_ids().cuda()
    changed = ids.clone()
    changed[:, -1] = 5
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits[:, 0], model(input_ids=changed).logits[:, 0])


def test_import_registers_auto_classes():
    assert AutoConfig.for_model("diffusion_lm").__class__ is DiffusionConfig
    assert peft_diffusion.__version__


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied and tied LM head
def test_token_rows_merged_inference_is_exact_and_leaves_the_weights_as_they_were(arch):
    """Generation and likelihoods run with the mask row written into the embedding (PEFT's merge, not a rebuild of
    the matrix on every forward): the logits are those of the unmerged adapter, the weights afterwards bit-identical,
    and nothing is left merged; with gradients the context does nothing (training reaches the row's parameter)."""
    from peft_diffusion.conversion import token_row_layers, token_rows_merged

    tokenizer = word_tokenizer(vocab_size=VOCAB_SIZE)  # the mask token is a new row
    config = DiffusionConfig(attention="block", block_size=4)
    model = get_diffusion_model(tiny_causal_lm(arch), config, tokenizer=tokenizer, peft_config=lora()).eval()
    layers = token_row_layers(model)
    assert len(layers) == (2 if model.causal_lm.config.tie_word_embeddings else 1)
    with torch.no_grad():
        layers[0].trainable_tokens_delta["default"].add_(0.5)  # as after training
    weights = {name: tensor.clone() for name, tensor in model.causal_lm.state_dict().items()}
    ids = random_ids()
    ids[:, 5] = model.config.mask_token_id
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with token_rows_merged(model):
            assert all(layer.merged for layer in layers)
            merged = model(input_ids=ids).logits
    assert torch.equal(merged, expected)
    model.generate(ids[:, :4], max_new_tokens=4)
    model.generate(ids[:, :4], max_new_tokens=4, speculative=True, block_length=4)
    assert not any(layer.merged for layer in layers)
    after = model.causal_lm.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in weights.items())
    with token_rows_merged(model):  # gradients on: a no-op
        assert not any(layer.merged for layer in layers)


def test_all_linear_lora_leaves_out_linear_subclasses_that_are_not_linear():
    """Phi-MoE's router subclasses nn.Linear and returns a tuple: under target_modules="all-linear" it is excluded
    (a LoRA layer around it failed on the first forward), every real linear layer is still adapted."""
    from peft.tuners.lora import LoraLayer

    base = tiny_causal_lm("phimoe")
    routers = [name for name, module in base.named_modules() if type(module).__name__ == "PhimoeTopKRouter"]
    assert routers
    model = get_diffusion_model(
        base,
        DiffusionConfig(attention="block", block_size=2, mask_token_id=MASK_ID),
        peft_config=LoraConfig(r=4, target_modules="all-linear", exclude_modules=["q_proj"]),
    )
    adapted = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert not any(name.endswith(router) for name in adapted for router in routers)
    assert not any(name.endswith("q_proj") for name in adapted)  # the user's own exclusions are kept
    assert any(name.endswith("k_proj") for name in adapted) and any(name.endswith("o_proj") for name in adapted)
    logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape[:2] == (1, 4) and bool(torch.isfinite(logits).all())
    with pytest.raises(ValueError, match="exclude_modules` as a list of names"):
        get_diffusion_model(
            tiny_causal_lm("phimoe"),
            DiffusionConfig(attention="block", block_size=2, mask_token_id=MASK_ID),
            peft_config=LoraConfig(r=4, target_modules="all-linear", exclude_modules=".*q_proj"),
        )
