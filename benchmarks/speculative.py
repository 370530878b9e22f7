"""Self-speculative decoding against the base's HF greedy `generate`: accepted tokens per base forward and tokens/s.

Methods, on the same prompts, greedy, every row producing exactly `--max-new-tokens` tokens (EOS does not stop), or
with `--stop-at-eos` up to and including its first EOS (what a chat user gets; counted so):
  - `ar`: the original causal LM's HF `generate` with its KV cache, one token per forward (the baseline);
  - `lookup`: HF's prompt-lookup decoding (`prompt_lookup_num_tokens=--lookup-tokens`: drafts copied from n-gram
    matches in the prompt, verified by the base; batch 1 only, as HF's assisted generation);
  - `spec-W<w>`: `model.generate(speculative=True, block_length=w, steps=--steps)`: the adapter drafts `w` tokens,
    the base (adapter disabled) verifies them in one forward;
  - `spec-W<w>-T<n>` (`--tree-sizes n ...`): the same with `tree_size=n`: a draft tree of `n` tokens (the chain and
    the drafter's next most likely paths) verified in one forward.
Prompts: stories for a model without a chat template, otherwise eight chat questions under the model's template.
Each prompt alone (batch 1, the sums over the prompts are reported), then all prompts together (left-padded batch).
Calls alternate between the methods, each keeps its best time of `--rounds` (the machine is shared). Reported:
tokens/s, the ratio to `ar`, base and drafter forwards, tokens per base forward (accepted draft tokens + 1 per
verification) and whether the text is identical to `ar`'s (it must be).

The adapter: untrained by default (a zero-initialised LoRA, so the drafter is the base itself under block attention
reading mask tokens), `--train-steps N` trains it briefly first (`DiffusionTrainer`, block attention, LoRA r=16, on
stories sampled from the AR checkpoint: `benchmarks/replication/common.py`, cached under `--cache`), or `--adapter`
loads a saved one.

    python benchmarks/speculative.py                          # stories260K, untrained adapter, CPU, 1 thread
    python benchmarks/speculative.py --train-steps 300        # a briefly trained adapter
    python benchmarks/speculative.py --model ~/.cache/peft_diffusion/SmolLM2-135M-Instruct --adapter runs/quickstart \
        --stop-at-eos --block-lengths 4 8 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without an install

from generate import CHAT_PROMPTS, synchronize  # noqa: E402  (benchmarks/ is the script's folder)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from peft_diffusion.cli.demo import answer_length  # noqa: E402

STORY_PROMPTS = ["Once upon a time", "Lily and her dog went to the park", "The sun was", "Tom had a red ball and"]


def prompt_texts(tokenizer) -> list[str]:
    """Chat questions under the tokenizer's chat template, or story openings without one."""
    if not tokenizer.chat_template:
        return STORY_PROMPTS
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in CHAT_PROMPTS
    ]


def new_tokens(sequences, prompt_length: int, eos_ids: set[int] | None) -> list[list[int]]:
    """Each row's new tokens, cut after its first EOS when `eos_ids` is given (`--stop-at-eos`)."""
    new = sequences[:, prompt_length:]  # [B, N]
    return [row[: answer_length(row, eos_ids)].tolist() if eos_ids else row.tolist() for row in new]


def build(args):
    """(the original causal LM, the diffusion LM with its adapter, the tokenizer, a description of the adapter)."""
    from peft import LoraConfig

    from peft_diffusion import DiffusionConfig, DiffusionLM, get_diffusion_model

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    load = dict(attn_implementation=args.attn, dtype=getattr(torch, args.dtype))
    ar = AutoModelForCausalLM.from_pretrained(args.model, **load).to(args.device).eval()
    if args.adapter:
        base = AutoModelForCausalLM.from_pretrained(args.model, **load)
        model = DiffusionLM.from_pretrained(args.adapter, base_model=base)
        return ar, model.to(args.device).eval(), tokenizer, args.adapter
    if args.train_steps:
        sys.path.insert(0, str(REPO / "benchmarks" / "replication"))
        import common

        spec = common.RunSpec(
            name=f"speculative-drafter-b{args.block_size}",
            attention="block",
            block_size=args.block_size,
            lora_r=16,
            max_steps=args.train_steps,
            eval_steps=args.train_steps,
        )
        corpus = common.load_corpus(Path(args.cache))
        model, payload = common.get_trained(spec, corpus, Path(args.cache) / "models")
        seconds = payload.get("train_seconds", 0.0)
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
        return ar, model, tokenizer, f"LoRA r=16 trained {args.train_steps} steps ({seconds:.0f}s)"
    base = AutoModelForCausalLM.from_pretrained(args.model, **load)
    config = DiffusionConfig(attention="block", block_size=args.block_size)
    lora = LoraConfig(r=16, target_modules="all-linear")  # B = 0: the drafter starts as the base itself
    model = get_diffusion_model(base, config, tokenizer=tokenizer, peft_config=lora).to(args.device).eval()
    return ar, model, tokenizer, "untrained LoRA r=16 (zero-initialised)"


