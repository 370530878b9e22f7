"""One test per hook of `peft_diffusion._compat`: each fails, naming the hook, when the host changes under it.

The behaviour a hook relies on is checked directly on the host (a stock transformers model, the stock Trainer),
not through the code that uses the hook.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import MASK_ID, tiny_causal_lm
from test_trainer import make_trainer
from transformers import AutoConfig, DynamicCache, Trainer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from peft_diffusion import DiffusionConfig, DiffusionLM, _compat, get_diffusion_model
from peft_diffusion.model import DiffusionLMOutput


def hook_message(hook: str) -> str:
    return f"_compat hook `{hook}` no longer holds on this transformers/trl release"


# ---------------------------------------------------------------------------------------------------------------
# CACHE_KWARG
# ---------------------------------------------------------------------------------------------------------------


def test_cache_kwarg_is_what_a_stock_model_takes_and_returns():
    base = tiny_causal_lm("llama", "sdpa")
    input_ids = torch.tensor([[5, 6, 7, 8]])
    cache = DynamicCache()
    outputs = base(input_ids=input_ids, use_cache=True, **{_compat.CACHE_KWARG: cache})
    assert _compat.output_cache(outputs) is cache, hook_message("CACHE_KWARG")
    assert cache.get_seq_length() == 4, hook_message("CACHE_KWARG")
    # The next forward reads the cache through the same keyword: logits equal the uncached forward's.
    step = base(input_ids=torch.tensor([[9]]), use_cache=True, **{_compat.CACHE_KWARG: cache}).logits[0, -1]
    full = base(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5, msg=hook_message("CACHE_KWARG"))


def test_diffusion_output_reads_its_cache_under_both_names():
    cache = DynamicCache()
    output = DiffusionLMOutput(logits=torch.zeros(1, 1, 2), cache=cache)
    assert output.cache is cache and output.past_key_values is cache
    assert output["cache"] is cache


def test_forward_takes_the_cache_under_both_names():
    model = get_diffusion_model(
        tiny_causal_lm("llama", "sdpa"), DiffusionConfig(attention="block", block_size=4, mask_token_id=MASK_ID)
    ).eval()
    prompt, block = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[MASK_ID] * 4])
    logits = {}
    for name in ("cache", "past_key_values"):
        cache = DynamicCache()
        model(input_ids=prompt, use_cache=True, **{name: cache})
        logits[name] = model(input_ids=block, use_cache=True, **{name: cache}).logits
        assert cache.get_seq_length() == 8
    torch.testing.assert_close(logits["cache"], logits["past_key_values"])
    with pytest.raises(ValueError, match="Pass the KV cache once"):
        model(input_ids=block, cache=DynamicCache(), past_key_values=DynamicCache())


# ---------------------------------------------------------------------------------------------------------------
# mask_materialisers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(_compat.MATERIALISER_KEYWORDS))
def test_mask_materialisers_take_the_keywords_we_pass(backend):
    function = ALL_MASK_ATTENTION_FUNCTIONS[backend]
    _compat.check_mask_materialiser(backend, getattr(function, "__wrapped__", function))


def test_a_changed_materialiser_is_named():
    def renamed(batch_size, q_length, kv_length, pattern=None, **kwargs):
        return None

    with pytest.raises(_compat.HostCompatibilityError, match=r"hook `mask_materialisers`.*\['mask_function'"):
        _compat.check_mask_materialiser("sdpa", renamed)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_the_host_mask_builder_calls_the_materialiser_with_our_pattern(backend):
    """A stock model's mask goes through `ALL_MASK_ATTENTION_FUNCTIONS[backend]` with a `mask_function`."""
    base = tiny_causal_lm("llama", backend)
    seen = []
    original = ALL_MASK_ATTENTION_FUNCTIONS[backend]

    def recording(*args, **kwargs):
        seen.append(kwargs.get("mask_function"))
        return original(*args, **kwargs)

    ALL_MASK_ATTENTION_FUNCTIONS[backend] = recording
    try:
        base(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 1, 1]]))
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS[backend] = original
    assert seen and all(callable(function) for function in seen), hook_message("mask_materialisers")


# ---------------------------------------------------------------------------------------------------------------
# set_attention_is_causal
# ---------------------------------------------------------------------------------------------------------------


