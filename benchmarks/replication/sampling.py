"""(b) Sample quality vs denoising steps T, and tokens per forward vs quality under threshold decoding.

The claims: DiffuGPT (arXiv 2410.17891, the unconditional-generation figure) -- generative perplexity of diffusion
samples falls as the number of denoising steps T grows, with Distinct-2 staying high, and decoding cost scales with T;
Fast-dLLM / Efficient-DLM -- committing every position above a confidence threshold decodes several tokens per forward
at little quality cost.

1. T sweep: the AR-initialised bidirectional model of (a) (`bidir-shift-full`, seed 0) writes 128 tokens, unconditionally
   (from BOS) and after 16-token prompts from held-out stories, with T in {8, 16, 32, 64, 128} steps (one block, LLaDA
   style), sampling at temperature 1 with two unmasking orders: `random` (the ancestral MDLM/D3PM order) and
   `confidence` (LLaDA's low-confidence remasking). Generative perplexity is measured under the AR stories260K
   checkpoint (`peft_diffusion.metrics.generative_perplexity`, prompt included), Distinct-2 over whitespace words.
   References: the AR checkpoint's own samples (temperature 1, same prompts) and the held-out stories themselves.
2. Threshold sweep: greedy decoding of the block model of (c) (`block16-clean-shift-full`, 150 steps, exact KV
   cache, 16-token blocks) and of the bidirectional model of (a) (32-token blocks) with Fast-dLLM thresholds; one prompt at a time, so the number of
   forwards (NFE) is per sample. Tokens per forward = generated tokens (up to EOS) / NFE. Reference: AR greedy.

    python benchmarks/replication/sampling.py          # needs the two models of adaptation.py / ablations.py
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import common
import torch
from ablations import arms

STEPS = (8, 16, 32, 64, 128)
THRESHOLDS = (None, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)
NEW_TOKENS = 128
PROMPT_TOKENS = 16


def prompts_of(corpus, tokenizer, count: int) -> list[list[int]]:
    """BOS + the first `PROMPT_TOKENS - 1` tokens of held-out stories."""
    rows = []
    for story in corpus.heldout:
        ids = tokenizer(story, add_special_tokens=False)["input_ids"]
        if len(ids) >= PROMPT_TOKENS + 8:
            rows.append([tokenizer.bos_token_id] + ids[: PROMPT_TOKENS - 1])
        if len(rows) == count:
            break
    return rows


def decode(tokenizer, sequences: torch.Tensor) -> list[str]:
    return [text.strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)]


def quality(texts: list[str], ar, tokenizer) -> dict:
    from metrics import distinct_n

    from peft_diffusion.metrics import generative_perplexity

    return {
        "gen_ppl": generative_perplexity(texts, ar, tokenizer, batch_size=32),
        "distinct2": distinct_n(texts, 2),
        "mean_words": sum(len(text.split()) for text in texts) / len(texts),
    }


def t_sweep(model, ar, tokenizer, prompts: list[list[int]], num_samples: int, seed: int) -> dict:
    results = {}
    conditions = {
        "unconditional": torch.full((num_samples, 1), tokenizer.bos_token_id),
        "prompted": torch.tensor(prompts[:num_samples]),
    }
    for condition, input_ids in conditions.items():
        for sampler in ("random", "confidence"):
            for steps in STEPS:
                started = time.time()
                out = model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=NEW_TOKENS,
                    steps=steps,
                    sampler=sampler,
                    do_sample=True,
                    temperature=1.0,
                    generator=torch.Generator().manual_seed(seed),
                    return_dict_in_generate=True,
                )
                texts = decode(tokenizer, out.sequences)
                entry = quality(texts, ar, tokenizer) | {"nfe": out.nfe, "seconds": time.time() - started}
                results[f"{condition}/{sampler}/{steps}"] = entry | {"example": texts[0][:300]}
                print(
                    f"{condition:13s} {sampler:10s} T={steps:3d}: gen PPL {entry['gen_ppl']:7.2f} "
                    f"Distinct-2 {entry['distinct2']:.3f} NFE {out.nfe}",
                    flush=True,
                )
        torch.manual_seed(seed)
        out = ar.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=tokenizer.eos_token_id,
        )
        texts = decode(tokenizer, out)
        results[f"{condition}/ar/{NEW_TOKENS}"] = quality(texts, ar, tokenizer) | {"example": texts[0][:300]}
        print(f"{condition:13s} AR samples (T=1): gen PPL {results[f'{condition}/ar/{NEW_TOKENS}']['gen_ppl']:.2f}")
    return results


def threshold_sweep(models: dict, ar, tokenizer, prompts: list[list[int]]) -> dict:
    results = {}
    eos = tokenizer.eos_token_id
    for label, (model, block_length) in models.items():
        for threshold in THRESHOLDS:
            texts, tokens, nfes = [], 0, 0
            for prompt in prompts:
                input_ids = torch.tensor([prompt])
                out = model.generate(
                    input_ids,
                    max_new_tokens=NEW_TOKENS,
                    block_length=block_length,
                    steps=NEW_TOKENS,
                    threshold=threshold,
                    return_dict_in_generate=True,
                )
                new = out.sequences[0, len(prompt) :].tolist()
                tokens += new.index(eos) + 1 if eos in new else len(new)
                nfes += out.nfe
                texts += decode(tokenizer, out.sequences)
            entry = quality(texts, ar, tokenizer) | {"tokens_per_forward": tokens / nfes, "nfe": nfes / len(prompts)}
            results[f"{label}/{threshold}"] = entry
            print(
                f"{label:24s} threshold {threshold!s:5s}: tokens/forward {entry['tokens_per_forward']:.2f} "
                f"gen PPL {entry['gen_ppl']:.2f} Distinct-2 {entry['distinct2']:.3f}",
                flush=True,
            )
    texts = []
    for prompt in prompts:
        out = ar.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.eos_token_id
        )
        texts += decode(tokenizer, out)
    results["ar/greedy"] = quality(texts, ar, tokenizer) | {"tokens_per_forward": 1.0}
    print(
        f"AR greedy: gen PPL {results['ar/greedy']['gen_ppl']:.2f} Distinct-2 {results['ar/greedy']['distinct2']:.3f}"
    )
    return results


def report(results: dict, out: Path, plt) -> None:
    """Print the two tables and draw the two plots from the results of `main` (or `sampling.json`)."""
    reference, sweep, thresholds = results["heldout_text"], results["t_sweep"], results["threshold_sweep"]

    print("\nGenerative perplexity (under the AR checkpoint) and Distinct-2 vs denoising steps T, 128 new tokens:")
    rows = []
    for condition in ("unconditional", "prompted"):
        for sampler in ("random", "confidence"):
            for steps in STEPS:
                entry = sweep[f"{condition}/{sampler}/{steps}"]
                rows.append([condition, f"diffusion, {sampler}", steps, entry["gen_ppl"], entry["distinct2"]])
        entry = sweep[f"{condition}/ar/{NEW_TOKENS}"]
        rows.append(
            [
                condition,
                "AR samples (reference)",
                f"{NEW_TOKENS} (1 token/forward)",
                entry["gen_ppl"],
                entry["distinct2"],
            ]
        )
    rows.append(["-", "held-out stories (data)", "-", reference["gen_ppl"], reference["distinct2"]])
    common.print_table(["condition", "sampler", "T", "gen PPL", "Distinct-2"], rows)
    print("\nThreshold decoding (greedy, prompted, 128 new tokens, one prompt at a time):")
    rows = [
        [key.rsplit("/", 1)[0], key.rsplit("/", 1)[1], e["tokens_per_forward"], e["gen_ppl"], e["distinct2"]]
        for key, e in thresholds.items()
    ]
    common.print_table(["model", "threshold", "tokens/forward", "gen PPL", "Distinct-2"], rows)

    # plots
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), sharex=True)
    for column, condition in enumerate(("unconditional", "prompted")):
        for sampler, color in (("random", "tab:blue"), ("confidence", "tab:green")):
            entries = [sweep[f"{condition}/{sampler}/{steps}"] for steps in STEPS]
            axes[0, column].plot(
                STEPS, [e["gen_ppl"] for e in entries], "o-", color=color, label=f"diffusion, {sampler}"
            )
            axes[1, column].plot(STEPS, [e["distinct2"] for e in entries], "o-", color=color)
        ar_entry = sweep[f"{condition}/ar/{NEW_TOKENS}"]
        for row, key in ((0, "gen_ppl"), (1, "distinct2")):
            axes[row, column].axhline(
                ar_entry[key], color="black", ls="--", lw=1, label="AR samples" if row == 0 else None
            )
            axes[row, column].axhline(
                reference[key], color="gray", ls=":", lw=1, label="held-out text" if row == 0 else None
            )
        axes[0, column].set_title(f"{condition}, 128 tokens")
        axes[1, column].set_xlabel("denoising steps T")
        axes[1, column].set_xscale("log", base=2)
        axes[0, column].set_yscale("log")
    axes[0, 0].set_ylabel("generative PPL (AR stories260K)")
    axes[1, 0].set_ylabel("Distinct-2")
    axes[0, 0].legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sampling_steps.png", dpi=120)
    print(f"wrote {out / 'sampling_steps.png'}")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, color in (("block16 (KV cache)", "tab:purple"), ("bidirectional (blocks of 32)", "tab:blue")):
        xs, ys = [], []
        for threshold in THRESHOLDS:
            entry = thresholds[f"{label}/{threshold}"]
            xs.append(entry["tokens_per_forward"])
            ys.append(entry["gen_ppl"])
            ax.annotate(
                "1/step" if threshold is None else str(threshold),
                (xs[-1], ys[-1]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
        ax.plot(xs, ys, "o-", color=color, label=label)
    ax.plot([1.0], [thresholds["ar/greedy"]["gen_ppl"]], "k*", ms=10, label="AR greedy")
    ax.set_yscale("log")
    ax.set_xlabel("generated tokens per forward pass")
    ax.set_ylabel("generative PPL (AR stories260K)")
    ax.set_title("threshold decoding, greedy, prompted (labels: threshold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sampling_threshold.png", dpi=120)
    print(f"wrote {out / 'sampling_threshold.png'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts of the threshold sweep")
    parser.add_argument("--adaptation-steps", type=int, default=300, help="training steps of the (a) models")
    parser.add_argument("--ablation-steps", type=int, default=150, help="training steps of the (c) models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=common.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=common.DOCS_DIR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot-only", action="store_true", help="redraw tables and plots from <out>/sampling.json")
    args = parser.parse_args()
    plt = common.require_matplotlib()
    if args.plot_only:
        report(json.loads((args.out / "sampling.json").read_text()), args.out, plt)
        return
    common.require_shared()
    common.set_threads(args.threads)
    corpus = common.load_corpus(args.cache)
    tokenizer = common.load_tokenizer()
    ar = common.load_ar()
    models = args.cache / "models"
    bidir_spec = arms(args.adaptation_steps)["bidir-shift-full"][1]
    bidir, _ = common.get_trained(replace(bidir_spec, seed=0), corpus, models)
    block_spec = arms(args.ablation_steps)["block16-clean-shift-full"][1]
    block, _ = common.get_trained(replace(block_spec, seed=0), corpus, models)
    prompts = prompts_of(corpus, tokenizer, max(args.num_samples, args.num_prompts))

    reference = quality([" ".join(story.split()[:100]) for story in corpus.heldout], ar, tokenizer)
    print(
        f"held-out stories (first 100 words): gen PPL {reference['gen_ppl']:.2f} Distinct-2 {reference['distinct2']:.3f}"
    )
    sweep = t_sweep(bidir, ar, tokenizer, prompts, args.num_samples, args.seed)
    thresholds = threshold_sweep(
        {"block16 (KV cache)": (block, 16), "bidirectional (blocks of 32)": (bidir, 32)},
        ar,
        tokenizer,
        prompts[: args.num_prompts],
    )
    results = {"heldout_text": reference, "t_sweep": sweep, "threshold_sweep": thresholds}
    common.save_json(args.out / "sampling.json", results)
    report(results, args.out, plt)


if __name__ == "__main__":
    main()
