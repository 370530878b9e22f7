"""Rows per minute of `self_distilled_dataset` on a real model, what the filters dropped, and sample rows.

Builds `--num-examples` rows with the library defaults (or the flags), uncached (`use_cache=False`), with
`--threads` torch threads, and prints the stats as JSON and the first `--show` rows.

    python benchmarks/self_distill.py --num-examples 64                  # SmolLM2-135M-Instruct (the default model)
    python benchmarks/self_distill.py --model ../shared/models/stories260K --num-examples 64 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_diffusion import DistillationStats, self_distilled_dataset
from peft_diffusion.cli.defaults import default_model_path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a causal LM folder (default: SmolLM2-135M-Instruct from the cache)")
    parser.add_argument("--num-examples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show", type=int, default=5, help="rows to print")
    parser.add_argument("--output", help="write the rows to this .jsonl file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    started = time.perf_counter()
    dataset = self_distilled_dataset(
        model,
        tokenizer,
        num_examples=args.num_examples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        use_cache=False,
    )
    elapsed = time.perf_counter() - started
    stats = DistillationStats.from_dataset(dataset)
    print(json.dumps({"model": path, "threads": args.threads, "wall_s": round(elapsed, 1), **asdict(stats)}, indent=1))
    for row in dataset.select(range(min(args.show, len(dataset)))):
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational
            prompt, completion = prompt[0]["content"], completion[0]["content"]
        print(f"\n### prompt\n{prompt}\n### completion\n{completion}")
    if args.output:
        dataset.to_json(args.output)


if __name__ == "__main__":
    main()
