"""`peft-diffusion eval`: the held-out NLL bound of a converted model beside its AR base, or lm-eval tasks.

peft-diffusion eval --model SmolLM2-135M-Instruct-diffusion
peft-diffusion eval --model out --tasks lambada_openai --limit 100
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..evaluation import ESTIMATORS
from ..sources import local_model_path
from .args import CommandError, build_parser, parse, torch_dtype
from .convert import ConvertArguments
from .generate import ALLOW_BASE_MISMATCH_HELP, load_converted


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
    estimator: str = field(
        default="elbo",
        metadata={
            "help": "elbo: the Monte-Carlo ELBO bound; left_to_right: the exact NLL of the model's one-token-per-step "
            "left-to-right sampler (deterministic, --mc_samples unused).",
            "choices": list(ESTIMATORS),
        },
    )
    tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated lm-eval tasks, run through lm-evaluation-harness instead."}
    )
    limit: int | None = field(default=None, metadata={"help": "Examples per lm-eval task."})
    dtype: str = field(
        default="float32", metadata={"help": "float32, bfloat16 or float16 (bfloat16 is slow on CPUs)."}
    )
    allow_base_mismatch: bool = field(default=False, metadata={"help": ALLOW_BASE_MISMATCH_HELP})


def evaluate(argv: list[str]) -> int:
    """Run `peft-diffusion eval` with `argv`: the diffusion NLL bound (`nll_per_token`) beside the AR base's exact NLL
    on the same windows (`ar_nll_per_token`), or lm-eval tasks with `--tasks`; returns the exit code."""
    import torch
    from tqdm.auto import tqdm

    from ..evaluation import ar_nll_per_token, nll_per_token
    from .defaults import load_text_dataset, stdlib_texts

    (args,) = parse(build_parser((EvalArguments,), "peft-diffusion eval"), argv)
    if args.tasks:
        return _lm_eval(args)
    for name in ("num_texts", "mc_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.max_length < 2:
        raise CommandError(f"--max_length must be >= 2, got {args.max_length}.")
    model, tokenizer = load_converted(args.model, torch_dtype(args.dtype), args.allow_base_mismatch)
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
    mask_token_id = model.config.mask_token_id
    for number, ids in enumerate(texts_ids, start=1):
        if mask_token_id in ids:
            raise CommandError(
                f"text {number} of {source} holds the mask token {model.config.mask_token!r} (id {mask_token_id}), "
                "which the model reads as a gap to fill, not as text to score; remove it from the text."
            )
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"scoring {len(texts)} texts ({sum(map(len, texts_ids))} tokens) from {source}, windows of {args.max_length}"
    )
    bounds = []
    ltr = args.estimator == "left_to_right"
    for ids in tqdm(texts_ids, desc="diffusion left-to-right NLL" if ltr else "diffusion ELBO", unit="text"):
        bounds.append(
            nll_per_token(
                model,
                [ids],
                prefix_token_id=prefix,
                max_length=args.max_length,
                mc_samples=args.mc_samples,
                batch_size=args.batch_size,
                generator=generator,
                estimator=args.estimator,
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

        base = AutoModelForCausalLM.from_pretrained(
            local_model_path(model.config.base_model_name_or_path), dtype=model.dtype
        ).eval()
        ar = ar_nll_per_token(base, texts_ids, prefix, args.max_length)
    print("| model | NLL per token (nats) | perplexity |\n|---|---|---|")
    print(f"| AR base (exact) | {ar:.3f} | {math.exp(ar):.2f} |")
    if ltr:
        print(f"| diffusion (left-to-right sampler, exact) | {nll:.3f} | {math.exp(nll):.2f} |")
    else:
        print(
            f"| diffusion (ELBO bound, {args.mc_samples} MC samples) | {nll:.3f} +- {stderr:.3f} "
            f"| <= {math.exp(nll):.2f} |"
        )
    return 0


def _lm_eval(args) -> int:
    """`--tasks`: lm-evaluation-harness on the converted model (the eval extra), its table printed."""
    import lm_eval

    from ..integrations.lm_eval import DiffusionLMEval  # ImportError with the install hint when lm-eval is missing

    model = DiffusionLMEval(
        pretrained=args.model, mc_samples=args.mc_samples, batch_size=args.batch_size, estimator=args.estimator
    )
    results = lm_eval.simple_evaluate(model=model, tasks=args.tasks.split(","), limit=args.limit)
    from lm_eval.utils import make_table

    print(make_table(results))
    return 0
