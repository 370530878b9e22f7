"""The `peft-diffusion` command: `convert`, `generate`, `eval`.

    peft-diffusion convert                       # SmolLM2-135M-Instruct on the standard library, LoRA, ~10 min on CPU
    peft-diffusion convert --model <folder or Hub id> --dataset <file or Hub id> --full --config recipe.yaml
    peft-diffusion generate --model SmolLM2-135M-Instruct-diffusion --chat "What is the capital of France?"
    peft-diffusion eval --model SmolLM2-135M-Instruct-diffusion

Every subcommand parses dataclasses with TRL's `TrlParser` (transformers' `HfArgumentParser` plus `--config
file.yaml`; flags override the file). `convert` takes every field of `DiffusionConfig` (`DiffusionArguments`), of
`DiffusionTrainingConfig` (TRL's `SFTConfig` and the Trainer's arguments) and of TRL's `ModelConfig` (LoRA, dtype,
attention backend, 4-bit). Bad input ends with one line on stderr and a non-zero exit (`--debug` or
`PEFT_DIFFUSION_DEBUG=1` shows the traceback).

`convert` runs the main job: load (the default checkpoint when `--model` is omitted, `defaults.py`), convert, train
(wall-clock limit `--max_train_minutes` besides `--max_steps`), save, then a demo: chat generations of the diffusion
model beside the AR base's HF `generate` (NFE, tokens/s), an infilling example, and a PNG of the denoising trajectory.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Literal

DEBUG_ENV = "PEFT_DIFFUSION_DEBUG"
DEFAULT_CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
)
# Infilling demo: a line of code whose middle is masked (the text after the gap stays fixed).
INFILL_EXAMPLE = ("def average(numbers):\n    return sum(numbers) / ", "len(numbers)", "\n")
EXIT_USAGE = 2
EXIT_ERROR = 1


class CommandError(Exception):
    """Bad input found by the CLI itself: printed as one line, exit code 1."""


class UsageError(Exception):
    """A flag argparse could not parse: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DiffusionArguments:
    """The fields of `DiffusionConfig` as flags (what the converted model is). Defaults: the quick-start recipe."""

    attention: Literal["block", "bidirectional", "annealed"] = field(
        default="block",
        metadata={
            "help": "Attention pattern: 'block' (Efficient-DLM, KV-cached decoding), 'bidirectional', "
            "'annealed' (DiffuLLaMA)."
        },
    )
    block_size: int = field(default=4, metadata={"help": "Tokens per block under attention='block'."})
    clean_context: bool = field(default=True, metadata={"help": "Two-stream [x_t ; x_0] training under blocks."})
    shift: bool = field(default=True, metadata={"help": "Keep the AR alignment (DiffuLLaMA's shift)."})
    mask_token: str | None = field(default=None, metadata={"help": "Mask token string (default: found or added)."})
    mask_token_id: int | None = field(default=None, metadata={"help": "Mask token id inside the embeddings."})
    noise_schedule: Literal["linear", "cosine"] = field(default="linear", metadata={"help": "alpha_t schedule."})
    masking: Literal["uniform", "position_dependent"] = field(
        default="uniform", metadata={"help": "Which tokens are masked at time t."}
    )
    masking_strength: float = field(default=0.0, metadata={"help": "Strength of position-dependent masking."})

    def to_config(self):
        from .config import DiffusionConfig

        return DiffusionConfig(**{item.name: getattr(self, item.name) for item in fields(self)})


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
    threshold: float | None = field(default=0.9, metadata={"help": "Fast-dLLM threshold of the demo decoding."})


