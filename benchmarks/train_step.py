"""Training step time and peak memory: every diffusion configuration against AR (causal LM) training, one process.

For each configuration the same base model, batch and length run forward + backward + AdamW step:
  - `AR`: the causal LM with `labels` (transformers' shifted cross-entropy), the baseline of every ratio;
  - `bidirectional`, `annealed` (ratio 0.5: causal plus half of the upper triangle), `block`, `block+clean_context`
    (the two-stream `[x_t ; x_0]` input, 2L long): `DiffusionLM.forward(labels=...)`, the diffusion loss.
Rounds alternate between the configurations and each keeps its best time, so the drift of a shared machine hits all
of them alike. Full finetuning and LoRA (r=64, all linear layers) are separate tables (`--modes`).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` during one step. On CPU there is no allocator peak counter:
one step runs under a dispatch-mode tracker of live tensor storages (`LiveTensorBytes`: the weights and optimizer
state present at entry, plus every storage an operator creates, released when freed), which gives `peak MiB`
(everything) and `step MiB` (without the weights: gradients, optimizer state, activations, temporaries). Allocator
overhead and fragmentation are not counted; the accounting is the same for AR and diffusion.

    python benchmarks/train_step.py                                   # tiny llama-shaped model, CPU, 1 thread
    python benchmarks/train_step.py --model ~/.cache/peft_diffusion/SmolLM2-135M-Instruct --batch-size 2 --length 128
    python benchmarks/train_step.py --config Qwen/Qwen2.5-0.5B --device cuda --dtype bfloat16 --attn sdpa flex_attention

Targets (issue 7): diffusion / AR <= 1.10 for bidirectional and annealed attention, <= 2.2 for block attention with
clean context (its input is 2L long); peak memory likewise.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import weakref

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from peft_diffusion import DiffusionConfig, get_diffusion_model

CONFIGURATIONS = {
    "bidirectional": dict(attention="bidirectional", shift=True),
    "annealed": dict(attention="annealed", shift=True),
    "block": dict(attention="block", shift=False, clean_context=False),
    "block+clean_context": dict(attention="block", shift=False, clean_context=True),
}
TARGETS = {"bidirectional": 1.10, "annealed": 1.10, "block+clean_context": 2.2}


def build_base(args, attn: str) -> torch.nn.Module:
    dtype = getattr(torch, args.dtype)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=attn)
    if args.config:
        config = AutoConfig.from_pretrained(args.config)
    else:
        config = LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8
        )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build(name: str, base, mode: str, vocab: int, args):
    """The model of one configuration, on its own copy of the base (LoRA adapters must not stack)."""
    peft_config = LoraConfig(r=64, lora_alpha=128, target_modules="all-linear") if mode == "lora" else None
    base = copy.deepcopy(base)
    if name == "AR":
        return get_peft_model(base, peft_config) if peft_config else base
    config = DiffusionConfig(block_size=args.block_size, mask_token_id=vocab - 1, **CONFIGURATIONS[name])
    model = get_diffusion_model(base, config, peft_config=peft_config)
    model.annealing_ratio = 0.5  # the annealed pattern mid-way; ignored by the others
    return model


def make_step(model, name: str, batch, args):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator(device=args.device).manual_seed(0)
    model.train()

    def step():
        if name == "AR":
            loss = model(input_ids=batch, labels=batch).loss
        else:
            loss = model(input_ids=batch, labels=batch, generator=generator).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer
    return step


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_batch(args, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab - 1, (args.batch_size, args.length), generator=generator).to(args.device)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages: those present at entry (weights, optimizer state) plus every storage an
    operator creates inside the context, released when the storage is freed (a weak reference)."""

    def __init__(self, existing):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0
        for tensor in existing:
            self._add(tensor)
        self.at_entry = self.current

    def _add(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = (storage.nbytes(), weakref.ref(storage, lambda _, key=key: self._release(key)))
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)

    def _release(self, key) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(output):
            self._add(tensor)
        return output


def cpu_peak_memory(model, step, optimizer) -> tuple[float, float]:
    """(peak MiB of live tensors over one step, the same without the weights), on CPU."""
    weights = [*model.parameters(), *model.buffers()]
    state = [value for per_param in optimizer.state.values() for value in per_param.values()]
    weight_bytes = LiveTensorBytes(weights).current
    with LiveTensorBytes([*weights, *state]) as tracker:
        step()
    return tracker.peak / 2**20, (tracker.peak - weight_bytes) / 2**20


def run_table(args, mode: str, attn: str) -> dict:
    base = build_base(args, attn).to(args.device)
    vocab = base.get_input_embeddings().weight.shape[0]
    batch = make_batch(args, vocab)
    names = ["AR", *args.configs]
    models = {name: build(name, base, mode, vocab, args) for name in names}
    steps = {name: make_step(models[name], name, batch, args) for name in names}
    for name in names:  # warm-up
        for _ in range(args.warmup):
            steps[name]()
    best = {name: float("inf") for name in names}
    for _ in range(args.rounds):
        for name in names:
            synchronize(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            synchronize(args.device)
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    peaks = {}
    for name in names:
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            steps[name]()
            synchronize(args.device)
            peaks[name] = (torch.cuda.max_memory_allocated() / 2**20, None)
        elif args.memory:
            peaks[name] = cpu_peak_memory(models[name], steps[name], steps[name].optimizer)
    rows = {}
    for name in names:
        row = {"seconds_per_step": best[name], "ratio": best[name] / best["AR"]}
        if name in peaks:
            row["peak_mib"], row["step_mib"] = peaks[name]
            row["memory_ratio"] = row["peak_mib"] / peaks["AR"][0]
            if row["step_mib"] is not None:
                row["step_memory_ratio"] = row["step_mib"] / peaks["AR"][1]
        rows[name] = row
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local folder or Hub id of a causal LM (pretrained weights)")
    parser.add_argument("--config", help="a config to build a randomly initialised model from")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the CPU memory step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", nargs="+", default=["sdpa"], help="attn_implementation(s): sdpa, eager, flex")
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    memory_note = (
        "peak MiB: CUDA max_memory_allocated over one step"
        if args.device.startswith("cuda")
        else "peak MiB: live tensors over one step (dispatch tracker), step MiB: the same without the weights"
    )
    for attn in args.attn:
        for mode in args.modes:
            rows = run_table(args, mode, attn)
            results[f"{attn}/{mode}"] = rows
            print(
                f"\nmodel={args.model or args.config or 'tiny-llama'} batch={args.batch_size} length={args.length} "
                f"block={args.block_size} device={args.device} dtype={args.dtype} attn={attn} threads={args.threads} "
                f"{'LoRA r=64' if mode == 'lora' else 'full finetuning'}; best of {args.rounds} rounds x "
                f"{args.steps} steps; {memory_note}"
            )
            print(
                f"{'configuration':<22}{'s/step':>10}{'ratio':>8}{'target':>8}{'peak MiB':>10}{'ratio':>7}"
                f"{'step MiB':>10}{'ratio':>7}"
            )
            for name, row in rows.items():
                target = TARGETS.get(name)

                def number(key, spec, row=row):
                    return format(row[key], spec) if row.get(key) is not None else "-"

                print(
                    f"{name:<22}{row['seconds_per_step']:>10.4f}{row['ratio']:>8.2f}"
                    f"{(f'<={target}' if target else '-'):>8}{number('peak_mib', '.1f'):>10}"
                    f"{number('memory_ratio', '.2f'):>7}{number('step_mib', '.1f'):>10}"
                    f"{number('step_memory_ratio', '.2f'):>7}"
                )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
