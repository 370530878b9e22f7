"""(c) Ablations at the same budget: attention pattern, shift, masking policy, LoRA vs full.

Every arm converts stories260K from the AR checkpoint with the same stories, batches, steps and schedule; one setting
changes at a time against its reference arm. Reported: the Monte-Carlo ELBO NLL bound (`nll_per_token`) of the
final model on held-out sampled stories and on the five real TinyStories, and the trainer's eval bound at step 0 and
at the end. The bound is each model's own: block-attention models are scored block-autoregressively (each block given
the clean earlier ones), bidirectional models as one group, so a block model's bound is a different (tighter)
quantity of the same kind -- compare arms with the same attention for the other factors.

    python benchmarks/replication/ablations.py                  # 8 arms, one seed, 150 steps, ~40 min on 1 thread
    python benchmarks/replication/ablations.py --arms bidir-shift-full bidir-noshift-full
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import common
from common import RunSpec


def arms(max_steps: int) -> dict[str, tuple[str, RunSpec]]:
    """name -> (what changes, spec); all from the AR checkpoint at the same budget."""
    base = RunSpec(name="bidir-shift-full", max_steps=max_steps, eval_steps=max(max_steps // 6, 5))
    block = replace(base, name="block16-clean-shift-full", attention="block", block_size=16, clean_context=True)
    return {
        "bidir-shift-full": ("bidirectional, shift, uniform, full FT (reference)", base),
        "bidir-noshift-full": ("bidirectional, no shift", replace(base, name="bidir-noshift-full", shift=False)),
        "annealed-shift-full": (
            "annealed causal->bidirectional over the first half",
            replace(base, name="annealed-shift-full", attention="annealed", anneal_steps=max_steps // 2),
        ),
        "bidir-shift-lora16": (
            "LoRA r=16 (all linear) instead of full FT, lr 3e-3",
            replace(base, name="bidir-shift-lora16", lora_r=16, learning_rate=3e-3),
        ),
        "block16-clean-shift-full": ("block 16 + clean context, shift (block reference)", block),
        "block16-noclean-shift-full": (
            "block 16 without clean context",
            replace(block, name="block16-noclean-shift-full", clean_context=False),
        ),
        "block16-clean-noshift-full": (
            "block 16 + clean context, no shift (Efficient-DLM)",
            replace(block, name="block16-clean-noshift-full", shift=False),
        ),
        "block16-clean-shift-posdep": (
            "block 16 + clean context, position-dependent masking (strength 1)",
            replace(block, name="block16-clean-shift-posdep", masking="position_dependent", masking_strength=1.0),
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=None, help="subset of arm names (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--mc-samples", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=common.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=common.DOCS_DIR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true", help="train and save the arms, score nothing")
    args = parser.parse_args()
    common.require_shared()
    common.set_threads(args.threads)
    corpus = common.load_corpus(args.cache)
    models = args.cache / "models"
    selected = arms(args.max_steps)
    if args.arms:
        unknown = sorted(set(args.arms) - set(selected))
        if unknown:
            parser.error(f"unknown arms {unknown}; choose from {sorted(selected)}")
        selected = {name: selected[name] for name in args.arms}

    results = {}
    for name, (change, spec) in selected.items():
        runs = []
        for seed in args.seeds:
            model, payload = common.get_trained(replace(spec, seed=seed), corpus, models)
            if args.train_only:
                continue
            final = common.final_bounds(model, corpus, args.mc_samples)
            curve = payload["curve"]
            runs.append({"seed": seed, "curve": curve, "final": final, "train_seconds": payload["train_seconds"]})
        results[name] = {"change": change, "runs": runs}
    if args.train_only:
        return

    rows = []
    for name, entry in results.items():
        runs = entry["runs"]

        def mean(values):
            values = list(values)
            return sum(values) / len(values)

        rows.append(
            [
                name,
                entry["change"],
                mean(run["curve"][0]["eval_nll_bound"] for run in runs),
                mean(run["curve"][-1]["eval_nll_bound"] for run in runs),
                mean(run["final"]["heldout"]["nll"] for run in runs),
                mean(run["final"]["real"]["nll"] for run in runs),
                f"{mean(run['train_seconds'] for run in runs):.0f}",
            ]
        )
    print(f"\nAblations after {args.max_steps} steps x {RunSpec('x').tokens_per_step} tokens, seeds {args.seeds}:")
    common.print_table(
        ["arm", "change", "eval bound step 0", "eval bound end", "held-out NLL bound", "real NLL bound", "train s"],
        rows,
    )
    suffix = "" if args.arms is None else "_" + "_".join(sorted(selected))
    common.save_json(args.out / f"ablations{suffix}.json", results)
    if args.arms is None:
        plt = common.require_matplotlib()
        fig, ax = plt.subplots(figsize=(7.0, 4.4))
        for name, entry in results.items():
            run = entry["runs"][0]
            style = "-" if name.startswith("block") else "--"
            ax.plot(
                [point["tokens"] / 1e3 for point in run["curve"]],
                [point["eval_nll_bound"] for point in run["curve"]],
                style,
                marker="o",
                ms=3,
                label=name,
            )
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("held-out eval NLL bound (nats/token)")
        ax.set_title("stories260K ablations (dashed: bidirectional/annealed, solid: block)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / "ablations.png", dpi=120)
        print(f"wrote {args.out / 'ablations.png'}")


if __name__ == "__main__":
    main()