@dataclass
class GenerateArguments:
    """What `generate` reads (the decoding fields are those of `DiffusionGenerationConfig`)."""

    model: str = field(metadata={"help": "A converted model folder (adapter or full) or Hub id."})
    prompt: str | None = field(default=None, metadata={"help": "Text to continue."})
    chat: str | None = field(default=None, metadata={"help": "A user message, formatted with the chat template."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate."})
    steps: int | None = field(default=None, metadata={"help": "Denoising steps in total (default max_new_tokens)."})
    block_length: int | None = field(default=None, metadata={"help": "Tokens per block (default: the model's)."})
    sampler: str = field(default="confidence", metadata={"help": "confidence, random, margin or entropy."})
    threshold: float | None = field(default=0.9, metadata={"help": "Fast-dLLM threshold in (0, 1]; 0: off."})
    temperature: float = field(default=0.0, metadata={"help": "0 is greedy."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling."})
    live: bool = field(default=True, metadata={"help": "Show the denoising live when stdout is a terminal."})
    trajectory: str | None = field(default=None, metadata={"help": "Save a PNG of the denoising trajectory here."})
    dtype: str = field(
        default="float32", metadata={"help": "float32, bfloat16 or float16 (bfloat16 is slow on CPUs)."}
    )


@dataclass
class EvalArguments:
    """What `eval` reads."""

    model: str = field(metadata={"help": "A converted model folder (adapter or full) or Hub id."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "aliases": ["--dataset"],
            "help": "Held-out text (file, folder or Hub id); default: standard-"
            "library modules not in the default training sample.",
        },
    )
    dataset_split: str = field(default="test", metadata={"help": "Split of a folder / Hub dataset."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text."})
    num_texts: int = field(default=16, metadata={"help": "Texts scored."})
    max_length: int = field(default=256, metadata={"help": "Window length in tokens."})
    mc_samples: int = field(default=8, metadata={"help": "Monte-Carlo samples of the ELBO per window."})
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the Monte-Carlo estimate."})
    tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated lm-eval tasks, run through lm-evaluation-harness instead."}
    )
    limit: int | None = field(default=None, metadata={"help": "Examples per lm-eval task."})
    dtype: str = field(
        default="float32", metadata={"help": "float32, bfloat16 or float16 (bfloat16 is slow on CPUs)."}
    )


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------


def _parser(dataclass_types, prog: str, defaults: dict | None = None):
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message):  # argparse prints usage and exits; one line is enough
            raise UsageError(message)

    parser = Parser(dataclass_types, prog=prog)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def _add_alias(parser, dest: str, alias: str) -> None:
    """Give an existing option a second spelling (e.g. `--model` for TRL's `--model_name_or_path`)."""
    for action in parser._actions:
        if action.dest == dest:
            action.option_strings.append(alias)
            parser._option_string_actions[alias] = action
            return


def _parse(parser, argv: list[str]):
    """Parse flags (and `--config file.yaml`): unknown flags and unreadable configs become one-line errors."""
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UsageError("--config needs a YAML file path")
        if not os.path.isfile(argv[index + 1]):
            raise UsageError(f"--config {argv[index + 1]!r}: no such file")
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:
        message = str(error)
        if "not used by the HfArgumentParser" in message or "Unknown arguments" in message:
            raise UsageError(f"unrecognized arguments: {message.split(':', 1)[-1].strip()}") from error
        raise


def convert_parser():
    from trl import ModelConfig

    from .training_config import DiffusionTrainingConfig

    defaults = dict(
        # model (TRL ModelConfig): LoRA r=32 on every linear layer (the mask-token row is trained too)
        use_peft=True,
        lora_r=32,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_target_modules=["all-linear"],
        attn_implementation="sdpa",
        # training (DiffusionTrainingConfig): a budget a 2-core CPU finishes in minutes
        output_dir=None,
        max_steps=40,
        per_device_train_batch_size=2,
        max_length=128,
        packing=True,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
        seed=0,
    )
    parser = _parser(
        (ConvertArguments, DiffusionArguments, DiffusionTrainingConfig, ModelConfig),
        "peft-diffusion convert",
        defaults,
    )
    _add_alias(parser, "model_name_or_path", "--model")
    return parser


def _dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise CommandError(f"--dtype {name!r} is not a torch dtype; use float32, bfloat16 or float16.")
    return value


# ----------------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------------


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
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from .defaults import DEFAULT_MODEL_NAME, load_text_dataset, resolve_model
    from .trainer import DiffusionTrainer

    script_args, diffusion_args, training_args, model_args = _parse(convert_parser(), argv)
    started = time.monotonic()
    # 1. the checkpoint and the data
    model_path = resolve_model(model_args.model_name_or_path)
    name = DEFAULT_MODEL_NAME if model_args.model_name_or_path is None else os.path.basename(model_path.rstrip("/"))
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = f"{name}-diffusion"
    diffusion_config = diffusion_args.to_config()
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
    if _dtype(model_args.dtype) is not None:
        model_kwargs["dtype"] = _dtype(model_args.dtype)
    training_args.model_init_kwargs = model_kwargs
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
        demo(
            model,
            tokenizer,
            model_path=model_path,
            model_kwargs=model_kwargs,
            max_new_tokens=script_args.demo_max_new_tokens,
            threshold=script_args.threshold,
            trajectory_path=os.path.join(training_args.output_dir, "trajectory.png"),
            prompts=script_args.demo_prompts,
        )
    print(f"total wall time {(time.monotonic() - started) / 60:.1f} min")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Demo: generations beside the AR base, infilling, trajectory
# ----------------------------------------------------------------------------------------------------------------


def chat_input_ids(tokenizer, message: str):
    """`[1, P]` prompt ids of one user message under the tokenizer's chat template (plain text without one)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(message, return_tensors="pt").input_ids


def answer_length(tokens, eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first EOS (what a reader gets), from `tokens` `[N]`."""
    return next((index + 1 for index, token in enumerate(tokens.tolist()) if token in eos_ids), len(tokens))


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def demo(
    model,
    tokenizer,
    *,
    model_path,
    model_kwargs=None,
    max_new_tokens=48,
    threshold=0.9,
    trajectory_path=None,
    prompts=DEFAULT_CHAT_PROMPTS,
) -> dict:
    """Print chat generations of `model` beside its AR base, an infilling example; save the trajectory PNG.

    Returns the figures printed (`nfe_per_token`, `tokens_per_second` for both models, the texts).
    """
    import torch
    from transformers import AutoModelForCausalLM

    # the AR base: the checkpoint as it was before conversion (also after full finetuning)
    base = AutoModelForCausalLM.from_pretrained(model_path, **(model_kwargs or {})).eval()
    eos_ids = _eos_ids(base)
    pad_id = tokenizer.pad_token_id
    figures = {"ar": {"nfe": 0, "tokens": 0, "seconds": 0.0}, "diffusion": {"nfe": 0, "tokens": 0, "seconds": 0.0}}
    texts = []
    first_output = None
    print(f"\n=== Generations ({max_new_tokens} new tokens at most, greedy) ===")
    for message in prompts:
        input_ids = chat_input_ids(tokenizer, message)
        prompt_length = input_ids.shape[1]
        with torch.no_grad():
            start = time.perf_counter()
            ar = base.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            ar_seconds = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                threshold=threshold,
                return_dict_in_generate=True,
                output_history=True,
            )
            seconds = time.perf_counter() - start
        ar_new = ar[0, prompt_length:]
        new = out.sequences[0, prompt_length:]
        ar_count = answer_length(ar_new, eos_ids)
        count = answer_length(new, eos_ids)
        figures["ar"]["nfe"] += ar_count
        figures["ar"]["tokens"] += ar_count
        figures["ar"]["seconds"] += ar_seconds
        figures["diffusion"]["nfe"] += out.nfe
        figures["diffusion"]["tokens"] += count
        figures["diffusion"]["seconds"] += seconds
        ar_text = tokenizer.decode(ar_new[:ar_count], skip_special_tokens=True).strip()
        text = tokenizer.decode(new[:count], skip_special_tokens=True).strip()
        texts.append((message, ar_text, text))
        print(
            f"\n> {message}\n  AR base  : {_one_line(ar_text)}\n  diffusion: {_one_line(text)}  [{out.nfe} forwards]"
        )
        if first_output is None or count > first_output[2]:
            first_output = (message, input_ids, count, out)
    for name in ("ar", "diffusion"):
        item = figures[name]
        item["nfe_per_token"] = item["nfe"] / max(item["tokens"], 1)
        item["tokens_per_second"] = item["tokens"] / max(item["seconds"], 1e-9)
    print(
        "\n=== Speed (same prompts, one thread count, batch 1) ===\n"
        f"  AR base (HF generate, KV cache): {figures['ar']['tokens_per_second']:.1f} tokens/s, "
        f"NFE/token {figures['ar']['nfe_per_token']:.2f}\n"
        f"  diffusion (threshold {threshold}): {figures['diffusion']['tokens_per_second']:.1f} tokens/s, "
        f"NFE/token {figures['diffusion']['nfe_per_token']:.2f}"
    )
    figures["texts"] = texts
    figures["infill"] = infill_example(model, tokenizer)
    if trajectory_path is not None and first_output is not None:
        message, input_ids, count, out = first_output
        saved = save_trajectory(
            out.history,
            tokenizer,
            model.config.mask_token_id,
            trajectory_path,
            title=f"{message!r}: {count} tokens in {out.nfe} forwards",
            block_size=_grid(model),
            offset=input_ids.shape[1],
        )
        if saved:
            print(f"\ntrajectory of the longest answer saved to {saved}")
    return figures


def _one_line(text: str, width: int = 400) -> str:
    flat = " ".join(text.split("\n"))
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _grid(model) -> int | None:
    return model.config.attention_block_size


def infill_example(model, tokenizer, example=INFILL_EXAMPLE) -> dict:
    """Fill a masked span between fixed text and print it; honest about what the attention pattern can see.

    `DiffusionLM.infill`, one token per forward, most confident first. Bidirectional / annealed models read the whole
    suffix. Block attention: a block-causal model sees the text after a gap only inside the gap's own block, so the
    input is the prefix, the gap and the suffix up to the end of that block (later blocks could not influence the
    gap anyway).
    """
    import torch

    prefix, middle, suffix = example
    prefix_ids = tokenizer(prefix, return_tensors="pt").input_ids  # [1, P]
    middle_ids = tokenizer(middle, add_special_tokens=False, return_tensors="pt").input_ids  # [1, G]
    suffix_ids = tokenizer(suffix, add_special_tokens=False, return_tensors="pt").input_ids  # [1, S]
    mask_token_id = model.config.mask_token_id
    num_prefix, gap = prefix_ids.shape[1], middle_ids.shape[1]
    grid = _grid(model)
    if grid is not None:
        # The gap's last block must hold some of the text after it: move the gap's last tokens into the fixed text
        # until it does (the reference shrinks accordingly), then drop the text beyond that block.
        while gap > 1 and (num_prefix + gap) % grid == 0:
            suffix_ids = torch.cat([middle_ids[:, -1:], suffix_ids], dim=1)
            middle_ids, gap = middle_ids[:, :-1], gap - 1
        block_end = ((num_prefix + gap - 1) // grid + 1) * grid
        suffix_ids = suffix_ids[:, : block_end - num_prefix - gap]
        middle = tokenizer.decode(middle_ids[0])
        suffix = tokenizer.decode(suffix_ids[0])
    input_ids = torch.cat([prefix_ids, torch.full((1, gap), mask_token_id), suffix_ids], dim=1)  # [1, T]
    with torch.no_grad():
        out = model.infill(input_ids, return_dict_in_generate=True)
    filled, nfe = out.sequences, out.nfe
    answer = tokenizer.decode(filled[0, num_prefix : num_prefix + gap])
    right = tokenizer.decode(suffix_ids[0])
    print("\n=== Infilling (the gap holds as many mask tokens as the reference) ===")
    print(f"  text     : {prefix!r} [{gap} masked tokens] {suffix!r}")
    print(f"  filled   : {answer!r}   (reference {middle!r}, {nfe} forwards)")
    if grid is not None:
        print(
            f"  note     : block attention (block_size {grid}) sees the text after the gap only inside the gap's "
            f"block, here {suffix_ids.shape[1]} token(s) {right!r}; infilling with the whole suffix needs "
            "--attention bidirectional (or annealed)."
        )
    return {"filled": answer, "reference": middle, "nfe": nfe, "right_context": right}


def commit_steps(history, mask_token_id: int):
    """`[N]` step at which each answer position was first committed (-1: never), from `history` `[S, 1, N]`."""
    import torch

    is_committed = history[:, 0] != mask_token_id  # [S, N]
    first = is_committed.float().argmax(0)  # [N]
    return torch.where(is_committed.any(0), first, torch.full_like(first, -1))


def save_trajectory(
    history,
    tokenizer,
    mask_token_id: int,
    path: str,
    *,
    title: str = "",
    block_size: int | None = None,
    offset: int = 0,
    columns: int = 16,
) -> str | None:
    """Save a PNG of the denoising trajectory of one answer (`history` `[S, 1, N]`, from `output_history=True`).

    Top: the answer's tokens in reading order, each coloured by the step that committed it, with the block
    boundaries (position `offset + i` divisible by `block_size`, `offset` being the prompt length). Bottom: commit
    step against position (a token-by-token AR decoder would be the diagonal; several tokens in one step are
    parallel decoding). Returns the path, or None (with a one-line note) without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('(trajectory PNG skipped: `pip install matplotlib` or `pip install "peft-diffusion[demo]"`)')
        return None
    steps = commit_steps(history, mask_token_id).tolist()
    final = history[-1, 0].tolist()
    eos = set(_as_list(tokenizer.eos_token_id))
    length = next((index + 1 for index, token in enumerate(final) if token in eos), len(final))
    labels = [repr(tokenizer.decode([token]))[1:-1][:9] for token in final[:length]]
    columns = max(1, min(columns, length))
    rows = math.ceil(length / columns)
    num_steps = max(max(steps[:length]) + 1, 1)
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(0, max(num_steps - 1, 1))
    fig, (grid_ax, step_ax) = plt.subplots(
        2, 1, figsize=(max(7.0, columns * 0.8), rows * 0.5 + 3.6), gridspec_kw={"height_ratios": [rows * 0.5, 3]}
    )
    # top: the tokens coloured by commit step
    for index in range(length):
        row, col = divmod(index, columns)
        step = steps[index]
        color = cmap(norm(step)) if step >= 0 else (0.85, 0.85, 0.85, 1.0)
        grid_ax.add_patch(plt.Rectangle((col, -row - 1), 0.96, 0.9, color=color))
        dark = step >= 0 and norm(step) < 0.6
        grid_ax.text(col + 0.48, -row - 0.55, labels[index], ha="center", va="center", fontsize=7,
                     color="white" if dark else "black")  # fmt: skip
        grid_ax.text(col + 0.92, -row - 0.12, str(step), ha="right", va="top", fontsize=5,
                     color="white" if dark else "black")  # fmt: skip
        if block_size and (offset + index) % block_size == 0 and index > 0:
            grid_ax.plot([col - 0.02] * 2, [-row - 1.02, -row - 0.08], color="red", linewidth=1.5)
    grid_ax.set_xlim(0, columns)
    grid_ax.set_ylim(-rows, 0)
    grid_ax.axis("off")
    grid_ax.set_title(title + ("\n(red bars: block boundaries)" if block_size else ""), fontsize=9)
    # bottom: step against position
    positions = [index for index in range(length) if steps[index] >= 0]
    step_ax.plot([0, length - 1], [0, length - 1], color="0.75", linestyle="--", linewidth=1, label="one token/step")
    step_ax.scatter(positions, [steps[i] for i in positions], c=[steps[i] for i in positions], cmap=cmap, norm=norm,
                    s=18, zorder=3, label="committed token")  # fmt: skip
    step_ax.set_xlabel("answer position")
    step_ax.set_ylabel("denoising step")
    step_ax.set_xlim(-0.5, length - 0.5)
    step_ax.set_ylim(-0.5, max(num_steps, 1) - 0.5)
    step_ax.legend(loc="upper left", fontsize=7, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


# ----------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------


class LiveView:
    """A streamer that redraws the answer canvas after every denoising step (masked positions shown as `░`).

    `generate` calls `put_draft(value=[1, N] canvas)` after every step (transformers' `TextDiffusionStreamer`
    convention) and `put()` with the prompt and the committed tokens, which this view does not need.
    """

    def __init__(self, tokenizer, mask_token_id: int, stream=None):
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.stream = stream or sys.stdout
        self.eos = set(_as_list(tokenizer.eos_token_id))
        self.previous = None
        self.lines = 0
        self.drafts = 0
        # A token's text is read after a fixed anchor token, so that SentencePiece word starts keep their space.
        self.anchor = tokenizer("a", add_special_tokens=False).input_ids[:1]
        self.anchor_text = tokenizer.decode(self.anchor)
        self.pieces: dict[int, str] = {}

    def piece(self, token: int) -> str:
        if token not in self.pieces:
            text = self.tokenizer.decode(self.anchor + [token], skip_special_tokens=True)
            self.pieces[token] = text[len(self.anchor_text) :]
        return self.pieces[token]

    def put(self, value) -> None:
        pass

    def put_draft(self, value) -> None:
        tokens = value[0].tolist()
        pieces = []
        for index, token in enumerate(tokens):
            if token == self.mask_token_id:
                pieces.append("\033[2m░\033[0m")
                continue
            text = self.piece(token)
            new = self.previous is not None and self.previous[index] == self.mask_token_id
            pieces.append(f"\033[1;32m{text}\033[0m" if new else text)
            if token in self.eos:
                break
        self.previous = tokens
        self.drafts += 1
        rendered = "".join(pieces)
        if self.lines:
            self.stream.write(f"\033[{self.lines - 1}F" if self.lines > 1 else "\r")
        self.stream.write("\033[J" + rendered)
        self.stream.flush()
        width = shutil.get_terminal_size().columns
        plain = rendered.replace("\033[2m░\033[0m", "x")
        for code in ("\033[1;32m", "\033[0m"):
            plain = plain.replace(code, "")
        self.lines = sum(max(1, math.ceil(len(line) / width)) for line in plain.split("\n"))

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _load_diffusion(path: str, dtype=None):
    """A converted model and its tokenizer; a clear error for a missing folder or a plain causal LM."""
    import json

    from transformers import AutoTokenizer

    from .model import DIFFUSION_CONFIG_NAME, DiffusionLM

    if os.path.isdir(os.path.expanduser(path)):
        path = os.path.expanduser(path)
        config_file = os.path.join(path, "config.json")
        is_full = False
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as handle:
                is_full = json.load(handle).get("model_type") == "diffusion_lm"
        if not is_full and not os.path.isfile(os.path.join(path, DIFFUSION_CONFIG_NAME)):
            raise CommandError(
                f"--model {path!r} is not a converted diffusion model (no {DIFFUSION_CONFIG_NAME}); convert it first: "
                f"peft-diffusion convert --model {path}"
            )
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(
            f"--model {path!r}: no such folder; pass the output folder of `peft-diffusion convert`."
        )
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = DiffusionLM.from_pretrained(path, **kwargs).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(model.config.base_model_name_or_path)
    return model, tokenizer


def generate(argv: list[str]) -> int:
    import torch

    (args,) = _parse(_parser((GenerateArguments,), "peft-diffusion generate"), argv)
    if (args.prompt is None) == (args.chat is None):
        raise CommandError("pass exactly one of --prompt TEXT or --chat MESSAGE.")
    if args.max_new_tokens < 1:
        raise CommandError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}.")
    model, tokenizer = _load_diffusion(args.model, _dtype(args.dtype))
    if args.chat is not None:
        input_ids = chat_input_ids(tokenizer, args.chat)
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    live = args.live and sys.stdout.isatty()
    streamer = LiveView(tokenizer, model.config.mask_token_id) if live else None
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        block_length=args.block_length,
        sampler=args.sampler,
        threshold=args.threshold if args.threshold else None,
        return_dict_in_generate=True,
        output_history=args.trajectory is not None,
    )
    if args.temperature > 0:
        settings.update(do_sample=True, temperature=args.temperature)
    generator = torch.Generator().manual_seed(args.seed)
    print(args.chat if args.chat is not None else args.prompt)
    start = time.perf_counter()
    out = model.generate(input_ids, streamer=streamer, generator=generator, **settings)
    seconds = time.perf_counter() - start
    new = out.sequences[0, input_ids.shape[1] :]
    count = answer_length(new, set(_as_list(tokenizer.eos_token_id)))
    if not live:
        print(tokenizer.decode(new[:count], skip_special_tokens=True).strip())
    print(f"[{count} tokens, {out.nfe} forwards, {count / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    if args.trajectory is not None:
        saved = save_trajectory(
            out.history,
            tokenizer,
            model.config.mask_token_id,
            args.trajectory,
            title=f"{count} tokens in {out.nfe} forwards",
            block_size=_grid(model),
            offset=input_ids.shape[1],
        )
        if saved:
            print(f"trajectory saved to {saved}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------------


def evaluate(argv: list[str]) -> int:
    import torch
    from tqdm.auto import tqdm

    from .defaults import load_text_dataset, stdlib_texts
    from .evaluation import ar_nll_per_token, nll_per_token

    (args,) = _parse(_parser((EvalArguments,), "peft-diffusion eval"), argv)
    if args.tasks:
        return _lm_eval(args)
    for name in ("num_texts", "mc_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.max_length < 2:
        raise CommandError(f"--max_length must be >= 2, got {args.max_length}.")
    model, tokenizer = _load_diffusion(args.model, _dtype(args.dtype))
    if args.dataset_name is None:
        # modules outside the default training sample (the first 100 of the same ranking)
        texts = stdlib_texts(num_files=args.num_texts, skip=ConvertArguments.stdlib_files)[: args.num_texts]
        source = "standard-library modules outside the default training sample"
    else:
        dataset = load_text_dataset(args.dataset_name, split=args.dataset_split, text_field=args.text_field)
        if args.text_field not in dataset.column_names:
            raise CommandError(f"--dataset {args.dataset_name!r} has no {args.text_field!r} column to score.")
        texts = list(dataset[args.text_field][: args.num_texts])
        source = args.dataset_name
    texts_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"scoring {len(texts)} texts ({sum(map(len, texts_ids))} tokens) from {source}, windows of {args.max_length}"
    )
    bounds = []
    for ids in tqdm(texts_ids, desc="diffusion ELBO", unit="text"):
        bounds.append(
            nll_per_token(
                model,
                [ids],
                prefix_token_id=prefix,
                max_length=args.max_length,
                mc_samples=args.mc_samples,
                batch_size=args.batch_size,
                generator=generator,
            )
        )
    tokens = sum(bound.num_tokens for bound in bounds)
    nll = sum(bound.nll * bound.num_tokens for bound in bounds) / tokens
    stderr = math.sqrt(sum((bound.stderr * bound.num_tokens) ** 2 for bound in bounds)) / tokens
    # the AR base: the same weights without the adapter, or the base checkpoint of a fully finetuned model
    if model.is_peft:
        with model.model.disable_adapter():
            ar = ar_nll_per_token(model.causal_lm, texts_ids, prefix, args.max_length)
    else:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model.config.base_model_name_or_path, dtype=model.dtype).eval()
        ar = ar_nll_per_token(base, texts_ids, prefix, args.max_length)
    print("| model | NLL per token (nats) | perplexity |\n|---|---|---|")
    print(f"| AR base (exact) | {ar:.3f} | {math.exp(ar):.2f} |")
    print(
        f"| diffusion (ELBO bound, {args.mc_samples} MC samples) | {nll:.3f} +- {stderr:.3f} | <= {math.exp(nll):.2f} |"
    )
    return 0


def _lm_eval(args) -> int:
    from .evaluation import _lm_eval_class

    lm_class = _lm_eval_class()  # ImportError with the install hint when lm-eval is missing
    import lm_eval

    model = lm_class(pretrained=args.model, mc_samples=args.mc_samples, batch_size=args.batch_size)
    results = lm_eval.simple_evaluate(model=model, tasks=args.tasks.split(","), limit=args.limit)
    from lm_eval.utils import make_table

    print(make_table(results))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

COMMANDS = {
    "convert": (convert, "convert a causal checkpoint into a diffusion LM (train + save + demo)"),
    "generate": (generate, "generate from a converted model, with a live view of the denoising"),
    "eval": (evaluate, "held-out NLL bound beside the AR base, or lm-eval tasks (--tasks)"),
}


def _usage() -> str:
    lines = ["usage: peft-diffusion {convert,generate,eval} [flags] [--config file.yaml] [--debug]", ""]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`peft-diffusion <command> --help` lists the flags of a command."]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Keep the terminal for our output: no library warnings or loading bars (the training bar stays; `--debug`
    shows everything)."""
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _one_line_error(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0, 1 for bad input or a failed run, 2 for unparsable flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"peft-diffusion: error: unknown command {command!r}; use one of {sorted(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        _quiet_libraries()
    try:
        return COMMANDS[command][0](rest)
    except UsageError as error:
        if debug:
            raise
        print(f"peft-diffusion {command}: error: {_one_line_error(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandError, ValueError, TypeError, FileNotFoundError, OSError, ImportError, KeyError) as error:
        if debug:
            raise
        print(f"peft-diffusion {command}: error: {_one_line_error(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\npeft-diffusion {command}: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """The `peft-diffusion` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
