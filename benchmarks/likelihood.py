"""Ranking with likelihoods: accuracy and standard error against the number of forwards, per estimator.

A two-choice task built from LAMBADA (first `--items` items of ../shared/data/lambada_test.jsonl): the passage
without its last word (its last `--context-tokens` tokens, to keep the CPU cost down), and two candidate endings,
the true last word and the last word of the next passage. An estimator ranks them by `log p(ending | passage)`; reported per estimator:
  - accuracy (the true word scored higher), and agreement with the base model's exact ranking;
  - the mean standard error of the score difference between the two endings (`sqrt(se_a^2 + se_b^2)`, Monte-Carlo),
    beside the mean absolute difference itself (the ranking is noise where the first is as large as the second);
  - forwards per scored ending (rows through the model, counted by a hook on the causal LM) and seconds.
Estimators: `peft_diffusion.loglikelihood_batch` with the Monte-Carlo ELBO at each of `--mc` samples and the
deterministic `left_to_right`, all on the converted model; the base causal LM's exact log-likelihood (adapter
disabled, one forward) as the reference.

    python benchmarks/likelihood.py --adapter runs/smollm2-distilled --items 100 --mc 4 8 32
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without an install

from conversion import lambada_items  # noqa: E402  (benchmarks/ is the script's folder)


def two_choice(tokenizer, limit: int, context_tokens: int) -> list[tuple[list[int], list[int], list[int]]]:
    """`(passage ids, true ending ids, other ending ids)`; the other ending is the next passage's last word (a
    different word); the passage keeps its last `context_tokens` tokens."""
    items = lambada_items(limit + 1)
    rows = []
    for index in range(limit):
        context, word = items[index]
        other = items[index + 1][1]
        if other.strip().lower() == word.strip().lower():
            continue
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        endings = []
        for ending in (word, other):
            whole = tokenizer(context + ending, add_special_tokens=False).input_ids
            endings.append(whole[len(context_ids) :] if whole[: len(context_ids)] == context_ids else None)
        if None in endings or not all(endings):
            continue  # the ending changes how the passage tokenizes: not a clean pair
        rows.append((context_ids[-context_tokens:], endings[0], endings[1]))
    return rows


class RowCounter:
    """Rows through a module's forward (the batch dimension of `input_ids` or `inputs_embeds`)."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        tensor = kwargs.get("input_ids")
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
        if tensor is None and args:
            tensor = args[0]
        self.rows += tensor.shape[0]


@torch.no_grad()
def base_scores(causal_lm, rows) -> list[tuple[float, float]]:
    scores = []
    for context_ids, *endings in rows:
        pair = []
        for ending in endings:
            ids = torch.tensor([context_ids + ending])
            logprobs = causal_lm(input_ids=ids).logits[0].float().log_softmax(-1)  # [L, V]
            targets = torch.tensor(ending)
            positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
            pair.append(logprobs[positions, targets].sum().item())
        scores.append(tuple(pair))
    return scores


def summarize(name: str, scores, stderrs, base, rows: int, seconds: float, endings: int) -> dict:
    differences = [a - b for a, b in scores]
    spread = [math.sqrt(sa**2 + sb**2) for sa, sb in stderrs]
    return {
        "estimator": name,
        "accuracy": sum(d > 0 for d in differences) / len(differences),
        "agrees_with_base": sum((d > 0) == (a - b > 0) for d, (a, b) in zip(differences, base)) / len(differences),
        "mean_abs_difference": sum(abs(d) for d in differences) / len(differences),
        "mean_difference_stderr": sum(spread) / len(spread),
        "forwards_per_ending": rows / endings,
        "seconds": seconds,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="the base causal LM; default: the CLI's SmolLM2 folder")
    parser.add_argument("--adapter", required=True, help="a saved diffusion adapter (e.g. `convert`'s output)")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--mc", type=int, nargs="+", default=[4, 8, 32], help="Monte-Carlo samples to compare")
    parser.add_argument("--context-tokens", type=int, default=64, help="passage tokens kept before the ending")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_diffusion import DiffusionLM
    from peft_diffusion.evaluation import loglikelihood_batch
    from peft_diffusion.sources import local_model_path

    if args.model is None:
        from peft_diffusion.sources import DEFAULT_MODEL_NAME

        args.model = local_model_path(DEFAULT_MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    base = AutoModelForCausalLM.from_pretrained(args.model)
    model = DiffusionLM.from_pretrained(args.adapter, base_model=base).eval()
    rows = two_choice(tokenizer, args.items, args.context_tokens)
    endings = 2 * len(rows)
    counter = RowCounter(model.causal_lm)
    results = []

    start, counter.rows = time.perf_counter(), 0
    with model.model.disable_adapter():
        base = base_scores(model.causal_lm, rows)
    results.append(
        summarize(
            "base exact (AR)", base, [(0.0, 0.0)] * len(base), base, counter.rows, time.perf_counter() - start, endings
        )  # fmt: skip
    )
    requests = [(context, ending) for context, *pair in rows for ending in pair]
    settings = [("left_to_right", {"estimator": "left_to_right"})]
    settings += [(f"elbo mc={k}", {"estimator": "elbo", "mc_samples": k}) for k in args.mc]
    for name, kwargs in settings:
        start, counter.rows = time.perf_counter(), 0
        estimates = loglikelihood_batch(
            model,
            requests,
            batch_size=args.batch_size,
            generator=torch.Generator().manual_seed(args.seed),
            progress=True,
            **kwargs,
        )
        seconds = time.perf_counter() - start
        scores = [(estimates[2 * i].logprob, estimates[2 * i + 1].logprob) for i in range(len(rows))]
        stderrs = [(estimates[2 * i].stderr, estimates[2 * i + 1].stderr) for i in range(len(rows))]
        results.append(summarize(name, scores, stderrs, base, counter.rows, seconds, endings))
        print(f"  {name}: done in {seconds:.0f}s", flush=True)

    print(
        f"\n{len(rows)} two-choice LAMBADA items (last {args.context_tokens} passage tokens), model {args.model}, "
        f"adapter {args.adapter}, {args.threads} thread(s), torch {torch.__version__}"
    )
    print("| estimator | accuracy | agrees with base | mean abs diff | mean stderr of diff | forwards/ending | s |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['estimator']} | {row['accuracy']:.2f} | {row['agrees_with_base']:.2f} "
            f"| {row['mean_abs_difference']:.2f} | {row['mean_difference_stderr']:.2f} "
            f"| {row['forwards_per_ending']:.1f} | {row['seconds']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"items": len(rows), "rows": results}, indent=2))


if __name__ == "__main__":
    main()
