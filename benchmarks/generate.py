"""Decoding speed and quality: our `generate` against the base causal LM's HF `generate` (KV cache), one process.

Methods, for each batch size:
  - `ar`: the base causal LM's `generate` with its KV cache, greedy, one token per forward (the baseline);
  - `cached+threshold`: our `generate` with the exact block KV cache and Fast-dLLM's confidence threshold;
  - `cached`: the same with a fixed number of steps (`--steps`, default one token per step) and no threshold;
  - `uncached+threshold`: the whole canvas every step (the reference the cache is exact against).
Rounds alternate between the methods and each keeps its best time (the machine is shared). Reported: tokens/s, the
ratio to `ar`, the number of model forwards (NFE) and the tokens per forward.

Two ways to count tokens: by default every row produces exactly `--max-new-tokens` tokens (EOS ignored: AR with
`min_new_tokens`, diffusion with `eos_token_id=[]`); with `--stop-at-eos` both stop at EOS and tokens/s counts the
tokens up to and including each row's first EOS (what a user gets; the right setting for a trained model, whose
output after EOS is padding).

`--adapter` loads a trained diffusion adapter (e.g. the `peft-diffusion convert` output) on `--model`; LoRA is merged
for timing (`--no-merge` keeps it separate). Without `--adapter` the base is converted untrained (block attention,
`--block-size`): an untrained conversion is never confident, so its threshold commits one token per forward and the
figures measure the loop and the cache only. `--quality` also decodes each prompt alone (batch 1) with EOS, AR and
threshold decoding at each of `--quality-thresholds`, timed over all prompts (the batch-1 target on varied answers),
and prints the answers and their generative perplexity under the AR base (`metrics.generative_perplexity`).

    python benchmarks/generate.py                                           # tiny random llama, CPU
    python benchmarks/generate.py --model ../shared/models/stories260K --block-size 8
    python benchmarks/generate.py --model ~/.cache/peft_diffusion/SmolLM2-135M-Instruct \\
        --adapter /work/runs/quickstart --batch-sizes 1 --stop-at-eos --quality
    python benchmarks/generate.py --model Qwen/Qwen2.5-0.5B --device cuda --dtype bfloat16 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from peft_diffusion import DiffusionConfig, DiffusionLM, get_diffusion_model
from peft_diffusion.metrics import generative_perplexity

STORY_PROMPTS = ["Once upon a time", "Lily and her dog went to the park", "The sun was", "Tom had a red ball and"]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
    "Explain what a list comprehension is in Python.",
    "Name three colors of the rainbow.",
    "What does the `len` function do in Python?",
    "Write a short sentence about the ocean.",
    "How do I open a file for reading in Python?",
]
METHODS = ("ar", "cached+threshold", "cached", "uncached+threshold")


def build(args):
    """(AR base causal LM, diffusion LM, tokenizer or None): two copies of the weights, the AR one untouched."""
    dtype = getattr(torch, args.dtype)
    if not args.model:
        config = LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8
        )
        config._attn_implementation = args.attn
        torch.manual_seed(0)
        ar = AutoModelForCausalLM.from_config(config, dtype=dtype)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
        diffusion_config = DiffusionConfig(attention="block", block_size=args.block_size, mask_token_id=4095)
        model = get_diffusion_model(base, diffusion_config)
        tokenizer = None
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.adapter or args.model)
        ar = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
        if args.adapter:
            model = DiffusionLM.from_pretrained(args.adapter, base_model=base)
            if args.merge and model.is_peft:
                model.model = model.model.merge_and_unload()
                model._is_causal_modules = None
        else:
            diffusion_config = DiffusionConfig(attention="block", block_size=args.block_size, shift=True)
            model = get_diffusion_model(base, diffusion_config, tokenizer=tokenizer)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return ar.to(args.device).eval(), model.to(args.device).eval(), tokenizer


def prompt_texts(tokenizer, count: int) -> list[str]:
    if tokenizer is not None and tokenizer.chat_template:
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": CHAT_PROMPTS[index % len(CHAT_PROMPTS)]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for index in range(count)
        ]
    return [STORY_PROMPTS[index % len(STORY_PROMPTS)] for index in range(count)]


def make_batch(tokenizer, texts: list[str], device: str) -> dict:
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, 4000, (len(texts), 12), generator=generator)
        return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {key: value.to(device) for key, value in encoded.items()}


def runners(ar, model, batch: dict, args, pad_id: int, eos: list[int]) -> dict:
    """The timed calls, by name; each returns (sequences, nfe)."""
    new = args.max_new_tokens
    stop = dict(eos_token_id=eos) if args.stop_at_eos else dict(eos_token_id=[])
    diffusion = dict(
        max_new_tokens=new, steps=args.steps or new, block_length=args.block_length, return_dict_in_generate=True
    )

    def ar_run():
        limits = {} if args.stop_at_eos else {"min_new_tokens": new}
        sequences = ar.generate(
            **batch, max_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=pad_id, **limits, **stop
        )
        return sequences, sequences.shape[1] - batch["input_ids"].shape[1]

    def diffusion_run(threshold, use_cache):
        def run():
            out = model.generate(**batch, threshold=threshold, use_cache=use_cache, **diffusion, **stop)
            return out.sequences, out.nfe

        return run

    table = {
        "ar": ar_run,
        "cached+threshold": diffusion_run(args.threshold, True),
        "cached": diffusion_run(None, True),
        "uncached+threshold": diffusion_run(args.threshold, False),
    }
    return {name: table[name] for name in args.methods}


def count_new_tokens(sequences: torch.Tensor, prompt_width: int, eos: list[int], stop_at_eos: bool) -> int:
    """Tokens each row produced (up to and including its first EOS with `stop_at_eos`), summed over rows."""
    new = sequences[:, prompt_width:]
    if not stop_at_eos or not eos:
        return new.numel()
    is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, new.shape[1])
    return int(first.sum())


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speed(ar, model, tokenizer, args, pad_id: int, eos: list[int]) -> list[dict]:
    rows = []
    for batch_size in args.batch_sizes:
        batch = make_batch(tokenizer, prompt_texts(tokenizer, batch_size), args.device)
        runs = runners(ar, model, batch, args, pad_id, eos)
        results = {name: run() for name, run in runs.items()}  # warm-up, and the outputs
        best = {name: float("inf") for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                synchronize(args.device)
                start = time.perf_counter()
                run()
                synchronize(args.device)
                best[name] = min(best[name], time.perf_counter() - start)
        baseline = None
        for name in runs:
            sequences, nfe = results[name]
            tokens = count_new_tokens(sequences, batch["input_ids"].shape[1], eos, args.stop_at_eos)
            tokens_per_second = tokens / best[name]
            baseline = baseline or tokens_per_second
            rows.append(
                dict(
                    method=name,
                    batch_size=batch_size,
                    seconds=best[name],
                    new_tokens=tokens,
                    tokens_per_second=tokens_per_second,
                    ratio_to_ar=tokens_per_second / baseline,
                    nfe=nfe,
                    tokens_per_forward=tokens / batch_size / nfe,
                )
            )
    return rows


def quality(ar, model, tokenizer, args, pad_id: int, eos: list[int]) -> dict:
    """Each prompt alone (batch 1), every method stopping at EOS: speed over all prompts, the answers, and their
    generative perplexity under `ar`. Methods: `ar`, then threshold decoding at each of `--quality-thresholds`."""
    texts = prompt_texts(tokenizer, args.num_quality_prompts)
    batches = [make_batch(tokenizer, [text], args.device) for text in texts]

    def ar_run(batch):
        sequences = ar.generate(
            **batch, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos
        )
        return sequences, sequences.shape[1] - batch["input_ids"].shape[1]

    def diffusion_run(threshold):
        def run(batch):
            out = model.generate(
                **batch,
                max_new_tokens=args.max_new_tokens,
                steps=args.steps or args.max_new_tokens,
                block_length=args.block_length,
                threshold=threshold,
                eos_token_id=eos,
                return_dict_in_generate=True,
            )
            return out.sequences, out.nfe

        return run

    methods = {"ar": ar_run, **{f"threshold {t}": diffusion_run(t) for t in args.quality_thresholds}}
    outputs = {name: [run(batch) for batch in batches] for name, run in methods.items()}  # warm-up, the answers
    best = {name: float("inf") for name in methods}
    for _ in range(args.rounds):
        for name, run in methods.items():
            synchronize(args.device)
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            synchronize(args.device)
            best[name] = min(best[name], time.perf_counter() - start)
    rows, answers = [], {}
    for name in methods:
        tokens = sum(
            count_new_tokens(sequences, batch["input_ids"].shape[1], eos, True)
            for (sequences, _), batch in zip(outputs[name], batches, strict=True)
        )
        nfe = sum(n for _, n in outputs[name])
        answers[name] = [
            tokenizer.decode(sequences[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            for (sequences, _), batch in zip(outputs[name], batches, strict=True)
        ]
        perplexity = generative_perplexity([text or "." for text in answers[name]], ar, tokenizer, device=args.device)
        rows.append(
            dict(
                method=name,
                seconds=best[name],
                new_tokens=tokens,
                tokens_per_second=tokens / best[name],
                nfe=nfe,
                tokens_per_forward=tokens / nfe,
                generative_perplexity=perplexity,
                answer_forwards=[n for _, n in outputs[name]],
            )
        )
    for row in rows:
        row["ratio_to_ar"] = row["tokens_per_second"] / rows[0]["tokens_per_second"]
    source = CHAT_PROMPTS if tokenizer.chat_template else STORY_PROMPTS
    return {
        "rows": rows,
        "answers": answers,
        "prompts": [source[index % len(source)] for index in range(len(texts))],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the base causal LM (path or Hub id); default: tiny llama")
    parser.add_argument("--adapter", default=None, help="a trained diffusion adapter folder on --model")
    parser.add_argument("--no-merge", dest="merge", action="store_false", help="keep LoRA unmerged for timing")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 32], help="none: --quality only")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16, help="block size of an untrained conversion")
    parser.add_argument("--block-length", type=int, default=None, help="decoding block (default: block size)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: max-new-tokens)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at EOS and count tokens up to it")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds; the best of each is kept")
    parser.add_argument("--quality", action="store_true", help="also compare answers and generative perplexity")
    parser.add_argument("--num-quality-prompts", type=int, default=len(CHAT_PROMPTS))
    parser.add_argument("--quality-thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()
    if args.methods[0] != "ar":
        args.methods = ["ar", *[name for name in args.methods if name != "ar"]]
    torch.set_num_threads(args.threads)

    ar, model, tokenizer = build(args)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    eos = model.causal_lm.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    with torch.no_grad():
        rows = speed(ar, model, tokenizer, args, pad_id, eos)
        report = quality(ar, model, tokenizer, args, pad_id, eos) if args.quality and tokenizer is not None else None

    print(
        f"model={args.model or 'tiny-llama'} adapter={args.adapter} device={args.device} dtype={args.dtype} "
        f"attn={args.attn} threads={args.threads} max_new_tokens={args.max_new_tokens} "
        f"block_size={model.config.block_size} steps={args.steps or args.max_new_tokens} threshold={args.threshold} "
        f"{'stop at EOS' if args.stop_at_eos else 'fixed length'}; best of {args.rounds} rounds"
    )
    header = (
        f"{'method':20s} {'batch':>5s} {'s/run':>8s} {'tokens':>7s} {'tok/s':>8s} {'vs ar':>6s} {'NFE':>5s} "
        f"{'tok/fwd':>8s}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['method']:20s} {row['batch_size']:5d} {row['seconds']:8.3f} {row['new_tokens']:7d} "
            f"{row['tokens_per_second']:8.1f} {row['ratio_to_ar']:6.2f} {row['nfe']:5d} "
            f"{row['tokens_per_forward']:8.2f}"
        )
    if report is not None:
        print(
            f"\nbatch 1, each of {len(report['prompts'])} prompts alone, stop at EOS, greedy; best of {args.rounds} "
            "rounds over all prompts; generative perplexity of the answers under the AR base"
        )
        print(
            f"{'method':16s} {'s/all':>8s} {'tokens':>7s} {'tok/s':>7s} {'vs ar':>6s} {'NFE':>5s} {'tok/fwd':>8s} {'gen PPL':>8s}"
        )
        for row in report["rows"]:
            print(
                f"{row['method']:16s} {row['seconds']:8.2f} {row['new_tokens']:7d} {row['tokens_per_second']:7.2f} "
                f"{row['ratio_to_ar']:6.2f} {row['nfe']:5d} {row['tokens_per_forward']:8.2f} "
                f"{row['generative_perplexity']:8.2f}"
            )
        for index, prompt in enumerate(report["prompts"]):
            print(f"> {prompt}")
            for name, texts in report["answers"].items():
                print(f"  {name:14s}: {texts[index]!r}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "rows": rows, "quality": report}, handle, indent=2)


if __name__ == "__main__":
    main()
