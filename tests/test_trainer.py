"""DiffusionTrainer / DiffusionTrainingConfig: dataset formats, clean prompts, packing isolation, resume, push, DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MASK_ID, VOCAB_SIZE, tiny_causal_lm
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from test_model import word_tokenizer
from transformers import TrainerCallback

from peft_diffusion import DiffusionConfig, DiffusionLM, get_diffusion_model
from peft_diffusion.trainer import DiffusionTrainer
from peft_diffusion.training_config import DiffusionTrainingConfig

SCRIPTS = Path(__file__).parent / "scripts"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} w2"
    "{% endgeneration %}{% else %}{{ message['content'] }} {% endif %}{% endfor %}"
)


def words(rng, low=4, high=14):
    return " ".join(f"w{rng.randrange(4, 100)}" for _ in range(rng.randrange(low, high)))


def dataset(kind: str, n: int = 16, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    if kind == "text":
        return Dataset.from_dict({"text": [words(rng) for _ in range(n)]})
    if kind == "prompt_completion":
        # TRL tokenizes prompt + completion as one string: the completion brings its separating space
        prompts = [words(rng) for _ in range(n)]
        return Dataset.from_dict({"prompt": prompts, "completion": [" " + words(rng) for _ in range(n)]})
    if kind == "messages":
        return Dataset.from_dict(
            {
                "messages": [
                    [{"role": "user", "content": words(rng)}, {"role": "assistant", "content": words(rng)}]
                    for _ in range(n)
                ]
            }
        )
    raise ValueError(kind)


def training_args(tmp_path, **overrides) -> DiffusionTrainingConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        max_length=32,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return DiffusionTrainingConfig(**kwargs)


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def make_trainer(
    tmp_path,
    kind="text",
    *,
    attention="block",
    peft=True,
    base=None,
    train_dataset=None,
    quantization_config=None,
    **overrides,
):
    tokenizer = word_tokenizer()
    if kind == "messages":
        tokenizer.chat_template = CHAT_TEMPLATE
        overrides.setdefault("assistant_only_loss", True)
    return DiffusionTrainer(
        base if base is not None else tiny_causal_lm("llama"),
        args=training_args(tmp_path, **overrides),
        train_dataset=dataset(kind) if train_dataset is None else train_dataset,
        processing_class=tokenizer,
        diffusion_config=DiffusionConfig(attention=attention, block_size=4),
        peft_config=lora() if peft else None,
        quantization_config=quantization_config,
    )


def spy(model: DiffusionLM) -> list[dict]:
    """Record every forward of `model`: the trainer's call (with labels) and the model's own call on x_t."""
    calls = []
    forward = model.forward

    def recording(*args, **kwargs):
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        return forward(*args, **kwargs)

    model.forward = recording
    return calls


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"anneal_steps": -1}, r"`anneal_steps` must be an integer >= 0.*anneal_steps=-1"),
        ({"time_eps": 0.0}, r"`time_eps` must be in \(0, 1\), got time_eps=0.0"),
        ({"time_eps": 1.0}, r"`time_eps` must be in \(0, 1\)"),
        ({"loss_normalization": "tokens"}, r"`loss_normalization` must be one of \['targets', 'masked'\]"),
        ({"eos_policy": "some"}, r"`eos_policy` must be one of"),
        ({"eos_policy": "all", "packing": True}, r"`eos_policy='all'`.*no padding"),
        ({"max_train_minutes": 0}, r"`max_train_minutes` must be a positive number.*max_train_minutes=0"),
        ({"max_train_minutes": float("nan")}, r"`max_train_minutes` must be a positive number"),
        ({"max_train_minutes": "10"}, r"`max_train_minutes` must be a positive number.*'10'"),
        (
            {"max_train_minutes": 5, "lr_scheduler_type": "polynomial"},
            r"lr_scheduler_type in \[.*'cosine'.*got lr_scheduler_type='polynomial'",
        ),
    ],
)
def test_config_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        training_args(tmp_path, **kwargs)


def test_config_defaults_run_on_cpu(tmp_path):
    args = DiffusionTrainingConfig(output_dir=str(tmp_path), report_to="none")
    if not torch.cuda.is_available():
        assert args.bf16 is False and args.gradient_checkpointing is False
    assert (args.anneal_steps, args.time_eps, args.loss_normalization, args.eos_policy) == (0, 1e-3, "targets", "none")
    assert DiffusionTrainingConfig(output_dir=str(tmp_path), gradient_checkpointing=True).gradient_checkpointing


# --------------------------------------------------------------------------------------------------------------
# Dataset formats, clean prompts, trainable parameters
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "prompt_completion", "messages"])
def test_each_format_trains_and_only_noises_targets(tmp_path, kind):
    trainer = make_trainer(tmp_path, kind, packing=kind == "text")
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = spy(model)
    trainer.train()

    outer = [c for c in calls if c.get("labels") is not None]
    inner = [c for c in calls if c.get("labels") is None]
    assert len(outer) == len(inner) == 2
    for call, noisy in zip(outer, inner):
        clean, labels = call["input_ids"], call["labels"]
        is_masked = noisy["input_ids"] == model.config.mask_token_id
        # prompt, non-assistant and padding tokens are never noised; some targets are
        assert not is_masked[labels == -100].any()
        assert is_masked.any()
        torch.testing.assert_close(noisy["input_ids"][~is_masked], clean[~is_masked])
        if kind != "text":
            assert (labels == -100).any()  # prompts exist and stay clean
    # trainable parameters change: only the adapter and the mask-token row under LoRA
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n or "trainable_tokens" in n for n in changed)
    assert any("trainable_tokens" in n for n in changed)
    logs = trainer.state.log_history[0]
    assert {"loss", "masked_ce", "mean_t", "masked_fraction"} <= set(logs)
    by_t = {name: value for name, value in logs.items() if name.startswith("masked_ce_by_t/")}
    assert by_t and set(by_t) <= {f"masked_ce_by_t/{b}" for b in ("0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00")}
    assert all(value > 0 for value in by_t.values())


def test_prompt_completion_labels_leave_prompts_clean(tmp_path):
    trainer = make_trainer(tmp_path, "prompt_completion")
    example = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    prompt_ids = tokenizer(dataset("prompt_completion")[0]["prompt"])["input_ids"]
    # TRL's labels: -100 over the prompt, then the completion
    assert example["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    completion = example["labels"][len(prompt_ids) :]
    assert completion and all(label != -100 for label in completion)
    assert tokenizer.unk_token_id not in example["input_ids"]


def test_full_finetuning_with_gradient_checkpointing(tmp_path):
    trainer = make_trainer(tmp_path, "text", peft=False, gradient_checkpointing=True, packing=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.model.causal_lm.is_activation_checkpointing
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)


def test_qlora_trains_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    base = tiny_causal_lm("llama", hidden_size=64, intermediate_size=128)
    base.save_pretrained(tmp_path / "base")
    tokenizer = word_tokenizer()
    trainer = DiffusionTrainer(
        str(tmp_path / "base"),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=dataset("text"),
        processing_class=tokenizer,
        diffusion_config=DiffusionConfig(attention="block", block_size=4),
        peft_config=lora(),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    )
    assert trainer.model.causal_lm.is_loaded_in_4bit
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters() if n in before)


def test_annealing_ratio_follows_the_global_step(tmp_path):
    trainer = make_trainer(tmp_path, "text", attention="annealed", anneal_steps=4, max_steps=3, packing=True)
    ratios = []
    forward = trainer.model.forward

    def recording(*args, **kwargs):
        if kwargs.get("labels") is not None:
            ratios.append(trainer.model.annealing_ratio)
        return forward(*args, **kwargs)

    trainer.model.forward = recording
    trainer.train()
    assert ratios == [0.0, 0.25, 0.5]


# --------------------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["bidirectional", "block"])
def test_packed_documents_do_not_attend_to_each_other(tmp_path, attention):
    trainer = make_trainer(tmp_path, "text", attention=attention, packing=True, max_steps=1, max_length=48)
    calls = spy(trainer.model)
    trainer.train()
    batch = calls[0]
    position_ids = batch["position_ids"]  # [1, L] restarting at every document
    assert batch["input_ids"].shape[0] == 1 and (position_ids[0, 1:] == 0).any()
    start = int((position_ids[0, 1:] == 0).nonzero()[0]) + 1  # first token of the second document
    model = trainer.model.eval()
    ids = batch["input_ids"].clone()
    with torch.no_grad():
        reference = model(input_ids=ids, position_ids=position_ids).logits
        ids[0, start:] = (ids[0, start:] + 5) % 100 + 4  # change every later document
        changed = model(input_ids=ids, position_ids=position_ids).logits
    torch.testing.assert_close(changed[0, :start], reference[0, :start])
    assert not torch.allclose(changed[0, start:], reference[0, start:])


def test_block_attention_needs_no_max_length_multiple(tmp_path):
    # Blocks are aligned at position 0 of each document; a final partial block is fine.
    trainer = make_trainer(tmp_path, "prompt_completion", attention="block", max_length=30, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1


# --------------------------------------------------------------------------------------------------------------
# Evaluation, save / resume / push
# --------------------------------------------------------------------------------------------------------------


def test_evaluation_reports_the_elbo_bound(tmp_path):
    trainer = make_trainer(tmp_path, "text", max_steps=1)
    metrics = trainer.evaluate(dataset("text", n=8, seed=1))
    assert {"eval_loss", "eval_nll_bound", "eval_ppl_bound", "eval_masked_ce"} <= set(metrics)
    assert metrics["eval_ppl_bound"] == pytest.approx(torch.tensor(metrics["eval_nll_bound"]).exp().item())
    # a fixed noise seed: evaluation is reproducible
    assert trainer.evaluate(dataset("text", n=8, seed=1))["eval_loss"] == metrics["eval_loss"]


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps (as a crash would, right after a checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_equals_uninterrupted(tmp_path):
    # annealed attention: the resumed run must also pick the annealing ratio up at the restored global step
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, packing=True, anneal_steps=3)
    uninterrupted = make_trainer(tmp_path / "a", "text", attention="annealed", **common)
    uninterrupted.train()

    interrupted = make_trainer(tmp_path / "b", "text", attention="annealed", **common)
    interrupted.add_callback(StopAt(2))
    interrupted.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "diffusion_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()

    resumed = make_trainer(tmp_path / "b", "text", attention="annealed", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    expected, got = lora_weights(uninterrupted.model), lora_weights(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    losses = [entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry]
    assert [entry["loss"] for entry in resumed.state.log_history if "loss" in entry] == pytest.approx(losses, 1e-5)


def tied_trainer(base_folder, folder, **overrides):
    """The CLI's default model in small: a base folder with tied embeddings and no mask token in its tokenizer, so
    the embedding grows by one row, trained through PEFT's trainable tokens on both tied layers."""
    return DiffusionTrainer(
        str(base_folder),
        args=training_args(folder, **overrides),
        train_dataset=dataset("text"),
        processing_class=word_tokenizer(vocab_size=VOCAB_SIZE),  # every row taken: the mask token is added
        diffusion_config=DiffusionConfig(attention="block", block_size=4),
        peft_config=lora(),
    )


