"""(d) Infilling: fill the middle sentence of held-out stories, given the text before and after it.

The claim (DiffuGPT / DiffuLLaMA, arXiv 2410.17891, ROCStories column): an adapted diffusion LM fills a missing
middle sentence better (ROUGE-1/2/L against the gold sentence) than its AR base, which can only continue the prefix.

For each held-out story with at least three sentences, the middle sentence is the gap: the diffusion models get
`BOS + prefix + n mask tokens + suffix` (n = the gold middle's length in tokens, the suffix cut at 64 tokens) and fill
it with `model.infill` (greedy, one token per step, confidence order); the AR checkpoint gets `BOS + prefix` and
continues greedily for the same n tokens. ROUGE F-measures x 100 (`metrics.rouge_scores`, no stemmer)
against the gold middle. Diffusion models: the AR-init and random-init bidirectional models of (a) (300 steps, seed 0)
and the bidirectional and annealed models of (c) (150 steps).

    python benchmarks/replication/infilling.py
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import common
import torch
from ablations import arms

SUFFIX_TOKENS = 64


def infilling_items(stories: list[str], tokenizer, limit: int) -> list[dict]:
    """(prefix ids, middle ids, suffix ids) with the middle sentence as the gap, cut at token boundaries."""
    items = []
    for story in stories:
        story = " ".join(story.split())
        sentences = [match.start() for match in re.finditer(r"(?:^|(?<=[.!?\"]) )(?=[A-Z\"])", story)]
        if len(sentences) < 3:
            continue
        middle = len(sentences) // 2
        start, end = sentences[middle], sentences[middle + 1]
        encoded = tokenizer(story, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        # A token belongs to the middle when it starts inside [start, end) (its leading space included).
        first = next(i for i, (a, b) in enumerate(offsets) if b > start)
        last = next((i for i, (a, b) in enumerate(offsets) if b > end), len(ids))
        prefix, gap, suffix = ids[:first], ids[first:last], ids[last : last + SUFFIX_TOKENS]
        if not prefix or not suffix or not 4 <= len(gap) <= 48:
            continue
        items.append({"prefix": prefix, "middle": gap, "suffix": suffix})
        if len(items) == limit:
            break
    return items


@torch.no_grad()
def fill(model, items, tokenizer, *, diffusion: bool) -> list[str]:
    bos = tokenizer.bos_token_id
    outputs = []
    for item in items:
        n = len(item["middle"])
        if diffusion:
            mask = model.config.mask_token_id
            input_ids = torch.tensor([[bos] + item["prefix"] + [mask] * n + item["suffix"]])
            filled = model.infill(input_ids, steps=n)
            start = 1 + len(item["prefix"])
            outputs.append(tokenizer.decode(filled[0, start : start + n], skip_special_tokens=True))
        else:
            input_ids = torch.tensor([[bos] + item["prefix"]])
            out = model.generate(
                input_ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tokenizer.eos_token_id
            )
            outputs.append(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))
    return [text.strip() for text in outputs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=150, help="held-out stories to infill")
    parser.add_argument("--adaptation-steps", type=int, default=300, help="training steps of the (a) models")
    parser.add_argument("--ablation-steps", type=int, default=150, help="training steps of the (c) models")
    parser.add_argument("--cache", type=Path, default=common.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=common.DOCS_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    common.require_shared()
    common.set_threads(args.threads)
    from metrics import rouge_scores

    corpus = common.load_corpus(args.cache)
    tokenizer = common.load_tokenizer()
    models = args.cache / "models"
    adapted = arms(args.adaptation_steps)["bidir-shift-full"][1]
    ablation = arms(args.ablation_steps)
    diffusion_models = {
        f"diffusion, AR init, bidirectional ({args.adaptation_steps} steps)": adapted,
        f"diffusion, random init, bidirectional ({args.adaptation_steps} steps)": replace(
            adapted, name="random-bidir-shift-full", init="random"
        ),
        f"diffusion, AR init, bidirectional ({args.ablation_steps} steps)": ablation["bidir-shift-full"][1],
        f"diffusion, AR init, annealed ({args.ablation_steps} steps)": ablation["annealed-shift-full"][1],
    }
    sets = {
        "held-out sampled stories": infilling_items(corpus.heldout, tokenizer, args.limit),
        "real TinyStories": infilling_items(corpus.real, tokenizer, args.limit),
    }
    results = {}
    systems = {"AR checkpoint, prefix only (greedy)": (common.load_ar(), False)}
    for label, spec in diffusion_models.items():
        systems[label] = (common.get_trained(replace(spec, seed=0), corpus, models)[0], True)
    for set_name, items in sets.items():
        references = [tokenizer.decode(item["middle"], skip_special_tokens=True).strip() for item in items]
        for label, (model, diffusion) in systems.items():
            predictions = fill(model, items, tokenizer, diffusion=diffusion)
            scores = {key: 100 * value for key, value in rouge_scores(predictions, references).items()}
            results[f"{set_name}/{label}"] = scores | {
                "num_items": len(items),
                "examples": [
                    {"prefix": tokenizer.decode(item["prefix"])[-120:], "gold": gold, "prediction": prediction}
                    for item, gold, prediction in list(zip(items, references, predictions))[:3]
                ],
            }
            print(
                f"{set_name:26s} {label:40s} ROUGE-1/2/L {scores['rouge1']:.1f}/{scores['rouge2']:.1f}/"
                f"{scores['rougeL']:.1f} (n={len(items)})",
                flush=True,
            )
    common.save_json(args.out / "infilling.json", results)
    print("\nMiddle-sentence infilling, ROUGE F x 100 against the gold middle:")
    rows = []
    for key, entry in results.items():
        set_name, label = key.split("/", 1)
        rows.append(
            [
                set_name,
                entry["num_items"],
                label,
                f"{entry['rouge1']:.1f} / {entry['rouge2']:.1f} / {entry['rougeL']:.1f}",
            ]
        )
    common.print_table(["stories", "n", "system", "ROUGE-1 / 2 / L"], rows)


if __name__ == "__main__":
    main()