def runners(ar, model, batch, args) -> dict:
    """The timed calls, by name; each returns `(sequences, base_forwards, drafter_forwards)` (`base_forwards` is
    None where HF does not report it: `lookup`)."""
    new = args.max_new_tokens
    # HF: `eos_token_id=None` falls back to the generation config's EOS; `[]` would not stop either way for us
    ar_eos = {} if args.stop_at_eos else {"eos_token_id": None, "min_new_tokens": new}
    spec_eos = {} if args.stop_at_eos else {"eos_token_id": []}

    def ar_run():
        sequences = ar.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=0, **ar_eos)
        return sequences, sequences.shape[1] - batch["input_ids"].shape[1], 0

    def lookup_run():
        sequences = ar.generate(
            **batch,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            prompt_lookup_num_tokens=args.lookup_tokens,
            **ar_eos,
        )
        return sequences, None, 0

    def spec_run(block_length, tree_size=None):
        def run():
            out = model.generate(
                **batch,
                max_new_tokens=new,
                speculative=True,
                block_length=block_length,
                tree_size=tree_size,
                steps=args.steps,
                pad_token_id=0,
                return_dict_in_generate=True,
                **spec_eos,
            )
            return out.sequences, out.base_forwards, out.drafter_forwards

        return run

    table = {"ar": ar_run}
    if batch["input_ids"].shape[0] == 1 and args.lookup_tokens:
        table["lookup"] = lookup_run
    table.update({f"spec-W{width}": spec_run(width) for width in args.block_lengths})
    table.update(
        {
            f"spec-W{width}-T{size}": spec_run(width, size)
            for width in args.block_lengths
            for size in args.tree_sizes
            if size >= width
        }
    )
    return table


def measure(ar, model, batches: list[dict], args, label: str, eos_ids: set[int] | None) -> list[dict]:
    """Run every method on every batch; times are the best of `--rounds`, summed over the batches."""
    results, best = {}, {}
    for index, batch in enumerate(batches):
        runs = runners(ar, model, batch, args)
        for name, run in runs.items():
            results[(name, index)] = run()  # warm-up, and the outputs
            best[(name, index)] = float("inf")
        for _ in range(args.rounds):
            for name, run in runs.items():
                synchronize(args.device)
                start = time.perf_counter()
                run()
                synchronize(args.device)
                best[(name, index)] = min(best[(name, index)], time.perf_counter() - start)
    rows = []
    names = list(runners(ar, model, batches[0], args))
    ar_speed = None
    for name in names:
        seconds = sum(best[(name, index)] for index in range(len(batches)))
        texts = {
            (method, index): new_tokens(results[(method, index)][0], batches[index]["input_ids"].shape[1], eos_ids)
            for method in ("ar", name)
            for index in range(len(batches))
        }
        tokens = sum(len(row) for index in range(len(batches)) for row in texts[(name, index)])
        counts = [results[(name, index)][1] for index in range(len(batches))]
        base_forwards = None if None in counts else sum(counts)
        drafter_forwards = sum(results[(name, index)][2] for index in range(len(batches)))
        identical = all(texts[(name, index)] == texts[("ar", index)] for index in range(len(batches)))
        # tokens per base forward: the mean row's tokens over the forwards its batch ran
        rows_per_batch = batches[0]["input_ids"].shape[0]
        speed = tokens / seconds
        ar_speed = ar_speed or speed
        rows.append(
            dict(
                setting=label,
                method=name,
                tokens_per_second=speed,
                ratio_to_ar=speed / ar_speed,
                base_forwards=base_forwards,
                drafter_forwards=drafter_forwards,
                tokens_per_base_forward=None if base_forwards is None else tokens / rows_per_batch / base_forwards,
                identical=identical,
            )
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "stories260K"))
    parser.add_argument("--adapter", default=None, help="a saved diffusion adapter folder for --model")
    parser.add_argument("--train-steps", type=int, default=0, help="train the adapter this many steps first")
    parser.add_argument("--cache", default="/tmp/peft_diffusion_replication", help="corpus and trained adapters")
    parser.add_argument("--block-size", type=int, default=4, help="attention block size of a new adapter")
    parser.add_argument("--block-lengths", type=int, nargs="+", default=[4, 8], help="draft lengths W")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per draft")
    parser.add_argument("--tree-sizes", type=int, nargs="*", default=[], help="also draft trees of these sizes")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop each row at EOS and count tokens up to it")
    parser.add_argument("--lookup-tokens", type=int, default=10, help="HF prompt lookup's draft length (0: skip)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    ar, model, tokenizer, adapter = build(args)
    texts = prompt_texts(tokenizer)
    # the chat template already holds the special tokens
    encode = dict(return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    singles = [dict(tokenizer([text], **encode).to(args.device)) for text in texts]
    together = [dict(tokenizer(texts, padding=True, **encode).to(args.device))]
    eos = ar.generation_config.eos_token_id
    eos_ids = (set(eos) if isinstance(eos, list) else {eos}) if args.stop_at_eos else None
    rows = measure(ar, model, singles, args, "batch 1", eos_ids) + measure(
        ar, model, together, args, f"batch {len(texts)}", eos_ids
    )

    print(
        f"model {args.model}, adapter: {adapter}, {args.max_new_tokens} new tokens per prompt, greedy, "
        f"{args.device} {args.dtype}, {args.threads} thread(s), steps per draft {args.steps}, "
        f"{'stopping at EOS' if args.stop_at_eos else 'EOS ignored'}, torch {torch.__version__}"
    )
    print(
        f"{'setting':9} {'method':13} {'tokens/s':>9} {'x ar':>6} {'base fwd':>9} {'draft fwd':>10} "
        f"{'tok/base fwd':>13} {'identical':>10}"
    )
    for row in rows:
        base = "-" if row["base_forwards"] is None else f"{row['base_forwards']:d}"
        per = "-" if row["tokens_per_base_forward"] is None else f"{row['tokens_per_base_forward']:.2f}"
        print(
            f"{row['setting']:9} {row['method']:13} {row['tokens_per_second']:9.1f} {row['ratio_to_ar']:6.2f} "
            f"{base:>9} {row['drafter_forwards']:10d} {per:>13} {str(row['identical']):>10}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"adapter": adapter, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
