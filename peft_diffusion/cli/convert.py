"""`peft-diffusion convert`: load, convert, train, save, then the demo.

    peft-diffusion convert                       # SmolLM2-135M-Instruct on the standard library, LoRA, ~10 min on CPU
    peft-diffusion convert --model <folder or Hub id> --dataset <file or Hub id> --full --config recipe.yaml

`convert` takes every field of `DiffusionConfig` (`DiffusionArguments`), of `DiffusionTrainingConfig` (TRL's
`SFTConfig` and the Trainer's arguments) and of TRL's `ModelConfig` (LoRA, dtype, attention backend, 4-bit). It loads
the checkpoint (the default one when `--model` is omitted, `defaults.py`), converts and trains it (wall-clock limit
`--max_train_minutes` besides `--max_steps`), saves it, then runs the demo (`demo.py`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

from ..config import DiffusionConfig
from ..sources import DEFAULT_MODEL_NAME
from .args import (
    CommandError,
    add_alias,
    build_parser,
    config_arguments,
    decoding_threshold,
    parse,
    threshold_field,
    torch_dtype,
)
from .defaults import CONVERT_DECODING, CONVERT_DEFAULTS
from .demo import DEFAULT_CHAT_PROMPTS, run_demo

# Every field DiffusionConfig declares, except what conversion fills in from the base model.
DiffusionArguments = config_arguments(
    DiffusionConfig,
    "DiffusionArguments",
    exclude=("base_config", "base_model_name_or_path", "base_fingerprint"),
    module=__name__,
)


@dataclass
class ConvertArguments:
    """What `convert` reads besides the model, diffusion and training settings."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "aliases": ["--dataset"],
            "help": "Training text: a local .txt/.json/.jsonl/.csv/.parquet file, a folder or a `datasets` Hub id; "
            "default: the installed Python's standard-library sources (no download).",
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a folder / Hub dataset."})
    text_field: str | None = field(
        default=None, metadata={"help": "Column holding the text (default: `dataset_text_field`, 'text')."}
    )
    stdlib_files: int = field(default=100, metadata={"help": "Modules sampled for the default data."})
    default_data: str = field(
        default="auto",
        metadata={
            "help": "Training data when --dataset is not given: 'self_distilled' (the base model's own chat answers "
            "to instructions it writes itself, cached; only the answers are noised), 'stdlib' (the standard-library "
            "sample), or 'auto': self_distilled for a model with a chat template, else stdlib.",
            "choices": ["auto", "self_distilled", "stdlib"],
        },
    )
    distill_examples: int = field(
        default=64, metadata={"help": "Rows of self-distilled data (built once per model and settings, then cached)."}
    )
    distill_max_new_tokens: int = field(
        default=128,
        metadata={"help": "Longest self-distilled answer; longer ones are trimmed to their last sentence end."},
    )
    plain_text_share: float = field(
        default=0.0,
        metadata={
            "help": "Self-distilled chat rows only: the share of plain-text windows (the standard-library sample, from "
            "each text's start) mixed in (`peft_diffusion.mix_plain_text`); 0 (default): chat rows only. At 10 "
            "minutes 0.25 did not bring the model closer to its base on plain text (docs/conversion.md, section f)."
        },
    )
    min_train_share: float = field(
        default=0.25,
        metadata={
            "help": "--max_train_minutes counts from the start of the command; when loading and building the data "
            "leave less than this share of it, training still gets this share (the run then overruns the budget)."
        },
    )
    full: bool = field(default=False, metadata={"help": "Full finetuning instead of LoRA."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace an earlier run in a non-empty --output_dir: its files (adapter, model, configs, "
            "tokenizer, checkpoints, trajectory) are removed once the model has loaded; other files stay. Without "
            "it a non-empty folder is refused (resuming with --resume_from_checkpoint writes into it)."
        },
    )
    demo: bool = field(
        default=True,
        metadata={
            "help": "After saving: chat generations beside the AR base (NFE, tokens/s), an infilling example "
            "and a PNG of the denoising trajectory."
        },
    )
    demo_prompts: list[str] = field(
        default_factory=lambda: list(DEFAULT_CHAT_PROMPTS),
        metadata={"help": "Chat messages answered by both models in the demo."},
    )
    demo_max_new_tokens: int = field(default=48, metadata={"help": "Tokens per demo answer."})
    threshold: float | None = threshold_field(0.9, "The demo's decoding: ")


def convert_parser():
    from trl import ModelConfig

    from ..training_config import DiffusionTrainingConfig

    parser = build_parser(
        (ConvertArguments, DiffusionArguments, DiffusionTrainingConfig, ModelConfig),
        "peft-diffusion convert",
        CONVERT_DEFAULTS,
    )
    add_alias(parser, "model_name_or_path", "--model")
    return parser


def convert(argv: list[str]) -> int:
    """Run `peft-diffusion convert` with `argv` (the flags after the command); returns the exit code.

    1. the checkpoint, the data and the tokenizer (`_checkpoint_and_data`), LoRA or full finetuning;
    2. conversion and training (`DiffusionTrainer`, stopped by `--max_steps` or `--max_train_minutes`);
    3. save the adapter or full model with `diffusion_config.json`, and the tokenizer with its mask token;
    4. the demo (`demo.run_demo`) unless `--demo false`.
    """
    from trl import get_peft_config, get_quantization_config

    from ..trainer import DiffusionTrainer

    script_args, diffusion_args, training_args, model_args = parse(convert_parser(), argv)
    started = time.monotonic()
    if not 0 <= script_args.plain_text_share < 1:
        raise CommandError(
            f"--plain_text_share must be in [0, 1) (the share of plain-text rows), got {script_args.plain_text_share}."
        )
    if not 0 <= script_args.min_train_share <= 1:
        raise CommandError(
            f"--min_train_share must be in [0, 1] (a share of --max_train_minutes), got {script_args.min_train_share}."
        )
    diffusion_config = diffusion_args.to_config()
    # 1. the checkpoint and the data
    model_path, dataset, tokenizer = _checkpoint_and_data(script_args, training_args, model_args)
    # the base the saved model names: the --model the user gave, or the default checkpoint's stable name (never the
    # converting user's cache folder; `sources.local_model_path` finds it again on load)
    diffusion_config.base_model_name_or_path = model_args.model_name_or_path or DEFAULT_MODEL_NAME
    model_kwargs = training_args.model_init_kwargs
    peft_config = None if script_args.full else get_peft_config(model_args)
    if not script_args.full and peft_config is None:
        raise CommandError("LoRA is off (use_peft: false in the config): pass --full for full finetuning.")
    if script_args.full and training_args.teacher_weight == CONVERT_DEFAULTS["teacher_weight"]:
        # the recipe's teacher is the base under a LoRA adapter; a full finetune has none (set by hand: an error)
        training_args.teacher_weight = 0.0
        print("--full: training without the AR teacher (it is the base under a LoRA adapter)")

    # 2. conversion and training
    with removed_if_left_empty(training_args.output_dir):  # the Trainer creates it; a failed run leaves nothing
        trainer = DiffusionTrainer(
            model_path,
            args=training_args,
            train_dataset=dataset,
            processing_class=tokenizer,
            diffusion_config=diffusion_config,
            peft_config=peft_config,
            quantization_config=get_quantization_config(model_args),
        )
        if script_args.overwrite_output_dir:  # the model has loaded: replace the earlier run
            resuming = bool(training_args.resume_from_checkpoint)
            removed = clear_output_dir(training_args.output_dir, keep_checkpoints=resuming)
            if removed:
                print(f"--overwrite_output_dir: removed {', '.join(removed)} (an earlier run)")
        model = trainer.model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"diffusion: attention={diffusion_config.attention} block_size={diffusion_config.block_size} "
            f"shift={diffusion_config.shift} clean_context={diffusion_config.clean_context}; "
            f"{'full finetuning' if script_args.full else 'LoRA'}: {trainable / 1e6:.2f}M trainable parameters"
        )
        if trainer.time_budget is not None:  # on the command line the budget counts from the start of the command
            budget = training_args.max_train_minutes
            spent = (time.monotonic() - started) / 60
            floor = script_args.min_train_share * budget
            trainer.time_budget.minutes = max(budget - spent, floor, 1e-6)  # 1e-6: one step
            if budget - spent < floor:
                print(
                    f"Warning: loading and the data took {spent:.1f} of the {budget:g}-minute budget; training gets "
                    f"{trainer.time_budget.minutes:.1f} minutes (--min_train_share {script_args.min_train_share:g}), "
                    "so the run ends after the budget. Downloads and built data are cached: a second run trains longer."
                )
            else:
                print(
                    f"training budget: {trainer.time_budget.minutes:.1f} of {budget:g} minutes left after loading "
                    "(--max_train_minutes counts from the start of the command)"
                )
        train_start = time.monotonic()
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        train_seconds = time.monotonic() - train_start
        if trainer.time_budget is not None and trainer.time_budget.stopped_at is not None:
            print(
                f"Stopping: the {training_args.max_train_minutes:g}-minute budget is spent (step {result.global_step})."
            )
        print(
            f"trained {result.global_step} steps in {train_seconds / 60:.1f} min, final training loss "
            f"{result.training_loss:.3f}"
        )

        # 3. save (adapter or full model, diffusion_config.json, the decoding settings, the tokenizer with its mask
        # token)
        for key, value in CONVERT_DECODING.items():
            setattr(model.generation_config, key, value)
        trainer.save_model(training_args.output_dir)
        tokenizer.save_pretrained(training_args.output_dir)
        print(f"saved to {training_args.output_dir}")

    # 4. demo
    if script_args.demo:
        model.eval()
        run_demo(
            model,
            tokenizer,
            model_path=model_path,
            model_kwargs=model_kwargs,
            max_new_tokens=script_args.demo_max_new_tokens,
            threshold=decoding_threshold(script_args.threshold),
            trajectory_path=os.path.join(training_args.output_dir, "trajectory.png"),
            prompts=script_args.demo_prompts,
        )
    print(f"total wall time {(time.monotonic() - started) / 60:.1f} min")
    return 0


