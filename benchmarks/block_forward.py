"""One cached block forward against one AR decoding step, on the same model, one process.

For each prompt length P (the cache) and block length W:
  - `ar step`: the causal LM, one token over a KV cache of P tokens (what HF `generate` does per token);
  - `block fwd`: `DiffusionLM.forward` on a W-token block over a cache of P tokens (a denoising step of the cached
    decoding loop: unmasked under block attention, logits for the W positions);
  - `block fwd masked`: the same forced through the dense-mask path (what the unmasked fast path saves);
  - `block fwd, F.linear head`: the same with the LM head as `F.linear` (what `head_rows_first` saves on CPU).
Rounds alternate and each keeps its best time. A block forward must not pay for the prompt (its time stays flat in
P) nor for dense L x L masks; the target (issue 7) is <= 1.10x one AR step on a GPU, <= 1.5x on CPU.

With `--token-counts M1 M2 ...`, also the cost curve of the causal LM itself: one cached forward over M tokens (logits
of the last only) against one AR step, for each M, at the first prompt length. It says what batching more tokens
into one forward costs on the device (e.g. a draft and a verification in one forward).

    python benchmarks/block_forward.py --model ~/.cache/peft_diffusion/SmolLM2-135M-Instruct --blocks 4 8 16 32
    python benchmarks/block_forward.py --config Qwen/Qwen2.5-0.5B --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.cache_utils import DynamicCache

from peft_diffusion import DiffusionConfig, get_diffusion_model
from peft_diffusion import model as model_module
from peft_diffusion.model import DiffusionLM


def build_base(args):
    dtype = getattr(torch, args.dtype)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
    if args.config:
        config = AutoConfig.from_pretrained(args.config)
    else:  # SmolLM2-135M's shape
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        )
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a causal LM folder or Hub id (default: SmolLM2-135M's shape, random init)")
    parser.add_argument("--config", help="a config to build a randomly initialised model from")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--token-counts", type=int, nargs="*", default=[], help="the causal forward's cost curve")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    causal_lm = build_base(args).to(args.device).eval()
    vocab = causal_lm.get_input_embeddings().weight.shape[0]
    rows = []
    generator = torch.Generator().manual_seed(0)
    longest = max(args.prompt_lengths) + max(args.blocks)
    tokens = torch.randint(3, vocab - 1, (args.batch_size, longest), generator=generator).to(args.device)

    def synchronize():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        for block in args.blocks:
            # The block grid must start at the cache end: P a multiple of the block size.
            config = DiffusionConfig(attention="block", block_size=block, shift=True, mask_token_id=vocab - 1)
            model = get_diffusion_model(causal_lm, config).eval()
            for prompt in args.prompt_lengths:
                prompt = prompt // block * block
                cache = DynamicCache()
                causal_lm(input_ids=tokens[:, :prompt], past_key_values=cache, use_cache=True)

                def crop(cache=cache, prompt=prompt):
                    cache.crop(prompt - cache.get_seq_length())

                def ar_step(prompt=prompt, cache=cache, crop=crop):
                    causal_lm(input_ids=tokens[:, prompt : prompt + 1], past_key_values=cache, use_cache=True)
                    crop()

                def block_forward(prompt=prompt, block=block, cache=cache, crop=crop, model=model):
                    model(input_ids=tokens[:, prompt : prompt + block], past_key_values=cache, use_cache=True)
                    crop()

                def block_forward_masked(block_forward=block_forward):
                    original = DiffusionLM._allows_every_pair
                    DiffusionLM._allows_every_pair = lambda self, *a: False
                    try:
                        block_forward()
                    finally:
                        DiffusionLM._allows_every_pair = original

                def block_forward_linear_head(block_forward=block_forward):
                    original = model_module.head_rows_first
                    model_module.head_rows_first = lambda *args: contextlib.nullcontext()
                    try:
                        block_forward()
                    finally:
                        model_module.head_rows_first = original

                runs = {
                    "ar step": ar_step,
                    "block fwd": block_forward,
                    "block fwd masked": block_forward_masked,
                    "block fwd linear head": block_forward_linear_head,
                }
                best = {name: float("inf") for name in runs}
                for run in runs.values():
                    run()
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        synchronize()
                        start = time.perf_counter()
                        run()
                        synchronize()
                        best[name] = min(best[name], time.perf_counter() - start)
                rows.append(
                    dict(
                        prompt_length=prompt,
                        block=block,
                        ar_step_ms=best["ar step"] * 1e3,
                        block_ms=best["block fwd"] * 1e3,
                        block_masked_ms=best["block fwd masked"] * 1e3,
                        block_linear_head_ms=best["block fwd linear head"] * 1e3,
                        ratio=best["block fwd"] / best["ar step"],
                    )
                )
            model.model = None  # drop the wrapper; the next block size wraps the same causal LM again

    curve = []
    if args.token_counts:
        prompt = args.prompt_lengths[0]
        cache = DynamicCache()
        with torch.no_grad():
            causal_lm(input_ids=tokens[:, :prompt], past_key_values=cache, use_cache=True)

            def forward(count, cache=cache, prompt=prompt):
                causal_lm(
                    input_ids=tokens[:, prompt : prompt + count],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache.crop(prompt - cache.get_seq_length())

            best = {count: float("inf") for count in [1, *args.token_counts]}
            for count in best:
                forward(count)
            for _ in range(args.rounds):
                for count in best:
                    synchronize()
                    start = time.perf_counter()
                    forward(count)
                    synchronize()
                    best[count] = min(best[count], time.perf_counter() - start)
        curve = [dict(tokens=count, ms=seconds * 1e3, vs_ar_step=seconds / best[1]) for count, seconds in best.items()]

    print(
        f"model={args.model or args.config or 'SmolLM2-135M shape (random)'} batch={args.batch_size} "
        f"device={args.device} dtype={args.dtype} attn={args.attn} threads={args.threads}; best of {args.rounds}"
    )
    print(
        f"{'P':>5} {'W':>4} {'AR step ms':>11} {'block ms':>9} {'masked ms':>10} {'F.linear head ms':>17} "
        f"{'block/AR':>9}"
    )
    for row in rows:
        print(
            f"{row['prompt_length']:5d} {row['block']:4d} {row['ar_step_ms']:11.1f} {row['block_ms']:9.1f} "
            f"{row['block_masked_ms']:10.1f} {row['block_linear_head_ms']:17.1f} {row['ratio']:9.2f}"
        )
    if curve:
        print(f"causal forward over M tokens, a {args.prompt_lengths[0]}-token cache:")
        print(f"{'M':>4} {'ms':>8} {'x AR step':>10}")
        for row in curve:
            print(f"{row['tokens']:4d} {row['ms']:8.1f} {row['vs_ar_step']:10.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "rows": rows, "causal_curve": curve}, handle, indent=2)


if __name__ == "__main__":
    main()