def test_resume_equals_uninterrupted_on_a_tied_base_with_an_added_mask_token(tmp_path):
    tiny_causal_lm("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    common = dict(max_steps=3, save_strategy="steps", save_steps=2, packing=True)
    uninterrupted = tied_trainer(tmp_path / "base", tmp_path / "a", **common)
    causal_lm = uninterrupted.model.causal_lm
    assert causal_lm.config.tie_word_embeddings and uninterrupted.model.config.mask_token_id == VOCAB_SIZE
    uninterrupted.train()

    interrupted = tied_trainer(tmp_path / "base", tmp_path / "b", **common)
    interrupted.add_callback(StopAt(2))
    interrupted.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    # the adapter alone: LoRA and the mask row, not the embedding matrices
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert all("lora_" in name or "trainable_tokens_delta" in name for name in saved), sorted(saved)

    resumed = tied_trainer(tmp_path / "base", tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    expected, got = lora_weights(uninterrupted.model), lora_weights(resumed.model)
    assert expected.keys() == got.keys() and any("trainable_tokens" in name for name in expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    losses = [entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry]
    assert [entry["loss"] for entry in resumed.state.log_history if "loss" in entry] == pytest.approx(losses, 1e-5)


def test_resume_from_a_checkpoint_holding_peft_embedding_layers(tmp_path):
    """A stock PEFT save of the tied model holds both embedding matrices and the output layer's copy of the mask row
    (`save_embedding_layers`): they are the base's frozen rows and the adapter's own row, and resuming reads the
    adapter's weights exactly."""
    tiny_causal_lm("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    trained = tied_trainer(tmp_path / "base", tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trained.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    trained.model.model.save_pretrained(checkpoint, save_embedding_layers=True)
    assert "base_model.model.lm_head.token_adapter.trainable_tokens_delta" in load_file(
        checkpoint / "adapter_model.safetensors"
    )
    resumed = tied_trainer(tmp_path / "base", tmp_path, max_steps=1)
    resumed.train(resume_from_checkpoint=str(checkpoint))  # at max_steps already: loads and stops
    expected, got = lora_weights(trained.model), lora_weights(resumed.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test (as in a script or a terminal), restored afterwards: the Ctrl-C tests
    check what `train()` does over it, whatever an earlier test in the same worker left installed (an ignored SIGINT
    is kept by design, and once made these tests fail with a default handler that is not callable)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class CtrlC(TrainerCallback):
    """Presses Ctrl-C `times` times during optimizer step `step` (1-based), through the SIGINT handler in place
    (`real=False`) or by raising a real SIGINT in the process (`real=True`)."""

    def __init__(self, step, times=1, real=False):
        self.step, self.times, self.real = step, times, real

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            for _ in range(self.times):
                if self.real:
                    signal.raise_signal(signal.SIGINT)
                else:
                    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_uninterrupted_result(python_sigint, tmp_path):
    common = dict(max_steps=4, packing=True)  # save_strategy="no": nothing would be saved otherwise
    uninterrupted = make_trainer(tmp_path / "a", "text", **common)
    uninterrupted.train()

    handler = signal.getsignal(signal.SIGINT)
    interrupted = make_trainer(tmp_path / "b", "text", **common)
    interrupted.add_callback(CtrlC(step=2))
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    with pytest.raises(KeyboardInterrupt, match=rf"after step 2 of 4.*resume_from_checkpoint='{checkpoint}'"):
        interrupted.train()
    assert signal.getsignal(signal.SIGINT) is handler  # installed only for the duration of train()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2  # the step finished
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state.pth"} <= set(os.listdir(checkpoint))
    assert sorted((tmp_path / "b" / "out").glob("checkpoint-*")) == [checkpoint]

    # resumed in a worker thread: no handler there (signals reach only the main thread), training is the same
    resumed = make_trainer(tmp_path / "b", "text", **common)
    thread = threading.Thread(target=resumed.train, kwargs={"resume_from_checkpoint": str(checkpoint)})
    thread.start()
    thread.join()
    assert resumed.state.global_step == 4
    expected, got = lora_weights(uninterrupted.model), lora_weights(resumed.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    losses = [entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry]
    assert [entry["loss"] for entry in resumed.state.log_history if "loss" in entry] == pytest.approx(losses, 1e-5)


def test_a_second_ctrl_c_stops_at_once_without_saving(python_sigint, tmp_path, caplog):
    handler = signal.getsignal(signal.SIGINT)
    trainer = make_trainer(tmp_path, "text", max_steps=4, packing=True)
    trainer.add_callback(CtrlC(step=2, times=2))
    with pytest.raises(KeyboardInterrupt) as raised, caplog.at_level(logging.WARNING, "peft_diffusion.trainer"):
        trainer.train()
    # the first press was caught and said what happens next; the second one stopped the step
    assert "finishing the current optimizer step" in caplog.text and "Ctrl-C again stops at once" in caplog.text
    assert "checkpoint" not in str(raised.value) and trainer.state.global_step == 1
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="SIGINT needs the main thread")
def test_a_real_sigint_saves_a_checkpoint(python_sigint, tmp_path):
    trainer = make_trainer(tmp_path, "text", max_steps=4, packing=True)
    trainer.add_callback(CtrlC(step=3, real=True))
    with pytest.raises(KeyboardInterrupt, match=r"after step 3 of 4; saved a resumable checkpoint"):
        trainer.train()
    assert (tmp_path / "out" / "checkpoint-3" / "adapter_model.safetensors").is_file()


def test_push_to_hub_uploads_what_from_pretrained_loads(tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    base = tiny_causal_lm("llama")
    base.save_pretrained(tmp_path / "base")
    uploaded = tmp_path / "hub"

    def upload_folder(folder_path, ignore_patterns=(), **kwargs):
        shutil.copytree(folder_path, uploaded, ignore=shutil.ignore_patterns(*ignore_patterns))
        return "commit"

    api = SimpleNamespace(
        create_repo=lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id), upload_folder=upload_folder
    )
    monkeypatch.setattr(hf_trainer, "hf_api", lambda: api)
    trainer = make_trainer(tmp_path, "text", base=str(tmp_path / "base"), hub_model_id="me/tiny-diffusion")
    trainer.train()
    assert trainer.push_to_hub() == "commit"
    assert json.loads((uploaded / "diffusion_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base"
    )
    loaded = DiffusionLM.from_pretrained(uploaded, attn_implementation="eager").eval()
    model = trainer.model.eval()
    ids = torch.randint(4, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


def test_dataset_without_a_usable_column(tmp_path):
    with pytest.raises(ValueError, match=r"`train_dataset` has no usable column: got columns \['body'\]"):
        make_trainer(tmp_path, train_dataset=Dataset.from_dict({"body": ["w4 w5"]}))


@pytest.mark.parametrize("strategy", ["wrapped", "bfd_split"])
def test_completion_only_with_a_packing_that_splits_examples(tmp_path, strategy):
    with pytest.raises(ValueError, match=rf"packing_strategy='{strategy}' cuts examples apart.*'bfd'"):
        make_trainer(tmp_path, "prompt_completion", packing=True, packing_strategy=strategy)


def test_completion_only_with_bfd_packing_keeps_prompts_clean(tmp_path):
    trainer = make_trainer(tmp_path, "prompt_completion", packing=True, max_steps=1, max_length=64)
    calls = spy(trainer.model)
    trainer.train()
    outer, inner = calls
    assert (outer["labels"] == -100).sum() > (outer["position_ids"] == 0).sum()  # prompts, not just doc starts
    assert not (inner["input_ids"] == trainer.model.config.mask_token_id)[outer["labels"] == -100].any()


def test_qlora_without_bitsandbytes_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name)
    )
    with pytest.raises(ImportError, match=r"peft-diffusion\[qlora\]"):
        make_trainer(tmp_path, base=str(tmp_path), quantization_config=object())


def test_an_adapter_loaded_frozen_is_refused_before_training(tmp_path):
    # `from_pretrained` loads the adapter for inference (no parameter requires grad): without the check, training
    # failed at the first backward with autograd's "element 0 of tensors does not require grad".
    config = DiffusionConfig(attention="block", block_size=4, mask_token_id=MASK_ID)
    get_diffusion_model(tiny_causal_lm("llama"), config, peft_config=lora()).save_pretrained(tmp_path / "adapter")
    frozen = DiffusionLM.from_pretrained(tmp_path / "adapter", base_model=tiny_causal_lm("llama"))
    args = dict(args=training_args(tmp_path / "out"), train_dataset=dataset("text"), processing_class=word_tokenizer())
    with pytest.raises(ValueError, match=r"from_pretrained\(path, is_trainable=True\)"):
        DiffusionTrainer(frozen, **args)
    trainable = DiffusionLM.from_pretrained(
        tmp_path / "adapter", base_model=tiny_causal_lm("llama"), is_trainable=True
    )
    assert DiffusionTrainer(trainable, **args).model is trainable


def test_bad_trainer_arguments(tmp_path):
    base = tiny_causal_lm("llama")
    tokenizer = word_tokenizer()
    with pytest.raises(ValueError, match="pass `diffusion_config=DiffusionConfig"):
        DiffusionTrainer(base, args=training_args(tmp_path), train_dataset=dataset("text"), processing_class=tokenizer)
    model = get_diffusion_model(base, DiffusionConfig(mask_token_id=MASK_ID))
    with pytest.raises(ValueError, match="already a DiffusionLM"):
        DiffusionTrainer(
            model,
            args=training_args(tmp_path),
            train_dataset=dataset("text"),
            processing_class=tokenizer,
            peft_config=lora(),
        )
    from trl import SFTConfig

    with pytest.raises(TypeError, match="must be a `DiffusionTrainingConfig`"):
        DiffusionTrainer(
            model, args=SFTConfig(str(tmp_path), bf16=False), train_dataset=dataset("text"), processing_class=tokenizer
        )
    with pytest.raises(ValueError, match="`processing_class` is required"):
        DiffusionTrainer(model, args=training_args(tmp_path), train_dataset=dataset("text"))


# --------------------------------------------------------------------------------------------------------------
# accelerate
# --------------------------------------------------------------------------------------------------------------


def launch_two_processes(tmp_path, *script_args):
    pytest.importorskip("accelerate")
    # `--cpu` makes accelerate 1.15 run a single process; torchrun (`--multi_gpu`) with ACCELERATE_USE_CPU gives
    # two CPU processes on gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["ACCELERATE_USE_CPU"] = "true"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
        str(SCRIPTS / "ddp_train.py"), str(tmp_path), *script_args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_two_processes_with_accelerate(tmp_path):
    reports = launch_two_processes(tmp_path)
    assert [r["world_size"] for r in reports] == [2, 2]
    assert all(r["global_step"] == 2 and r["changed"] and r["interrupted"] is None for r in reports)
    # both ranks hold the same synchronised weights, and the result was saved once (by rank 0)
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"])
    assert sorted(os.listdir(tmp_path / "out" / "final")).count("adapter_model.safetensors") == 1
    assert (tmp_path / "saves.log").read_text().splitlines() == ["0"]


@pytest.mark.slow
def test_ctrl_c_on_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    reports = launch_two_processes(tmp_path, "interrupt")  # a hang or a mismatch would fail the launch
    assert [r["global_step"] for r in reports] == [2, 2]
    assert all("after step 2 of 4; saved a resumable checkpoint" in r["interrupted"] for r in reports)
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"])
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "saves.log").read_text().splitlines() == ["0", "0"]  # the checkpoint, then the final model


# --------------------------------------------------------------------------------------------------------------
# A wall-clock budget (max_train_minutes)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "warmup"), [("cosine", 0), ("linear", 2), ("constant", 0)])
def test_a_time_budget_stops_training_and_runs_the_schedule_on_the_clock(tmp_path, monkeypatch, kind, warmup):
    """A fake clock advances a quarter of the budget per optimizer step: training stops after 4 steps although
    max_steps is 100, and every logged learning rate is the hand formula of the budget fraction spent."""
    from peft_diffusion import budget

    now = [1000.0]
    monkeypatch.setattr(budget.time, "monotonic", lambda: now[0])
    minutes, lr = 2.0, 1e-2

    class Tick(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            now[0] += minutes * 60 / 4

    trainer = make_trainer(
        tmp_path, max_steps=100, max_train_minutes=minutes, lr_scheduler_type=kind, warmup_steps=warmup,
        learning_rate=lr,
    )  # fmt: skip
    trainer.add_callback(Tick())
    trainer.train()
    assert trainer.state.global_step == 4
    shapes = {
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
        "linear": lambda p: 1 - p,
        "constant": lambda p: 1,
    }
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    # the rate logged at step k + 1 is the one it used: warmup k / warmup, then the shape at the fraction k / 4 spent
    expected = [lr * (k / warmup if k < warmup else shapes[kind](k / 4)) for k in range(4)]
    assert logged == pytest.approx(expected, abs=1e-12)
    state = trainer.lr_scheduler.state_dict()
    assert "budget" not in state and "shape" not in state  # the clock is never restored from a checkpoint


def test_under_a_time_budget_the_progress_bar_counts_the_budget_not_max_steps(tmp_path, monkeypatch, capsys):
    """HF's bar would read "3/100": under a budget the bar is in the budget's seconds. With a fake clock spending
    0.3 of a 2-minute budget per step, the bar ends full after 4 steps, with the step count
    and 36.0 s/step (0.3 * 120 s) in its postfix; without a budget HF's own step bar is left alone."""
    from transformers.trainer_callback import ProgressCallback

    from peft_diffusion import budget

    now = [1000.0]
    monkeypatch.setattr(budget.time, "monotonic", lambda: now[0])

    class Tick(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            now[0] += 0.3 * 120

    trainer = make_trainer(tmp_path, max_steps=100, max_train_minutes=2.0, disable_tqdm=False)
    bars = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)]
    assert [type(cb) for cb in bars] == [budget.BudgetProgressCallback]  # replaces HF's, never shown twice
    trainer.add_callback(Tick())
    trainer.train()
    assert trainer.state.global_step == 4  # 0.3, 0.6, 0.9, then past the budget
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [line for line in err if "(2.0-minute budget)" in line][-1]
    assert "100%|" in last and last.endswith("step 4, 36.0 s/step]")
    assert not any("/100 " in line for line in err)  # no bar over max_steps

    plain = make_trainer(tmp_path, max_steps=2, disable_tqdm=False)
    assert [type(cb) for cb in plain.callback_handler.callbacks if isinstance(cb, ProgressCallback)] == [
        ProgressCallback
    ]
    quiet = make_trainer(tmp_path, max_steps=2, max_train_minutes=2.0, disable_tqdm=True)
    assert not any(isinstance(cb, ProgressCallback) for cb in quiet.callback_handler.callbacks)


# --------------------------------------------------------------------------------------------------------------
# The AR teacher (teacher_weight)
# --------------------------------------------------------------------------------------------------------------


def test_the_ar_teacher_is_the_base_model_and_its_term_is_the_kl_at_masked_targets(tmp_path):
    """The teacher's logits equal an untouched copy of the base (so the adapter is really off), and the loss with
    `teacher_weight` adds exactly weight * sum KL(base || student) / targets over the masked targets."""
    import copy

    base = tiny_causal_lm("llama")
    reference = copy.deepcopy(base).eval()  # the base, never converted
    trainer = make_trainer(tmp_path, base=base, teacher_weight=0.5, max_steps=1)
    model = trainer.model
    with torch.no_grad():  # a trained-looking adapter: the student differs from the base
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {key: value.to(model.device) for key, value in batch.items()}
    teacher = trainer._teacher_logits(batch)  # [B, L, V]
    with torch.no_grad():
        expected = reference(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
        ).logits
    vocab = expected.shape[-1]  # the reference lacks a mask row that conversion added
    mask_id = model.config.mask_token_id
    assert torch.isinf(teacher[..., mask_id]).all()  # the teacher never proposes the mask token
    if mask_id < vocab:
        expected[..., mask_id] = float("-inf")
    torch.testing.assert_close(teacher[:, 1:, :vocab], expected[:, :-1], rtol=1e-4, atol=1e-4)

    labels = batch["labels"]
    generator = torch.Generator().manual_seed(0)
    t = torch.full((labels.shape[0],), 0.6)
    is_masked = (torch.rand(labels.shape, generator=generator) < 0.6) & (labels != -100)
    common = dict(input_ids=batch["input_ids"], labels=labels, attention_mask=batch.get("attention_mask"), t=t,
                  is_masked=is_masked)  # fmt: skip
    model.eval()
    with torch.no_grad():
        plain = model(**common)
        with_teacher = model(**common, teacher_logits=teacher, teacher_weight=0.5)
    student = with_teacher.logits
    real = batch["attention_mask"].bool()
    positions = real.long().cumsum(1) - 1  # right padding: positions count the real tokens
    is_masked &= real
    scored = is_masked & (positions > 0)
    log_q = torch.log_softmax(student[scored].double(), -1)[:, :vocab]
    log_p = torch.log_softmax(expected[:, :-1][scored[:, 1:]].double(), -1)
    kl_sum = torch.where(log_p.exp() > 0, log_p.exp() * (log_p - log_q), 0.0).sum()  # the mask token has p = 0
    num_targets = ((labels != -100) & real & (positions > 0)).sum()  # shift: a document's first token is no target
    assert (with_teacher.loss - plain.loss).item() == pytest.approx(0.5 * kl_sum.item() / num_targets.item(), rel=1e-4)


def test_the_certainty_term_adds_the_entropy_of_the_right_masked_predictions(tmp_path):
    """`certainty_weight` adds exactly weight * sum H(student) / targets over the masked targets whose argmax is
    the target (the entropy by hand, from the logits of the plain forward)."""
    trainer = make_trainer(tmp_path, max_steps=1)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    generator = torch.Generator().manual_seed(0)
    is_masked = (torch.rand(labels.shape, generator=generator) < 0.7) & (labels != -100)
    input_ids, labels = batch["input_ids"].clone(), labels.clone()
    common = dict(input_ids=input_ids, labels=labels, attention_mask=batch.get("attention_mask"),
                  t=torch.full((labels.shape[0],), 0.7), is_masked=is_masked)  # fmt: skip
    real = batch["attention_mask"].bool()
    positions = real.long().cumsum(1) - 1
    scored = is_masked & real & (positions > 0)
    model.eval()
    with torch.no_grad():
        # make the first masked targets of row 0 the model's own prediction, left to right (a masked token only
        # reaches later blocks, through the clean context, so an earlier prediction never changes)
        for index in scored[0].nonzero().flatten()[:4].tolist():
            guess = model(**common).logits[0, index].argmax()
            if guess != model.config.mask_token_id:
                input_ids[0, index] = labels[0, index] = guess
        plain = model(**common)
        forced = model(**common, certainty_weight=0.3, certainty_temperature=0.5)
        logits = plain.logits.double()
    right = scored & (logits.argmax(-1) == input_ids)
    probability = torch.softmax(logits[right] / 0.5, -1)
    entropy_sum = -torch.special.xlogy(probability, probability).sum()  # 0 log 0 = 0 (the mask token)
    num_targets = ((labels != -100) & real & (positions > 0)).sum()
    assert right.sum() >= 2 and (scored & ~right).any()  # right and wrong predictions: the term is not all or none
    assert (forced.loss - plain.loss).item() == pytest.approx(0.3 * entropy_sum.item() / num_targets.item(), rel=1e-4)


def test_training_with_certainty_forcing_logs_its_entropy_and_checks_its_arguments(tmp_path):
    trainer = make_trainer(tmp_path, certainty_weight=1.0, max_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "certainty_entropy" in entry]
    assert logged and all(entry["certainty_entropy"] >= 0 for entry in logged)
    with pytest.raises(ValueError, match=r"`certainty_weight` must be a number >= 0.*certainty_weight=-1"):
        training_args(tmp_path, certainty_weight=-1)
    with pytest.raises(ValueError, match=r"`certainty_temperature` must be a number > 0.*certainty_temperature=0"):
        training_args(tmp_path, certainty_temperature=0)


def test_training_with_the_teacher_logs_its_kl_and_full_finetuning_refuses_it(tmp_path):
    trainer = make_trainer(tmp_path, teacher_weight=1.0, teacher_positions="first_masked", max_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "teacher_kl" in entry]
    assert logged and all(entry["teacher_kl"] > 0 for entry in logged)
    with pytest.raises(ValueError, match=r"teacher_weight=1.0.*needs a LoRA model"):
        make_trainer(tmp_path, peft=False, teacher_weight=1.0)