def _checkpoint_and_data(script_args, training_args, model_args) -> tuple:
    """`(model_path, dataset, tokenizer)` for `convert`, with the output folder (default `<model name>-diffusion`),
    the text column and the model's loading arguments (`model_init_kwargs`) set on `training_args`."""
    from transformers import AutoTokenizer

    from .defaults import DEFAULT_MODEL_NAME, load_text_dataset, resolve_model

    model_path = resolve_model(model_args.model_name_or_path)
    name = DEFAULT_MODEL_NAME if model_args.model_name_or_path is None else os.path.basename(model_path.rstrip("/"))
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = f"{name}-diffusion"
    check_output_dir(
        training_args.output_dir,
        overwrite=script_args.overwrite_output_dir,
        resuming=bool(training_args.resume_from_checkpoint),
        model_path=model_path,
    )
    training_args.dataset_text_field = script_args.text_field or training_args.dataset_text_field
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model_kwargs = {"attn_implementation": model_args.attn_implementation or "sdpa"}
    if torch_dtype(model_args.dtype) is not None:
        model_kwargs["dtype"] = torch_dtype(model_args.dtype)
    training_args.model_init_kwargs = model_kwargs
    choice = script_args.default_data
    has_template = isinstance(tokenizer.chat_template, str) and bool(tokenizer.chat_template)
    if script_args.dataset_name is None and choice == "auto":
        choice = "self_distilled" if has_template else "stdlib"
    if script_args.dataset_name is None and choice == "self_distilled":
        print(f"model: {model_path}\noutput: {training_args.output_dir}")
        if training_args.max_length is None:  # whole rows: template, instruction and answer
            training_args.max_length = 256
        dataset = _self_distilled(model_path, tokenizer, model_kwargs, script_args, chat=has_template)
        source = f"self-distilled from the base ({'chat answers' if has_template else 'text continuations'})"
        print(f"data: {source}, {len(dataset)} rows")
        return model_path, dataset, tokenizer
    if training_args.max_length is None:
        training_args.max_length = 128
    dataset = load_text_dataset(
        script_args.dataset_name,
        split=script_args.dataset_split,
        text_field=training_args.dataset_text_field,
        num_files=script_args.stdlib_files,
    )
    source = script_args.dataset_name or f"{script_args.stdlib_files} standard-library modules"
    print(f"model: {model_path}\ndata: {source}, {len(dataset)} texts\noutput: {training_args.output_dir}")
    return model_path, dataset, tokenizer


