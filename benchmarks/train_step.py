"""Training step time and peak memory: diffusion configurations against AR (causal LM) training, one process.

For each configuration the same base model, batch and length run forward + backward + optimizer step; the script
prints a table with the time per step, the ratio to the AR baseline measured in the same run, and (on CUDA) the peak
memory ratio, and writes JSON with `--json`.

    python benchmarks/train_step.py                                   # tiny llama-shaped model, CPU
    python benchmarks/train_step.py --model ../shared/models/stories260K --batch-size 8 --length 256
    python benchmarks/train_step.py --config Qwen/Qwen2.5-0.5B --random-init --device cuda --dtype bfloat16

Targets (issue: performance): diffusion / AR <= 1.10 for bidirectional and annealed attention, <= 2.2 for block
attention with clean context (its input is 2L long).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from peft_diffusion import DiffusionConfig, get_diffusion_model

CONFIGURATIONS = {
    "bidirectional": dict(attention="bidirectional", shift=True),
    "annealed": dict(attention="annealed", shift=True),
    "block": dict(attention="block", shift=False, clean_context=False),
    "block+clean_context": dict(attention="block", shift=False, clean_context=True),
}


def build_base(args) -> torch.nn.Module:
    dtype = getattr(torch, args.dtype)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
    if args.config:
        config = AutoConfig.from_pretrained(args.config)
    else:
        config = LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8
        )
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def time_steps(step, warmup: int, steps: int, device: str) -> float:
    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def measure(model, batch, labels, *, diffusion: bool, args) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator(device=args.device).manual_seed(0)

    def step():
        if diffusion:
            model.annealing_ratio = 0.5
            loss = model(input_ids=batch, labels=labels, generator=generator).loss
        else:
            loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(step, args.warmup, args.steps, args.device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return {"seconds_per_step": seconds, "peak_mib": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local folder or Hub id of a causal LM (pretrained weights)")
    parser.add_argument("--config", help="a config to build a randomly initialised model from")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best time of each is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager or flex_attention")
    parser.add_argument(
        "--lora", action="store_true", help="LoRA r=64 on all linear layers instead of full finetuning"
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    base = build_base(args).to(args.device).train()
    vocab = base.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(3, vocab - 1, (args.batch_size, args.length), generator=generator).to(args.device)
    labels = batch.clone()

    def peft_config():
        return LoraConfig(r=64, lora_alpha=128, target_modules="all-linear") if args.lora else None

    # Every configuration wraps its own copy of the base (LoRA adapters must not stack); the rounds alternate between
    # configurations and keep each one's best time, so drift of the machine hits all of them alike.
    import copy

    from peft import get_peft_model

    candidates = {"AR": (get_peft_model(copy.deepcopy(base), peft_config()) if args.lora else base, False)}
    for name in args.configs:
        config = DiffusionConfig(block_size=args.block_size, mask_token_id=vocab - 1, **CONFIGURATIONS[name])
        model = get_diffusion_model(copy.deepcopy(base), config, peft_config=peft_config()).train()
        candidates[name] = (model, True)
    results = {}
    for _ in range(args.rounds):
        for name, (model, diffusion) in candidates.items():
            result = measure(model, batch, labels, diffusion=diffusion, args=args)
            best = results.get(name)
            if best is None or result["seconds_per_step"] < best["seconds_per_step"]:
                results[name] = result

    baseline = results["AR"]
    print(
        f"model={args.model or args.config or 'tiny-llama'} batch={args.batch_size} length={args.length} "
        f"device={args.device} dtype={args.dtype} attn={args.attn} {'LoRA r=64' if args.lora else 'full'}"
    )
    print(f"{'configuration':<22}{'s/step':>10}{'ratio':>8}{'peak MiB':>10}{'mem ratio':>10}")
    for name, result in results.items():
        ratio = result["seconds_per_step"] / baseline["seconds_per_step"]
        result["ratio"] = ratio
        peak = result["peak_mib"]
        mem_ratio = peak / baseline["peak_mib"] if peak else None
        result["memory_ratio"] = mem_ratio
        print(
            f"{name:<22}{result['seconds_per_step']:>10.4f}{ratio:>8.2f}"
            f"{(f'{peak:.0f}' if peak else '-'):>10}{(f'{mem_ratio:.2f}' if mem_ratio else '-'):>10}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
