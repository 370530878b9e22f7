"""Decoding through `AdapterViews` (the base view: LoRA linears replaced by their base layers; the adapter view: lean
LoRA layers) against the same calls through PEFT's layers (the adapter switched off and on with `enable_adapters`,
what `disable_adapter()` does), one process.

For a saved LoRA adapter (or, without `--adapter`, a fresh LoRA r=32 on every linear layer with small random
weights): self-speculative decoding at W=4, then plain diffusion decoding at threshold 0.9 (`generate` runs through
the lean layers too, `lean_inference`), on one chat prompt, `--max-new-tokens` tokens, no EOS stop; rounds
alternate, each keeps its best time. The speculative tokens must be the same (the verification decides them); the
diffusion tokens may differ only where float rounding flips a near tie. Also the forwards alone: a
verification (5 tokens) and a drafter forward (8 tokens) over a 72-token cache, each way.

    python benchmarks/adapter_views.py --adapter runs/sd60 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without an install

from token_rows import add_arguments, chat_model_and_prompt  # noqa: E402  (benchmarks/ is the script's folder)


def best_ms(run, rounds: int) -> float:
    run()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None):
    from transformers.cache_utils import DynamicCache

    from peft_diffusion import adapter_views
    from peft_diffusion.conversion import token_rows_merged

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, "a saved LoRA diffusion adapter of --model (default: a random one)")
    args = parser.parse_args(argv)
    model, inputs = chat_model_and_prompt(args)
    # The columns the verification scores: the base's vocabulary, without the mask row added for the conversion
    # (as `speculative_generate` resolves it); that row stays merged in the base view.
    vocab = (model.config.base_fingerprint or {}).get("vocab_size") or model.causal_lm.config.vocab_size
    plain = adapter_views._is_plain_lora_linear

    def through_peft(module) -> bool:  # nothing is replaced: every adapter layer is switched, as PEFT does
        return False

    ways = {"PEFT layers": through_peft, "adapter views": plain}
    print(
        f"{args.adapter or 'random LoRA r=32'}, {args.max_new_tokens} tokens, {args.threads} thread(s), "
        f"best of {args.rounds}"
    )

    # The forwards alone, over a 72-token cache.
    ids = torch.randint(100, vocab - 1, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), token_rows_merged(model):
        cache = DynamicCache()
        model.causal_lm(input_ids=ids[:, :72], past_key_values=cache, use_cache=True)
        times = {}
        for name, rule in ways.items():
            adapter_views._is_plain_lora_linear = rule
            views = adapter_views.AdapterViews(model.model, vocab)

            def verify(views=views):
                with views.base():
                    model.causal_lm(input_ids=ids[:, 72:77], past_key_values=cache, use_cache=True)
                cache.crop(72 - cache.get_seq_length())

            def draft(views=views):
                with views.adapter():
                    model(input_ids=ids[:, 72:80], past_key_values=cache, use_cache=True)
                cache.crop(72 - cache.get_seq_length())

            times[name] = (best_ms(verify, 2 * args.rounds), best_ms(draft, 2 * args.rounds))
        adapter_views._is_plain_lora_linear = plain

        def ar_step(views=views):  # the last `views` built: the adapter views
            with views.base():
                model.causal_lm(input_ids=ids[:, 72:73], past_key_values=cache, use_cache=True)
            cache.crop(72 - cache.get_seq_length())

        ar = best_ms(ar_step, 2 * args.rounds)
    print(f"AR step (the base view, 1 token): {ar:.1f} ms")
    for name, (verify, draft) in times.items():
        print(f"{name:14} verification (5 tokens) {verify:6.1f} ms   drafter forward (8 tokens) {draft:6.1f} ms")

    # Whole calls: self-speculative decoding (W=4) and plain diffusion decoding (threshold 0.9).
    settings = {
        "speculative W=4": dict(speculative=True, block_length=4, eos_token_id=[]),
        "diffusion @0.9": dict(threshold=0.9, eos_token_id=[]),
    }
    for label, kwargs in settings.items():
        best, outputs = {}, {}
        for _ in range(args.rounds):
            for name, rule in ways.items():
                adapter_views._is_plain_lora_linear = rule
                start = time.perf_counter()
                outputs[name] = model.generate(
                    **inputs, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True, **kwargs
                )
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        adapter_views._is_plain_lora_linear = plain
        old, new = outputs["PEFT layers"], outputs["adapter views"]
        tokens = new.sequences.shape[1] - inputs["input_ids"].shape[1]
        forwards = getattr(new, "base_forwards", None) or new.nfe
        print(
            f"{label:16} PEFT layers {tokens / best['PEFT layers']:5.1f} tok/s  adapter views "
            f"{tokens / best['adapter views']:5.1f} tok/s  ({best['PEFT layers'] / best['adapter views']:.2f}x); "
            f"{tokens / forwards:.2f} tokens per (base) forward; same tokens: "
            f"{torch.equal(old.sequences, new.sequences)}"
        )


if __name__ == "__main__":
    main()