def _self_distilled(model_path: str, tokenizer, model_kwargs: dict, script_args, *, chat: bool):
    """The base's own data (`peft_diffusion.data.self_distilled_dataset`): loaded from its cache, or generated with a
    plain load of the base (freed before the trainer loads it, perhaps quantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..data import DistillationStats, self_distilled_dataset
    from ..mixture import mix_plain_text
    from ..sources import stdlib_texts

    base = AutoModelForCausalLM.from_pretrained(model_path, **model_kwargs)
    dataset = self_distilled_dataset(
        base,
        tokenizer,
        num_examples=script_args.distill_examples,
        max_new_tokens=script_args.distill_max_new_tokens,
        cut_completions="trim",
        chat=chat,
    )
    del base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"self-distilled data: {DistillationStats.from_dataset(dataset).summary()}")
    if chat and script_args.plain_text_share > 0:
        rows = len(dataset)
        dataset = mix_plain_text(
            dataset, tokenizer, stdlib_texts(script_args.stdlib_files), share=script_args.plain_text_share
        )
        print(f"plain text: {len(dataset) - rows} standard-library windows beside {rows} chat rows")
    return dataset


# ----------------------------------------------------------------------------------------------------------------
# The output folder: nothing lost, nothing stale
# ----------------------------------------------------------------------------------------------------------------

# What `convert` writes into its output folder (an adapter or a full model, their configs, the tokenizer, the
# Trainer's files and checkpoints, the demo's picture): `--overwrite_output_dir` removes these and nothing else.
OUTPUT_FILES = (
    "adapter_*",
    "diffusion_config.json",
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "training_args.bin",
    "trainer_state.json",
    "checkpoint-*",
    "runs",
    "trajectory.png",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def check_output_dir(output_dir: str, *, overwrite: bool, resuming: bool, model_path: str | None = None) -> None:
    """Refuse a non-empty output folder (files there would be overwritten or, worse, left stale: an old
    `adapter_config.json` beside a new full model makes `from_pretrained` load the old adapter) unless
    `--overwrite_output_dir` says to replace it, or `--resume_from_checkpoint` continues the run that wrote it.
    The folder of the model being converted is always refused (the adapter needs its base, the demo reloads it)."""
    if os.path.isfile(output_dir):
        raise CommandError(f"--output_dir {output_dir!r} is a file; give a folder.")
    if model_path is not None and os.path.realpath(output_dir) == os.path.realpath(model_path):
        raise CommandError(
            f"--output_dir {output_dir!r} is the folder of the --model being converted; choose another folder."
        )
    entries = _visible_entries(output_dir)
    if entries and not (overwrite or resuming):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise CommandError(
            f"--output_dir {output_dir!r} is not empty ({shown}); pass --overwrite_output_dir to replace an earlier "
            "run's files (other files stay), or choose another --output_dir."
        )


def clear_output_dir(output_dir: str, *, keep_checkpoints: bool = False) -> list[str]:
    """Remove what an earlier `convert` wrote into `output_dir` (`OUTPUT_FILES`, and a README.md that is PEFT's model
    card), keeping every other file and, when `keep_checkpoints` (resuming), the `checkpoint-*` folders.

    Returns:
        `list[str]`: the names removed, sorted.
    """
    import fnmatch
    import shutil

    removed = []
    for entry in _visible_entries(output_dir):
        path = os.path.join(output_dir, entry)
        ours = any(fnmatch.fnmatch(entry, pattern) for pattern in OUTPUT_FILES) or _is_peft_model_card(path)
        if not ours or (keep_checkpoints and fnmatch.fnmatch(entry, "checkpoint-*")):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(entry)
    return removed


def _visible_entries(folder: str) -> list[str]:
    """The entries of `folder` (none when it does not exist), leaving out hidden ones such as `.DS_Store`."""
    if not os.path.isdir(folder):
        return []
    return sorted(entry for entry in os.listdir(folder) if not entry.startswith("."))


def _is_peft_model_card(path: str) -> bool:
    """A README.md written by PEFT's `save_pretrained` (its front matter names `library_name: peft`)."""
    if os.path.basename(path) != "README.md" or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(2000)
    return head.startswith("---") and "library_name: peft" in head


@contextlib.contextmanager
def removed_if_left_empty(folder: str):
    """Run the block; if it fails (an error or Ctrl-C) and `folder` did not exist before and is empty, remove it and
    the empty parents created with it, so that a failed run leaves no empty output folder behind."""
    folder = os.path.abspath(folder)
    outermost = folder  # the outermost of `folder` and its parents that does not exist yet
    while not os.path.exists(os.path.dirname(outermost)):
        outermost = os.path.dirname(outermost)
    existed = os.path.exists(folder)
    try:
        yield
    except BaseException:
        path = folder
        while not existed and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
            if path == outermost:
                break
            path = os.path.dirname(path)
        raise
