"""`peft-diffusion convert`: load, convert, train, save, then the demo.

    peft-diffusion convert                       # SmolLM2-135M-Instruct on the standard library, LoRA, ~10 min on CPU
    peft-diffusion convert --model <folder or Hub id> --dataset <file or Hub id> --full --config recipe.yaml

`convert` takes every field of `DiffusionConfig` (`DiffusionArguments`), of `DiffusionTrainingConfig` (TRL's
`SFTConfig` and the Trainer's arguments) and of TRL's `ModelConfig` (LoRA, dtype, attention backend, 4-bit). It loads
the checkpoint (the default one when `--model` is omitted, `defaults.py`), converts and trains it (wall-clock limit
`--max_train_minutes` besides `--max_steps`), saves it, then runs the demo (`demo.py`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..config import DiffusionConfig
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
from .defaults import CONVERT_DEFAULTS
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
    full: bool = field(default=False, metadata={"help": "Full finetuning instead of LoRA."})
    max_train_minutes: float | None = field(
        default=7.0,
        metadata={
            "help": "Stop training once this many minutes have passed since the command started (checked every "
            "step; loading counts, the demo does not); `max_steps` is the primary knob. 0: no limit."
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


def _time_limit_callback(minutes: float, started: float):
    from transformers import TrainerCallback

    class WallClockLimit(TrainerCallback):
        """Stop training once `minutes` have passed since `started` (a `time.monotonic()` value: the start of the
        command, so that a slow first load of the checkpoint eats into training, not into the total)."""

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - started > minutes * 60:
                print(f"\nStopping: the {minutes:g}-minute budget is spent (step {state.global_step}).")
                control.should_training_stop = True
            return control

    return WallClockLimit()


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
    diffusion_config = diffusion_args.to_config()
    # 1. the checkpoint and the data
    model_path, dataset, tokenizer = _checkpoint_and_data(script_args, training_args, model_args)
    model_kwargs = training_args.model_init_kwargs
    peft_config = None if script_args.full else get_peft_config(model_args)
    if not script_args.full and peft_config is None:
        raise CommandError("LoRA is off (use_peft: false in the config): pass --full for full finetuning.")

    # 2. conversion and training
    callbacks = []
    if script_args.max_train_minutes is not None and script_args.max_train_minutes > 0:
        callbacks.append(_time_limit_callback(script_args.max_train_minutes, started))
    trainer = DiffusionTrainer(
        model_path,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        diffusion_config=diffusion_config,
        peft_config=peft_config,
        quantization_config=get_quantization_config(model_args),
        callbacks=callbacks,
    )
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"diffusion: attention={diffusion_config.attention} block_size={diffusion_config.block_size} "
        f"shift={diffusion_config.shift} clean_context={diffusion_config.clean_context}; "
        f"{'full finetuning' if script_args.full else 'LoRA'}: {trainable / 1e6:.2f}M trainable parameters"
    )
    train_start = time.monotonic()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.monotonic() - train_start
    print(
        f"trained {result.global_step} steps in {train_seconds / 60:.1f} min, final training loss "
        f"{result.training_loss:.3f}"
    )

    # 3. save (adapter or full model, diffusion_config.json, the tokenizer with its mask token)
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
    training_args.dataset_text_field = script_args.text_field or training_args.dataset_text_field
    dataset = load_text_dataset(
        script_args.dataset_name,
        split=script_args.dataset_split,
        text_field=training_args.dataset_text_field,
        num_files=script_args.stdlib_files,
    )
    source = script_args.dataset_name or f"{script_args.stdlib_files} standard-library modules"
    print(f"model: {model_path}\ndata: {source}, {len(dataset)} texts\noutput: {training_args.output_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model_kwargs = {"attn_implementation": model_args.attn_implementation or "sdpa"}
    if torch_dtype(model_args.dtype) is not None:
        model_kwargs["dtype"] = torch_dtype(model_args.dtype)
    training_args.model_init_kwargs = model_kwargs
    return model_path, dataset, tokenizer
