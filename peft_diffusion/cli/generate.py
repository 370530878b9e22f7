"""`peft-diffusion generate`: decode from a converted model, with a live view of the denoising in a terminal.

peft-diffusion generate --model SmolLM2-135M-Instruct-diffusion --chat "What is the capital of France?"
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..sources import local_model_path
from .args import CommandError, build_parser, decoding_threshold, parse, threshold_field, torch_dtype
from .demo import answer_length, chat_input_ids
from .live import LiveView, id_list, save_trajectory

ALLOW_BASE_MISMATCH_HELP = (
    "Load an adapter onto a base model other than the one it was trained on (its recorded fingerprint differs)."
)


@dataclass
class GenerateArguments:
    """What `generate` reads (the decoding fields are those of `DiffusionGenerationConfig`)."""

    model: str = field(metadata={"help": "A converted model folder (adapter or full) or Hub id."})
    prompt: str | None = field(default=None, metadata={"help": "Text to continue."})
    chat: str | None = field(default=None, metadata={"help": "A user message, formatted with the chat template."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate."})
    steps: int | None = field(default=None, metadata={"help": "Denoising steps in total (default max_new_tokens)."})
    block_length: int | None = field(default=None, metadata={"help": "Tokens per block (default: the model's)."})
    sampler: str | None = field(
        default=None,
        metadata={
            "help": "Which masked positions a step commits first (`samplers.py`). Default: the one saved with the "
            "model (`prefix` for a model `convert` made), else `confidence`."
        },
    )
    threshold: float | None = threshold_field(0.9)
    temperature: float = field(default=0.0, metadata={"help": "0 is greedy."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling."})
    live: bool = field(default=True, metadata={"help": "Show the denoising live when stdout is a terminal."})
    trajectory: str | None = field(default=None, metadata={"help": "Save a PNG of the denoising trajectory here."})
    dtype: str = field(
        default="float32", metadata={"help": "float32, bfloat16 or float16 (bfloat16 is slow on CPUs)."}
    )
    allow_base_mismatch: bool = field(default=False, metadata={"help": ALLOW_BASE_MISMATCH_HELP})
    speculative: bool = field(
        default=False,
        metadata={
            "help": "Lossless self-speculative decoding: the adapter drafts a block, the base (adapter off) verifies "
            "it, and the text is exactly the base's; --steps is then per draft (default 1)."
        },
    )
    tree_size: int | None = field(
        default=None,
        metadata={
            "help": "With --speculative and greedy decoding: verify a draft tree of this many tokens per round (the "
            "chain draft, then the drafter's next most likely paths), e.g. 16 for block 4."
        },
    )


def load_converted(path: str, dtype=None, allow_base_mismatch: bool = False):
    """A converted model and its tokenizer; one-line errors for a missing folder, a plain causal LM, missing or
    truncated weight files, a Hub id that cannot be loaded now, and an adapter given another base."""
    from transformers import AutoTokenizer

    from ..model import DIFFUSION_CONFIG_NAME, DiffusionLM
    from .defaults import check_weight_files, hub_model

    if os.path.isdir(os.path.expanduser(path)):
        path = os.path.expanduser(path)
        config_file = os.path.join(path, "config.json")
        is_full = False
        if os.path.isfile(config_file):
            is_full = _read_json(config_file).get("model_type") == "diffusion_lm"
        if not is_full and not os.path.isfile(os.path.join(path, DIFFUSION_CONFIG_NAME)):
            raise CommandError(
                f"--model {path!r} is not a converted diffusion model (no {DIFFUSION_CONFIG_NAME}); convert it first: "
                f"peft-diffusion convert --model {path}"
            )
        weights = ("model*.safetensors", "pytorch_model*.bin") if is_full else ("adapter_model.*",)
        if not any(any(Path(path).glob(pattern)) for pattern in weights):
            raise CommandError(
                f"--model {path!r} has no {'model' if is_full else 'adapter'} weights ({' or '.join(weights)}); the "
                "save was interrupted or the files were moved: convert again."
            )
        check_weight_files(path)
        if not is_full:  # the adapter's base, when it is a local folder
            base = _read_json(os.path.join(path, DIFFUSION_CONFIG_NAME)).get("base_model_name_or_path")
            if isinstance(base, str) and os.path.isdir(os.path.expanduser(base)):
                check_weight_files(os.path.expanduser(base), flag=f"the base model of --model {path!r},")
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(
            f"--model {path!r}: no such folder; pass the output folder of `peft-diffusion convert`."
        )
    else:
        hub_model(path, files=("config.json", "adapter_config.json"))
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        model = DiffusionLM.from_pretrained(path, allow_base_mismatch=allow_base_mismatch, **kwargs).eval()
    except ValueError as error:
        # the library names its keyword; on the command line it is a flag
        raise CommandError(str(error).replace("`allow_base_mismatch=True`", "--allow_base_mismatch")) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(local_model_path(model.config.base_model_name_or_path))
    return model, tokenizer


def _read_json(path: str) -> dict:
    """A JSON object from `path`; `CommandError` naming the file when it is not one."""
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise CommandError(f"{path} is not valid JSON ({error}); save the model again.") from error
    if not isinstance(content, dict):
        raise CommandError(f"{path} holds no JSON object; save the model again.")
    return content


def generate(argv: list[str]) -> int:
    """Run `peft-diffusion generate` with `argv`: one prompt or chat message, decoded live in a terminal (plain text
    otherwise), NFE and tokens/s on stderr, the trajectory PNG with `--trajectory`; returns the exit code."""
    import torch

    (args,) = parse(build_parser((GenerateArguments,), "peft-diffusion generate"), argv)
    if (args.prompt is None) == (args.chat is None):
        raise CommandError("pass exactly one of --prompt TEXT or --chat MESSAGE.")
    if args.max_new_tokens < 1:
        raise CommandError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}.")
    model, tokenizer = load_converted(args.model, torch_dtype(args.dtype), args.allow_base_mismatch)
    if args.chat is not None:
        input_ids = chat_input_ids(tokenizer, args.chat)
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if args.tree_size is not None and not args.speculative:
        raise CommandError("--tree_size sizes the draft trees of speculative decoding; add --speculative true.")
    if args.speculative and args.trajectory is not None:
        raise CommandError("--trajectory shows the denoising of plain decoding; drop it or --speculative.")
    live = args.live and sys.stdout.isatty() and not args.speculative
    streamer = LiveView(tokenizer, model.config.mask_token_id) if live else None
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        block_length=args.block_length,
        threshold=decoding_threshold(args.threshold),
        return_dict_in_generate=True,
    )
    if args.sampler is not None:  # else the model's generation config decides
        settings["sampler"] = args.sampler
    if args.speculative:
        settings["speculative"] = True
        if args.tree_size is not None:
            settings["tree_size"] = args.tree_size
        if args.temperature > 0:
            settings["threshold"] = None  # sampled drafts commit left to right (speculation.py)
    else:
        settings["output_history"] = args.trajectory is not None
    if args.temperature > 0:
        settings.update(do_sample=True, temperature=args.temperature)
    generator = torch.Generator().manual_seed(args.seed)
    print(args.chat if args.chat is not None else args.prompt)
    start = time.perf_counter()
    out = model.generate(input_ids, streamer=streamer, generator=generator, **settings)
    seconds = time.perf_counter() - start
    new = out.sequences[0, input_ids.shape[1] :]
    count = answer_length(new, set(id_list(tokenizer.eos_token_id)))
    if not live:
        print(tokenizer.decode(new[:count], skip_special_tokens=True).strip())
    speed = f"{count} tokens, {out.nfe} forwards, {count / max(seconds, 1e-9):.1f} tokens/s"
    if args.speculative:
        speed += f", {out.base_forwards} base verifications"
    print(f"[{speed}]", file=sys.stderr)
    if args.trajectory is not None:
        saved = save_trajectory(
            out.history,
            tokenizer,
            model.config.mask_token_id,
            args.trajectory,
            title=f"{count} tokens in {out.nfe} forwards",
            block_size=model.config.attention_block_size,
            offset=input_ids.shape[1],
        )
        if saved:
            print(f"trajectory saved to {saved}", file=sys.stderr)
    return 0
