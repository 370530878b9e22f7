"""Decoding speed: our `generate` (KV-cached blocks, threshold) against the base causal LM's HF `generate`, one run.

The same base model is converted once to a block-attention diffusion LM; for each batch size the script times
  - `ar`: the base causal LM's `generate` with its KV cache, greedy, one token per forward;
  - `diffusion cached+threshold`: our `generate` with the exact block KV cache and Fast-dLLM's threshold;
  - `diffusion cached`: the same with a fixed number of steps (no threshold);
  - `diffusion uncached+threshold`: the whole canvas every step (the reference the cache is exact against);
with every row producing exactly `--max-new-tokens` tokens (EOS ignored), and prints tokens/s, the ratio to `ar`,
the number of model forwards (NFE) and the tokens per forward. `--json` writes the rows.

    python benchmarks/generate.py                                           # tiny random llama, CPU
    python benchmarks/generate.py --model ../shared/models/stories260K --block-size 8
    python benchmarks/generate.py --model Qwen/Qwen2.5-0.5B --device cuda --dtype bfloat16 --max-new-tokens 256

An untrained conversion is not confident, so its threshold rarely fires: the NFE then stays near `--steps`. The
figures measure the loop's overhead and the cache; a trained model commits several tokens per forward.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from peft_diffusion import DiffusionConfig, get_diffusion_model

PROMPTS = ["Once upon a time", "Lily and her dog went to the park", "The sun was", "Tom had a red ball and"]


def build(args):
    """(base causal LM, diffusion LM, tokenizer or None); the diffusion LM wraps the same weights."""
    dtype = getattr(torch, args.dtype)
    diffusion_config = DiffusionConfig(attention="block", block_size=args.block_size, shift=True)
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
        model = get_diffusion_model(base, diffusion_config, tokenizer=tokenizer)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = None
        config = LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8
        )
        config._attn_implementation = args.attn
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
        diffusion_config.mask_token_id = config.vocab_size - 1
        model = get_diffusion_model(base, diffusion_config)
    model = model.to(args.device).eval()
    return model.causal_lm, model, tokenizer


def make_batch(tokenizer, batch_size: int, device: str) -> dict:
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, 4000, (batch_size, 12), generator=generator)
        return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}
    texts = [PROMPTS[index % len(PROMPTS)] for index in range(batch_size)]
    return {key: value.to(device) for key, value in tokenizer(texts, return_tensors="pt", padding=True).items()}


def methods(causal_lm, model, batch: dict, args, pad_id: int) -> dict:
    """The timed calls, by name; `ar` first (the baseline of the ratios)."""
    new = args.max_new_tokens
    diffusion = dict(
        max_new_tokens=new,
        steps=args.steps or new,
        block_length=args.block_length,
        eos_token_id=[],
        return_dict_in_generate=True,
    )
    return {
        "ar": lambda: causal_lm.generate(
            **batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=pad_id
        ),
        "diffusion cached+threshold": lambda: model.generate(
            **batch, threshold=args.threshold, use_cache=True, **diffusion
        ),
        "diffusion cached": lambda: model.generate(**batch, use_cache=True, **diffusion),
        "diffusion uncached+threshold": lambda: model.generate(
            **batch, threshold=args.threshold, use_cache=False, **diffusion
        ),
    }


def timed(run, repeats: int, device: str):
    """Best wall time of `repeats` calls after one warm-up (the minimum is the least disturbed by other load)."""
    result = run()
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a causal LM path or Hub id (default: tiny random llama)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16, help="the converted model's attention block size")
    parser.add_argument("--block-length", type=int, default=None, help="decoding block (default: block size)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: max-new-tokens)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()

    causal_lm, model, tokenizer = build(args)
    new = args.max_new_tokens
    steps = args.steps or new
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    rows = []
    with torch.no_grad():
        for batch_size in args.batch_sizes:
            batch = make_batch(tokenizer, batch_size, args.device)
            runs = methods(causal_lm, model, batch, args, pad_id)
            baseline = None
            for name, run in runs.items():
                seconds, result = timed(run, args.repeats, args.device)
                nfe = new if name == "ar" else result.nfe
                tokens_per_second = batch_size * new / seconds
                baseline = baseline or tokens_per_second
                rows.append(
                    dict(
                        method=name,
                        batch_size=batch_size,
                        seconds=seconds,
                        tokens_per_second=tokens_per_second,
                        ratio_to_ar=tokens_per_second / baseline,
                        nfe=nfe,
                        tokens_per_forward=new / nfe,
                    )
                )

    print(
        f"model={args.model or 'tiny-llama'} device={args.device} dtype={args.dtype} attn={args.attn} "
        f"max_new_tokens={new} block_size={args.block_size} steps={steps} threshold={args.threshold}"
    )
    header = f"{'method':30s} {'batch':>5s} {'s/run':>9s} {'tok/s':>10s} {'vs ar':>7s} {'NFE':>5s} {'tok/fwd':>8s}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['method']:30s} {row['batch_size']:5d} {row['seconds']:9.4f} {row['tokens_per_second']:10.1f} "
            f"{row['ratio_to_ar']:7.2f} {row['nfe']:5d} {row['tokens_per_forward']:8.2f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
