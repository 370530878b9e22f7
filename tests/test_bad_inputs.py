"""Bad inputs and faults: each gives one clear error naming the argument and the fix, never a silent wrong result.

Table-driven: every case builds its input, calls the public API and expects a `ValueError` matching a pattern.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import MASK_ID, VOCAB_SIZE, tiny_causal_lm
from datasets import Dataset
from safetensors.torch import load_file, save_file
from test_model import lora, word_tokenizer
from test_trainer import make_trainer
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertModel

from peft_diffusion import DiffusionConfig, DiffusionLM, get_diffusion_model
from peft_diffusion.architectures import context_window
from peft_diffusion.corruption import complementary, corrupt
from peft_diffusion.evaluation import loglikelihood, loglikelihood_batch, nll_per_token

# ---------------------------------------------------------------------------------------------------------------
# DiffusionConfig: typos, wrong types, nonsense values
# ---------------------------------------------------------------------------------------------------------------

CONFIG_CASES = {
    "typo-attention": (dict(attenton="bidirectional"), r"'attenton' \(did you mean 'attention'\?\)"),
    "typo-block-size": (dict(blocksize=8), r"'blocksize' \(did you mean 'block_size'\?\)"),
    "string-bool": (dict(shift="no"), r"`shift` must be bool, got shift='no'"),
    "bool-int": (dict(block_size=True), r"`block_size` must be int"),
    "string-strength": (dict(masking_strength="high"), r"`masking_strength` must be int or float"),
    "nan-strength": (dict(masking_strength=math.nan), r"`masking_strength` must be a number in \[0, 10\]"),
    "inf-strength": (dict(masking_strength=math.inf), r"`masking_strength` must be a number in \[0, 10\]"),
    "huge-strength": (dict(masking_strength=5000.0), r"`masking_strength` must be a number in \[0, 10\]"),
    "float-mask-id": (dict(mask_token_id=3.0), r"`mask_token_id` must be int or None"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_refuses(case):
    kwargs, match = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**kwargs)


@pytest.mark.parametrize("special", ["eos_token_id", "pad_token_id", "bos_token_id"])
def test_mask_token_equal_to_a_special_token_is_refused(special):
    base = tiny_causal_lm("llama")
    special_id = getattr(base.config, special)
    with pytest.raises(ValueError, match=rf"`mask_token_id`={special_id} is the base model's {special}"):
        get_diffusion_model(base, DiffusionConfig(mask_token_id=special_id))


def test_a_saved_config_with_unknown_keys_still_loads(tmp_path, caplog):
    DiffusionConfig(mask_token_id=5).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["future_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert DiffusionConfig.from_pretrained(tmp_path).mask_token_id == 5
    assert "future_field" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------


def test_conversion_refuses_what_is_not_a_plain_causal_lm():
    model = get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(mask_token_id=MASK_ID))
    with pytest.raises(ValueError, match=r"already a DiffusionLM.*model.causal_lm"):
        get_diffusion_model(model, DiffusionConfig(mask_token_id=MASK_ID))
    encoder = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"must be a transformers causal LM.*got BertModel"):
        get_diffusion_model(encoder, DiffusionConfig(mask_token_id=5))


def test_remote_code_is_never_run(tmp_path):
    base = tiny_causal_lm("llama")
    base.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code=True. is not supported"):
        get_diffusion_model(str(tmp_path), DiffusionConfig(mask_token_id=MASK_ID), trust_remote_code=True)
    # The auto_map is ignored: the model loads as the transformers class, no prompt, no code.
    model = get_diffusion_model(str(tmp_path), DiffusionConfig(mask_token_id=MASK_ID))
    assert type(model.causal_lm).__name__ == "LlamaForCausalLM"


# ---------------------------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_adapter(tmp_path):
    """A LoRA diffusion model on a saved base (mask token added), saved to tmp_path / 'adapter'."""
    base = tiny_causal_lm("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_diffusion_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        DiffusionConfig(attention="block", block_size=4),
        tokenizer=word_tokenizer(vocab_size=VOCAB_SIZE),
        peft_config=lora(),
    )
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path


def _rewrite_adapter(folder, change):
    path = folder / "adapter_model.safetensors"
    save_file(change(load_file(path)), path)


def test_loaded_model_is_in_eval_mode(saved_adapter):
    assert not DiffusionLM.from_pretrained(saved_adapter / "adapter").training


def test_an_adapter_whose_keys_match_nothing_is_refused(saved_adapter):
    _rewrite_adapter(saved_adapter / "adapter", lambda weights: {f"x.{k}": v for k, v in weights.items()})
    with pytest.raises(ValueError, match=r"does not match the model it is loaded onto"):
        DiffusionLM.from_pretrained(saved_adapter / "adapter")


def test_an_adapter_missing_half_its_keys_is_refused(saved_adapter):
    _rewrite_adapter(saved_adapter / "adapter", lambda weights: dict(list(sorted(weights.items()))[::2]))
    with pytest.raises(ValueError, match="adapter weights missing"):
        DiffusionLM.from_pretrained(saved_adapter / "adapter")


def test_an_adapter_on_another_base_of_the_same_shapes_is_refused(saved_adapter):
    other = tiny_causal_lm("llama", seed=1)  # same config, other weights
    with pytest.raises(ValueError, match=r"is not that model: its embedding weights differ.*allow_base_mismatch"):
        DiffusionLM.from_pretrained(saved_adapter / "adapter", base_model=other)
    loaded = DiffusionLM.from_pretrained(
        saved_adapter / "adapter", base_model=tiny_causal_lm("llama", seed=1), allow_base_mismatch=True
    )
    assert loaded.is_peft
    # the base it was trained on passes, also when given explicitly under another name
    same = AutoModelForCausalLM.from_pretrained(saved_adapter / "base")
    same.config.name_or_path = "renamed"
    DiffusionLM.from_pretrained(saved_adapter / "adapter", base_model=same)


def test_a_corrupt_diffusion_config_is_named(saved_adapter):
    (saved_adapter / "adapter" / "diffusion_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"diffusion_config.json is not a valid diffusion_config.json"):
        DiffusionLM.from_pretrained(saved_adapter / "adapter")


def test_a_full_model_with_a_missing_tensor_is_refused(tmp_path):
    model = get_diffusion_model(tiny_causal_lm("llama"), DiffusionConfig(mask_token_id=MASK_ID))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(name for name in weights if "q_proj" in name)[0]
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not match the model \(missing_keys"):
        DiffusionLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Silent wrong results in the objective
# ---------------------------------------------------------------------------------------------------------------


def test_masked_normalization_reaches_the_loss_in_the_trainer(tmp_path):
    """One step, same seed: the per-masked-token loss times the masked fraction is the per-target loss."""
    losses = {}
    for normalization in ("targets", "masked"):
        trainer = make_trainer(tmp_path / normalization, "text", max_steps=1, loss_normalization=normalization)
        trainer.train()
        losses[normalization] = next(entry for entry in trainer.state.log_history if "loss" in entry)
    fraction = losses["masked"]["masked_fraction"]
    assert 0 < fraction < 1
    assert losses["masked"]["loss"] * fraction == pytest.approx(losses["targets"]["loss"], rel=1e-3)


def test_the_complementary_copy_has_the_primary_time_floor():
    input_ids = torch.arange(3, 19)[None]  # [1, 16]
    is_target = torch.ones_like(input_ids, dtype=torch.bool)
    t = torch.full((1, 16), 1.0)  # the largest time a draw can give: everything masked in the primary copy
    primary = corrupt(input_ids, is_target, t, mask_token_id=MASK_ID, generator=torch.Generator().manual_seed(0))
    pair = complementary(primary, input_ids, is_target, MASK_ID, eps=1e-3)
    assert float(pair.elbo_weight.max()) <= 1 / 1e-3 + 1e-6
    t = torch.full((1, 16), 0.9995)
    primary = corrupt(input_ids, is_target, t, mask_token_id=MASK_ID, generator=torch.Generator().manual_seed(0))
    pair = complementary(primary, input_ids, is_target, MASK_ID, eps=1e-3)
    assert float(pair.elbo_weight.max()) <= 1 / 1e-3 + 1e-3  # 1 / (1 - t) would be 2000


# ---------------------------------------------------------------------------------------------------------------
# Generation: prompts it cannot start from
# ---------------------------------------------------------------------------------------------------------------


def block_model(model_type="llama", attn_implementation="sdpa", **config):
    config = dict(attention="block", block_size=4, mask_token_id=MASK_ID) | config
    base = tiny_causal_lm(model_type, attn_implementation)
    return get_diffusion_model(base, DiffusionConfig(**config)).eval()


GENERATION_CASES = {
    "id-past-vocabulary": (
        lambda model: model.generate(torch.tensor([[1, 5, VOCAB_SIZE]]), max_new_tokens=4),
        rf"`input_ids` holds token id {VOCAB_SIZE}, outside the model's vocabulary of {VOCAB_SIZE} embedding rows",
    ),
    "negative-id": (
        lambda model: model.generate(torch.tensor([[1, -5, 6]]), max_new_tokens=4),
        r"`input_ids` holds token id -5, outside the model's vocabulary",
    ),
    "id-past-vocabulary-in-infill": (
        lambda model: model.infill(torch.tensor([[1, 500, MASK_ID, MASK_ID, 9]])),
        r"`input_ids` holds token id 500, outside the model's vocabulary",
    ),
    "empty-prompt": (
        lambda model: model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4),
        r"`input_ids` has an empty prompt in rows \[0\].*pass the BOS token as the prompt",
    ),
    "all-padding-row": (
        lambda model: model.generate(
            torch.tensor([[0, 0, 0], [1, 5, 6]]), attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]]), max_new_tokens=4
        ),
        r"`input_ids` has an empty prompt in rows \[0\]",
    ),
    "past-the-text-config-window": (  # gemma3 keeps its context window in its text_config
        lambda model: model.generate(torch.ones(1, 120, dtype=torch.long), max_new_tokens=16),
        r"the prompt \(120 tokens\) \+ max_new_tokens \(16\) = 136 tokens exceeds the model's context window of 128",
    ),
}


@pytest.mark.parametrize("case", sorted(GENERATION_CASES))
def test_generation_refuses(case):
    call, match = GENERATION_CASES[case]
    model_type = "gemma3" if case == "past-the-text-config-window" else "llama"
    with pytest.raises(ValueError, match=match):
        call(block_model(model_type))


def test_the_vocabulary_counts_an_added_mask_row():
    """With a mask token added through the tokenizer (a new row under PEFT's trainable-token wrapper), the
    vocabulary is the embedding's rows, one more than the base config's."""
    model = get_diffusion_model(
        tiny_causal_lm("llama"),
        DiffusionConfig(attention="block", block_size=4),
        tokenizer=word_tokenizer(vocab_size=VOCAB_SIZE),
        peft_config=lora(),
    ).eval()
    assert model.config.mask_token_id == VOCAB_SIZE
    assert model.generate(torch.tensor([[1, 5]]), max_new_tokens=4).shape == (1, 6)
    with pytest.raises(
        ValueError, match=rf"token id {VOCAB_SIZE + 1}, outside the model's vocabulary of {VOCAB_SIZE + 1}"
    ):
        model.generate(torch.tensor([[1, VOCAB_SIZE + 1]]), max_new_tokens=4)


def test_a_bos_prompt_is_the_unconditional_start():
    """The defined form of an empty prompt: the BOS token alone (shift predicts token i from position i - 1)."""
    model = block_model()
    out = model.generate(torch.tensor([[1]]), max_new_tokens=4)
    assert out.shape == (1, 5) and out[0, 0] == 1 and not bool((out == MASK_ID).any())


# ---------------------------------------------------------------------------------------------------------------
# The context window: one lookup (architectures.context_window) for generation, evaluation and lm-eval
# ---------------------------------------------------------------------------------------------------------------

CONTEXT_WINDOW_CASES = {
    "llama": (dict(max_position_embeddings=96), 96),
    "gpt2": (dict(n_positions=80), 80),  # transformers' attribute map: max_position_embeddings -> n_positions
    "gemma3": (dict(text_config=dict(max_position_embeddings=64)), 64),  # multimodal: in the text config
    "whisper": (dict(max_target_positions=48), 48),  # the decoder's limit
    "bloom": ({}, None),  # ALiBi: no limit in the config, unknown
}


@pytest.mark.parametrize("model_type", sorted(CONTEXT_WINDOW_CASES))
def test_context_window_reads_the_text_decoder_config(model_type):
    overrides, expected = CONTEXT_WINDOW_CASES[model_type]
    assert context_window(AutoConfig.for_model(model_type, **overrides)) == expected


def test_an_unknown_context_window_checks_nothing_and_asks_for_windows():
    model = block_model("bloom", "eager", attention="bidirectional")  # bloom has no sdpa path
    assert context_window(model.causal_lm.config) is None
    assert model.generate(torch.tensor([[1, 5]]), max_new_tokens=4).shape == (1, 6)
    assert math.isfinite(loglikelihood(model, [1, 5], [8], mc_samples=1).logprob)  # nothing to truncate against
    with pytest.raises(ValueError, match=r"context window is unknown .*pass `max_length`"):
        nll_per_token(model, [[5, 6, 7]], prefix_token_id=1)
    assert nll_per_token(model, [[5, 6, 7]], prefix_token_id=1, max_length=4, mc_samples=1).num_tokens == 3


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: what the ELBO cannot score, named by the argument that holds it
# ---------------------------------------------------------------------------------------------------------------

EVALUATION_CASES = {
    "mask-in-continuation": (
        lambda model: loglikelihood(model, [5, 6], [8, MASK_ID]),
        rf"`continuation_ids` holds the mask token \(id {MASK_ID}\) at index 1",
    ),
    "mask-in-context": (
        lambda model: loglikelihood(model, [5, MASK_ID], [8]),
        rf"`context_ids` holds the mask token \(id {MASK_ID}\) at index 1",
    ),
    "mask-in-request": (
        lambda model: loglikelihood_batch(model, [([5], [8]), ([5], [MASK_ID, 9])]),
        r"`requests\[1\]` continuation holds the mask token",
    ),
    "mask-in-text": (
        lambda model: nll_per_token(model, [[5, 6], [7, 8, MASK_ID]], prefix_token_id=1),
        r"`texts\[1\]` holds the mask token .* at index 2",
    ),
    "mask-as-prefix": (
        lambda model: nll_per_token(model, [[5, 6]], prefix_token_id=MASK_ID),
        r"`prefix_token_id` holds the mask token",
    ),
    "fractional-mc-samples": (
        lambda model: loglikelihood(model, [5], [8], mc_samples=2.5),
        r"`mc_samples` must be a positive integer, got mc_samples=2.5",
    ),
    "zero-mc-samples": (
        lambda model: loglikelihood(model, [5], [8], mc_samples=0),
        r"`mc_samples` must be a positive integer, got mc_samples=0",
    ),
    "zero-mc-samples-in-rolling-windows": (
        lambda model: nll_per_token(model, [[5, 6]], prefix_token_id=1, mc_samples=0),
        r"`mc_samples` must be a positive integer, got mc_samples=0",
    ),
    "id-past-vocabulary-in-continuation": (
        lambda model: loglikelihood(model, [5], [8, VOCAB_SIZE]),
        rf"`continuation_ids` holds token id {VOCAB_SIZE}, outside the model's vocabulary of {VOCAB_SIZE}",
    ),
    "id-past-vocabulary-in-request": (
        lambda model: loglikelihood_batch(model, [([5, 200], [8])]),
        r"`requests\[0\]` context holds token id 200, outside the model's vocabulary",
    ),
    "negative-id-in-text": (
        lambda model: nll_per_token(model, [[5, -1]], prefix_token_id=1),
        r"`texts\[0\]` holds token id -1, outside the model's vocabulary",
    ),
}


@pytest.mark.parametrize("case", sorted(EVALUATION_CASES))
def test_evaluation_refuses(case):
    call, match = EVALUATION_CASES[case]
    with pytest.raises(ValueError, match=match):
        call(block_model())


# ---------------------------------------------------------------------------------------------------------------
# lm-eval: the model built the way lm-eval's CLI builds it
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def lm_eval_model_folder(tmp_path):
    pytest.importorskip("lm_eval")
    model = block_model()
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


# what lm-eval's CLI passes beside --model_args when no --batch_size / --device is given (EvaluatorConfig defaults)
LM_EVAL_CLI_DEFAULTS = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}


def test_lm_eval_builds_from_model_args_and_the_cli_settings(lm_eval_model_folder, monkeypatch):
    """`--model_args ...,batch_size=32` beside lm-eval's own batch_size; lm-eval's default `cuda:0` on a machine
    without CUDA; the device default; the context window."""
    from lm_eval.api.registry import get_model

    import peft_diffusion.integrations.lm_eval  # noqa: F401 (registers the model)

    model_class = get_model("peft_diffusion")
    lm = model_class.create_from_arg_string(f"pretrained={lm_eval_model_folder}")
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert lm.max_length == 128  # the model's context window (tiny models: max_position_embeddings=128)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA is not available on this machine: running on the CPU"):
        lm = model_class.create_from_arg_string(
            f"pretrained={lm_eval_model_folder},batch_size=32,mc_samples=2", dict(LM_EVAL_CLI_DEFAULTS)
        )
    assert lm.batch_size == 32 and lm.mc_samples == 2 and lm.device.type == "cpu"
    lm = model_class.create_from_arg_obj({"pretrained": str(lm_eval_model_folder), "device": "cpu"}, {"batch_size": 4})
    assert lm.batch_size == 4 and lm.device.type == "cpu"
    with pytest.raises(ValueError, match=r"`mc_samples` must be a positive integer, got mc_samples=2.5"):
        model_class.create_from_arg_string(f"pretrained={lm_eval_model_folder},mc_samples=2.5")


def test_lm_eval_accepts_max_batch_size(lm_eval_model_folder):
    """lm-eval passes `max_batch_size` itself (and users put it in `--model_args`): the upper bound of
    `batch_size=auto`, as in lm-eval's `hf` model, never "unknown model_args"."""
    from lm_eval.api.registry import get_model

    import peft_diffusion.integrations.lm_eval  # noqa: F401 (registers the model)

    model_class = get_model("peft_diffusion")
    lm = model_class.create_from_arg_string(
        f"pretrained={lm_eval_model_folder},max_batch_size=8,device=cpu",
        {**LM_EVAL_CLI_DEFAULTS, "batch_size": "auto"},
    )
    assert lm.batch_size == 8
    lm = model_class.create_from_arg_string(f"pretrained={lm_eval_model_folder},batch_size=auto,max_batch_size=64")
    assert lm.batch_size == 32
    lm = model_class.create_from_arg_obj(
        {"pretrained": str(lm_eval_model_folder), "batch_size": 16}, {"max_batch_size": 4}
    )
    assert lm.batch_size == 16  # an explicit batch_size is used as given
    with pytest.raises(ValueError, match=r"`max_batch_size` must be a positive integer, got max_batch_size=0"):
        model_class.create_from_arg_string(f"pretrained={lm_eval_model_folder},max_batch_size=0")


# ---------------------------------------------------------------------------------------------------------------
# An explicit per-block t follows positions, as the attention's blocks do
# ---------------------------------------------------------------------------------------------------------------


def test_a_per_block_t_follows_positions_under_left_padding():
    """A left-padded row gets the same corruption (times, weights, loss) as the same row unpadded."""
    model = block_model(clean_context=True)
    ids = torch.tensor([[1, 5, 9, 14, 22, 31, 40, 57]])  # [1, 8]: blocks {0..3}, {4..7}
    is_masked = torch.tensor([[False, True, False, True, True, False, True, True]])
    pad = 3
    padded_ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)  # [1, 11]: three blocks of columns
    attention_mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    padded_masked = torch.cat([torch.zeros(1, pad, dtype=torch.bool), is_masked], dim=1)
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids, t=torch.tensor([[0.2, 0.9]]), is_masked=is_masked)
        padded = model(
            input_ids=padded_ids,
            attention_mask=attention_mask,
            labels=padded_ids,
            t=torch.tensor([[0.2, 0.9, 0.5]]),  # ceil(11 / 4) blocks of t; the real tokens reach blocks 0 and 1
            is_masked=padded_masked,
        )
    expected_mean_t = (0.2 * 3 + 0.9 * 4) / 7  # targets: positions 1..7 under shift
    assert float(plain.metrics["mean_t"]) == pytest.approx(expected_mean_t)
    assert float(padded.metrics["mean_t"]) == pytest.approx(expected_mean_t)
    assert float(padded.loss) == pytest.approx(float(plain.loss), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Resuming training from a checkpoint
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    """A resumable checkpoint after one LoRA step (`make_trainer`'s model and data)."""
    folder = tmp_path_factory.mktemp("trained")
    make_trainer(folder, "text", max_steps=1, save_strategy="steps", save_steps=1).train()
    return folder / "out" / "checkpoint-1"


CHECKPOINT_CASES = {
    "half-the-adapter": (lambda weights: dict(sorted(weights.items())[::2]), r"\d+ adapter weights missing"),
    "no-mask-row": (
        lambda weights: {k: v for k, v in weights.items() if "trainable_tokens" not in k},
        r"1 adapter weights missing \(e.g. \['base_model.model.model.embed_tokens.token_adapter",
    ),
    "renamed-keys": (lambda weights: {f"x.{k}": v for k, v in weights.items()}, r"\d+ unexpected weights"),
}


RESUME_CASES = {
    "a-saved-model": (
        lambda folder: (folder / "trainer_state.json").unlink(),
        r"holds no trainer_state.json: it is not a Trainer checkpoint.*checkpoint-<step>.*from_pretrained",
    ),
    "corrupt-trainer-state": (
        lambda folder: (folder / "trainer_state.json").write_text("{not json"),
        r"checkpoint-1/trainer_state.json is not a valid trainer_state.json .*resume from another checkpoint",
    ),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resuming_from_what_is_not_a_checkpoint_is_refused(tmp_path, trainer_checkpoint, case):
    change, match = RESUME_CASES[case]
    checkpoint = shutil.copytree(trainer_checkpoint, tmp_path / "checkpoint-1")
    change(checkpoint)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, "text", max_steps=2).train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_resuming_from_a_checkpoint_that_does_not_match_is_refused(tmp_path, trainer_checkpoint, case):
    change, match = CHECKPOINT_CASES[case]
    checkpoint = shutil.copytree(trainer_checkpoint, tmp_path / "checkpoint-1")
    _rewrite_adapter(checkpoint, change)
    trainer = make_trainer(tmp_path, "text", max_steps=2)
    with pytest.raises(ValueError, match=rf"The adapter in .*checkpoint-1 does not match.*{match}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# ---------------------------------------------------------------------------------------------------------------
# Training data (DiffusionTrainer's boundary: before and after TRL's preparation)
# ---------------------------------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["w5"] * 40)  # longer than max_length=32: truncation leaves no answer
DATASET_CASES = {
    "empty": (dict(text=[]), {}, r"`train_dataset` is empty \(no rows\); pass a dataset with at least one example"),
    "none-text": (
        dict(text=["w4 w5", None, "w6"]),
        {},
        r"`train_dataset` has 1 row whose `text` is None \(rows \[1\]\); drop or fill them.*dataset.filter",
    ),
    "none-completion": (
        dict(prompt=["w4", "w5"], completion=[" w6", None]),
        {},
        r"`train_dataset` has 1 row whose `completion` is None \(rows \[1\]\)",
    ),
    "all-prompt-truncated": (
        dict(prompt=[LONG_PROMPT] * 8, completion=[" w6"] * 8),
        {},
        r"`train_dataset` has no row with a target token after preparation: each of its 8 rows.*raise `max_length` "
        r"\(now 32\)",
    ),
    "all-prompt-packed": (
        dict(prompt=[LONG_PROMPT] * 8, completion=[" w6"] * 8),
        dict(packing=True),
        r"`train_dataset` has 8 packed rows with no target token after preparation \(packed rows \[0, 1, 2, 3, 4\] "
        r"\.\.\. of 8\).*raise `max_length`",
    ),
    "only-first-token-targets": (
        dict(input_ids=[[4, 5, 6, 7]] * 3, labels=[[4, -100, -100, -100], [-100, 5, 6, -100], [4, -100, -100, -100]]),
        {},
        r"`train_dataset` has 2 rows with no target token after preparation \(rows \[0, 2\] of 3\).*first token",
    ),
    "token-id-too-large": (
        dict(input_ids=[[4, 5, 6, 7]] * 7 + [[4, 5, 500, 7]]),
        {},
        r"`train_dataset` holds token id 500 in `input_ids` \(row 7\), outside the model's embedding matrix "
        r"\(128 rows, ids 0-127\).*`processing_class`",
    ),
    "negative-token-id": (dict(input_ids=[[4, -1, 6, 7]]), {}, r"holds token id -1 in `input_ids` \(row 0\)"),
    "mask-token-in-text": (
        dict(text=["w4 w5 w6", "w4 <|mask|> w6"]),
        {},
        r"`train_dataset` holds the mask token '<\|mask\|>' \(id 120\) in `input_ids` \(1 row: \[1\]\).*Remove it",
    ),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_trainer_refuses_training_data(tmp_path, case):
    columns, overrides, match = DATASET_CASES[case]
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, train_dataset=Dataset.from_dict(columns), **overrides)


def test_trainer_says_how_many_rows_truncation_left_without_a_target(tmp_path):
    data = Dataset.from_dict({"prompt": [LONG_PROMPT] * 2 + ["w7"] * 6, "completion": [" w6"] * 8})
    with pytest.warns(UserWarning, match=r"2 of 8 rows of `train_dataset` have no target token after truncation to "
                      r"max_length=32 \(only prompt is left\) and were dropped"):  # fmt: skip
        trainer = make_trainer(tmp_path, train_dataset=data)
    assert len(trainer.train_dataset) == 6


def test_an_adapter_folder_without_weights_is_named(saved_adapter):
    (saved_adapter / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds an adapter config but no adapter weights"):
        DiffusionLM.from_pretrained(saved_adapter / "adapter")