def test_sdpa_reads_the_modules_is_causal_flag_when_a_layer_gets_no_mask():
    """Unmasked layers run bidirectionally only because sdpa reads `module.is_causal` (the fast path relies on it):
    with no mask, the last token reaches position 0 exactly when the flag is False."""
    from peft_diffusion.attention import AttentionLayout, diffusion_attention, positions_from_inputs

    base = tiny_causal_lm("llama", "sdpa")
    modules = _compat.attention_is_causal_modules(base)
    assert len(modules) == base.config.num_hidden_layers, hook_message("set_attention_is_causal")
    positions, doc_ids = positions_from_inputs(None, None, 1, 4, "cpu")
    layout = AttentionLayout("bidirectional", positions, doc_ids, unmasked=True)  # every layer gets no mask

    def reaches(is_causal: bool) -> bool:
        saved = _compat.set_attention_is_causal(modules, is_causal)
        try:
            with diffusion_attention(layout):
                first = base(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, 0]
                changed = base(input_ids=torch.tensor([[5, 6, 7, 9]])).logits[0, 0]
        finally:
            for module, value in saved:
                module.is_causal = value
        return not torch.allclose(first, changed)

    assert reaches(False) and not reaches(True), hook_message("set_attention_is_causal")
    assert all(module.is_causal for module in modules)


# ---------------------------------------------------------------------------------------------------------------
# mark_initialized, attn_implementation, SubConfigSpec
# ---------------------------------------------------------------------------------------------------------------


def test_wrapping_keeps_the_pretrained_weights():
    base = tiny_causal_lm("llama", "sdpa")
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = DiffusionLM(
        DiffusionConfig(attention="block", block_size=4, mask_token_id=MASK_ID, base_config=base.config), base
    )
    for name, tensor in model.causal_lm.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{hook_message('mark_initialized')}: {name} was re-initialised"


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attn_implementation_is_the_one_asked_for(backend):
    base = tiny_causal_lm("llama", backend)
    assert _compat.attn_implementation(base.config) == backend, hook_message("attn_implementation")
    model = get_diffusion_model(base, DiffusionConfig(mask_token_id=MASK_ID, block_size=4))
    assert _compat.attn_implementation(model.config) == backend


def test_sub_config_round_trips(tmp_path):
    base = tiny_causal_lm("qwen2", "sdpa")
    config = DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID, base_config=base.config)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is DiffusionConfig, hook_message("SubConfigSpec")
    assert type(loaded.base_config) is type(base.config), hook_message("SubConfigSpec")
    assert loaded.base_config.hidden_size == base.config.hidden_size


# ---------------------------------------------------------------------------------------------------------------
# disable_label_shift_count, CheckpointLoading
# ---------------------------------------------------------------------------------------------------------------


def test_the_trainer_counts_every_target_label(tmp_path):
    """`num_items_in_batch` reaching the loss equals the number of `labels != -100` of the batch (hand count)."""
    trainer = make_trainer(tmp_path, "text", max_steps=2)
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            seen.append((int(num_items_in_batch), int((inputs["labels"] != -100).sum())))
        return compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = recording
    trainer.train()
    assert seen and all(counted == expected for counted, expected in seen), (
        f"{hook_message('disable_label_shift_count')}: {seen}"
    )


def test_a_wrong_count_or_a_missing_flag_is_named():
    labels = torch.tensor([[-100, 3, 4, -100]])
    _compat.check_num_items_in_batch(torch.tensor(2), labels)
    with pytest.raises(
        _compat.HostCompatibilityError, match=r"hook `disable_label_shift_count`.*counted num_items_in_batch=1"
    ):
        _compat.check_num_items_in_batch(torch.tensor(1), labels)
    with pytest.raises(_compat.HostCompatibilityError, match=r"hook `disable_label_shift_count`"):
        _compat.disable_label_shift_count(object())


def test_the_trainer_still_has_the_checkpoint_loaders():
    _compat._check_checkpoint_hooks()
    for name in _compat._CHECKPOINT_HOOKS:
        assert name in vars(Trainer), hook_message("CheckpointLoading")


def test_find_file_without_private_flags(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert _compat.find_file(tmp_path, "adapter_config.json") == str(tmp_path / "adapter_config.json")
    assert _compat.find_file(tmp_path, "diffusion_config.json") is None


def test_no_other_module_names_a_private_host_attribute():
    """Private host names appear only in `_compat.py` (the hooks' one home)."""
    import pathlib
    import re

    package = pathlib.Path(_compat.__file__).parent
    private = re.compile(
        r"_loss_shifts_labels|_is_hf_initialized|_global_mapping|_raise_exceptions_for|_load_from_checkpoint"
        r"|_load_best_model|configuration_utils import|\._attn_implementation|self\._tokenizer\b"
    )
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        if path.name != "_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not offenders, "\n".join(offenders)


def test_dataclass_output_fields():
    assert "cache" in {field.name for field in dataclasses.fields(DiffusionLMOutput)}
