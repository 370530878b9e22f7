"""Evaluate a diffusion LM next to its AR base on local files: LAMBADA and HumanEval single-line infilling.

Prints one table: LAMBADA last-word accuracy (generation and ELBO-greedy), HumanEval single-line infilling pass@1,
the number of forward passes (NFE) and tokens/s, for the AR base model and the converted diffusion model.

- LAMBADA, generation: greedy continuation of the context, first word compared with the target (exact match).
- LAMBADA, likelihood: `loglikelihood(...).is_greedy`, one-step greedy decoding of the masked target (diffusion
  only; the AR base uses its causal greedy check).
- HumanEval infilling: the diffusion model fills a gap of the canonical middle's token length between prefix and
  suffix (bidirectional attention only); the AR base continues the prefix alone and keeps the first line, as the
  DiffuLLaMA protocol does for AR models.

Usage (offline, data in ../shared/data):

    python examples/evaluate.py --model ../shared/models/stories260K --limit 50
    python examples/evaluate.py --model <base> --adapter <diffusion folder> --limit 100 --device cuda

Without `--adapter`, the base is converted on the fly (untrained: a floor for the diffusion numbers).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_diffusion import DiffusionConfig, DiffusionLM, get_diffusion_model
from peft_diffusion.evaluation import loglikelihood

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# The papers' metrics are replication code, not library code: `benchmarks/replication/{metrics,humaneval}.py`.
sys.path.insert(0, str(ROOT / "benchmarks" / "replication"))
from humaneval import humaneval_infilling_program, pass_at_1  # noqa: E402
from metrics import exact_match, first_word, lambada_last_word  # noqa: E402


def load(path: Path, limit: int) -> list[dict] | None:
    if not path.exists():
        print(f"skipped: {path} is absent")
        return None
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(limit), handle)]


def window(model) -> int:
    """The model's context window (the base config's under a DiffusionLM)."""
    config = getattr(model.config, "base_config", None) or model.config
    return config.max_position_embeddings


def left_truncate(input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    return input_ids[:, -keep:] if input_ids.shape[1] > keep else input_ids


class Timer:
    """Accumulates forward passes, generated tokens and seconds."""

    def __init__(self):
        self.nfe, self.tokens, self.seconds = 0, 0, 0.0

    def row(self) -> tuple[str, str]:
        per_token = self.nfe / max(self.tokens, 1)
        return f"{per_token:.2f}", f"{self.tokens / max(self.seconds, 1e-9):.0f}"


@torch.no_grad()
def ar_generate(model, tokenizer, prompt: str, max_new_tokens: int, timer: Timer, device) -> str:
    input_ids = left_truncate(tokenizer(prompt, return_tensors="pt").input_ids, window(model) - max_new_tokens)
    input_ids = input_ids.to(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    timer.seconds += time.perf_counter() - start
    new = out.shape[1] - input_ids.shape[1]
    timer.nfe += new
    timer.tokens += new
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def diffusion_generate(model, tokenizer, prompt: str, max_new_tokens: int, timer: Timer, device) -> str:
    input_ids = left_truncate(tokenizer(prompt, return_tensors="pt").input_ids, window(model) - max_new_tokens)
    input_ids = input_ids.to(device)
    start = time.perf_counter()
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    timer.seconds += time.perf_counter() - start
    timer.nfe += out.nfe
    timer.tokens += max_new_tokens
    return tokenizer.decode(out.sequences[0, input_ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def diffusion_infill(model, tokenizer, prefix: str, suffix: str, length: int, timer: Timer, device) -> str:
    prefix_ids = tokenizer(prefix, return_tensors="pt").input_ids
    suffix_ids = tokenizer(suffix, add_special_tokens=False, return_tensors="pt").input_ids
    # the context window holds the gap, a quarter of it for the suffix (cut on the right), the rest for the prefix
    suffix_ids = suffix_ids[:, : (window(model) - length) // 4]
    prefix_ids = left_truncate(prefix_ids, window(model) - length - suffix_ids.shape[1])
    gap = torch.full((1, length), model.config.mask_token_id)
    input_ids = torch.cat([prefix_ids, gap, suffix_ids], dim=1).to(device)
    start = time.perf_counter()
    out = model.infill(input_ids, return_dict_in_generate=True)
    timer.seconds += time.perf_counter() - start
    timer.nfe += out.nfe
    timer.tokens += length
    middle = out.sequences[0, prefix_ids.shape[1] : prefix_ids.shape[1] + length]
    return tokenizer.decode(middle, skip_special_tokens=True)


def ar_greedy_hit(model, tokenizer, context: str, target: str, device) -> bool:
    whole = tokenizer(context + target, return_tensors="pt").input_ids
    num_context = tokenizer(context, return_tensors="pt").input_ids.shape[1]
    num_context -= max(0, whole.shape[1] - window(model))
    whole = left_truncate(whole, window(model)).to(device)
    with torch.no_grad():
        predicted = model(whole).logits[0, num_context - 1 : -1].argmax(-1)
    return bool((predicted == whole[0, num_context:]).all())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "stories260K"), help="AR base")
    parser.add_argument("--adapter", default=None, help="a DiffusionLM folder (adapter or full); else convert --model")
    parser.add_argument("--attention", default="bidirectional", help="attention of the on-the-fly conversion")
    parser.add_argument("--limit", type=int, default=50, help="examples per task")
    parser.add_argument("--mc-samples", type=int, default=8, help="Monte-Carlo samples of the likelihood")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated for LAMBADA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=str(DATA), help="folder with lambada_test.jsonl and HumanEval files")
    args = parser.parse_args()
    if not Path(args.model).exists() and args.adapter is None:
        print(f"skipped: the model {args.model} is absent")
        return
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.adapter or args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
    if args.adapter:
        diffusion = DiffusionLM.from_pretrained(args.adapter).to(args.device).eval()
    else:
        fresh = AutoModelForCausalLM.from_pretrained(args.model)
        config = DiffusionConfig(attention=args.attention)
        diffusion = get_diffusion_model(fresh, config, tokenizer=tokenizer).to(args.device).eval()
    rows = {"AR base": {}, "diffusion": {}}

    # LAMBADA
    lambada = load(Path(args.data) / "lambada_test.jsonl", args.limit)
    if lambada:
        timers = {"AR base": Timer(), "diffusion": Timer()}
        hits = {"AR base": [], "diffusion": [], "AR greedy": [], "ELBO greedy": []}
        generator = torch.Generator().manual_seed(0)
        for doc in lambada:
            context, target = lambada_last_word(doc["text"])
            ar = ar_generate(base, tokenizer, context, args.max_new_tokens, timers["AR base"], args.device)
            dlm = diffusion_generate(
                diffusion, tokenizer, context, args.max_new_tokens, timers["diffusion"], args.device
            )
            hits["AR base"].append(exact_match(first_word(ar), target.strip()))
            hits["diffusion"].append(exact_match(first_word(dlm), target.strip()))
            hits["AR greedy"].append(ar_greedy_hit(base, tokenizer, context, target, args.device))
            context_ids = tokenizer(context).input_ids
            target_ids = tokenizer(context + target).input_ids[len(context_ids) :]
            estimate = loglikelihood(
                diffusion, context_ids, target_ids, mc_samples=args.mc_samples, generator=generator
            )
            hits["ELBO greedy"].append(estimate.is_greedy)
        for name, greedy in (("AR base", "AR greedy"), ("diffusion", "ELBO greedy")):
            nfe, speed = timers[name].row()
            rows[name]["LAMBADA gen acc"] = f"{sum(hits[name]) / len(lambada):.3f}"
            rows[name]["LAMBADA greedy acc"] = f"{sum(hits[greedy]) / len(lambada):.3f}"
            rows[name]["LAMBADA NFE/token"] = nfe
            rows[name]["LAMBADA tok/s"] = speed

    # HumanEval single-line infilling
    problems = load(Path(args.data) / "HumanEval-SingleLineInfilling.jsonl.gz", args.limit)
    if problems:
        timers = {"AR base": Timer(), "diffusion": Timer()}
        programs = {"AR base": [], "diffusion": []}
        bidirectional = diffusion.config.attention in ("bidirectional", "annealed")
        for problem in problems:
            middle_ids = tokenizer(problem["canonical_solution"], add_special_tokens=False).input_ids
            length = max(len(middle_ids), 1)
            ar = ar_generate(base, tokenizer, problem["prompt"], length + 4, timers["AR base"], args.device)
            programs["AR base"].append(humaneval_infilling_program(problem, ar.split("\n")[0] + "\n"))
            if bidirectional:
                dlm = diffusion_infill(
                    diffusion,
                    tokenizer,
                    problem["prompt"],
                    problem["suffix"],
                    length,
                    timers["diffusion"],
                    args.device,
                )
                programs["diffusion"].append(humaneval_infilling_program(problem, dlm.split("\n")[0] + "\n"))
        for name in rows:
            if not programs[name]:
                rows[name]["HumanEval-SL pass@1"] = "n/a (infilling needs bidirectional attention)"
                continue
            score, _ = pass_at_1(programs[name], timeout=5.0)
            nfe, speed = timers[name].row()
            rows[name]["HumanEval-SL pass@1"] = f"{score:.3f}"
            rows[name]["HumanEval NFE/token"] = nfe
            rows[name]["HumanEval tok/s"] = speed

    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    print(f"model={args.model} adapter={args.adapter} limit={args.limit} device={args.device}")
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(row.get(column, "") for column in columns) + " |")


if __name__ == "__main__":
    main()
