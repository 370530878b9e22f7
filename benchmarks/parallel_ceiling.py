"""How many tokens per forward threshold decoding can reach at block size 2: the ceiling the base's own distribution
sets, and where a converted model stands.

On the base's greedy answers (`--max-new-tokens`, to its EOS) to the 24 held-out chat prompts of
`benchmarks/conversion.py` (story openings for a model without a chat template), every pair of answer tokens
`(j, j + 1)` is scored after the clean text before it:
  - the base: its next-token distribution at j (one ahead), and its two-ahead marginal at j + 1,
    `sum_v p(v | <j) p(. | <j, v)` over the `--top-k` most likely v (each probability is then a lower bound; the
    mass left out, `1 - sum_v p(v)`, bounds what it misses, so the ceiling is given as a range);
  - each `--adapter`: the diffusion model's predictions at j and j + 1 with both masked (the first forward of a
    2-token block, on the base's text).
A perfect copy of the base's distribution is a diffusion model whose predictions are these marginals. With the
`prefix` sampler a block of two commits both tokens in its first forward when both predictions reach the threshold,
else one per forward: tokens per forward `2 / (2 - share of pairs where both reach it)`. Reported per threshold: the
share of one-ahead and two-ahead predictions that reach it, the share whose argmax is the base's token, and that
figure.

    python benchmarks/parallel_ceiling.py --model ~/.cache/peft_diffusion/SmolLM2-135M-Instruct --adapter runs/s10/b2
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

from conversion import prompts  # noqa: E402  (benchmarks/ is the script's folder)
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from peft_diffusion import DiffusionLM  # noqa: E402
from peft_diffusion._compat import CACHE_KWARG, output_cache  # noqa: E402
from peft_diffusion.cli.demo import answer_length, chat_input_ids  # noqa: E402
from peft_diffusion.cli.live import id_list  # noqa: E402
from peft_diffusion.data import _left_padded  # noqa: E402

THRESHOLDS = (0.9, 0.7)


def base_answers(base, tokenizer, max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the base's greedy answer ids up to and including EOS) per prompt."""
    eos = {int(i) for i in {tokenizer.eos_token_id, *id_list(base.generation_config.eos_token_id)} if i is not None}
    rows = []
    for message in tqdm(prompts(tokenizer, "heldout"), desc="base answers"):
        ids = chat_input_ids(tokenizer, message)
        out = base.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answer = out[0, ids.shape[1] :]
        rows.append((ids[0].tolist(), answer[: answer_length(answer, eos)].tolist()))
    return rows


@torch.no_grad()
def base_pairs(base, rows, top_k: int) -> list[dict]:
    """Per pair: the base's one-ahead top probability, and its two-ahead marginal's top probability (a lower bound)
    with the mass the top-k sum leaves out; whether each argmax is the answer's token."""
    pairs = []
    for prompt, answer in tqdm(rows, desc="base two-ahead marginals"):
        for j in range(0, len(answer) - 1, 2):
            out = base(torch.tensor([prompt + answer[:j]]), use_cache=True)
            first = out.logits[0, -1].float().softmax(-1)  # [V]
            weights, candidates = first.topk(top_k)  # [K]
            cache = output_cache(out)
            cache.batch_repeat_interleave(top_k)  # the context once, K candidates after it
            second = base(candidates[:, None], **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1].float()  # [K, V]
            marginal = (weights[:, None] * second.softmax(-1)).sum(0)  # [V]
            pairs.append(
                dict(
                    one=first.max().item(),
                    one_right=first.argmax().item() == answer[j],
                    two=marginal.max().item(),
                    two_missing=1.0 - weights.sum().item(),
                    two_right=marginal.argmax().item() == answer[j + 1],
                )
            )
    return pairs


@torch.no_grad()
def adapter_pairs(model, rows, pad_id: int) -> list[dict]:
    """Per pair: the diffusion model's top probability and whether its argmax is the answer's token, at j and j + 1
    with both masked (left padding, one batch per answer)."""
    mask = model.config.mask_token_id
    pairs = []
    for prompt, answer in tqdm(rows, desc="adapter predictions"):
        starts = list(range(0, len(answer) - 1, 2))
        if not starts:
            continue
        ids, attention = _left_padded([prompt + answer[:j] + [mask, mask] for j in starts], pad_id, "cpu")
        probs = model(input_ids=ids, attention_mask=attention).logits[:, -2:].float().softmax(-1)  # [N, 2, V]
        top, argmax = probs.max(-1)  # [N, 2]
        for row, j in enumerate(starts):
            pairs.append(
                dict(
                    one=top[row, 0].item(),
                    one_right=argmax[row, 0].item() == answer[j],
                    two=top[row, 1].item(),
                    two_missing=0.0,
                    two_right=argmax[row, 1].item() == answer[j + 1],
                )
            )
    return pairs


def figures(pairs: list[dict]) -> dict:
    """Shares per threshold, and the `prefix` sampler's tokens per forward at block 2 (a range for the base)."""
    count = len(pairs)
    result = {
        "pairs": count,
        "one_ahead_right": sum(p["one_right"] for p in pairs) / count,
        "two_ahead_right": sum(p["two_right"] for p in pairs) / count,
    }
    for threshold in THRESHOLDS:
        both_low = sum(p["one"] >= threshold and p["two"] >= threshold for p in pairs) / count
        both_high = sum(p["one"] >= threshold and p["two"] + p["two_missing"] >= threshold for p in pairs) / count
        result[str(threshold)] = {
            "one_ahead_reach": sum(p["one"] >= threshold for p in pairs) / count,
            "two_ahead_reach": sum(p["two"] >= threshold for p in pairs) / count,
            "tokens_per_forward": [2 / (2 - both_low), 2 / (2 - both_high)],
        }
    return result


def show(name: str, result: dict) -> None:
    for threshold in THRESHOLDS:
        shares = result[str(threshold)]
        low, high = shares["tokens_per_forward"]
        span = f"{low:.3f}" if abs(high - low) < 5e-4 else f"{low:.3f}-{high:.3f}"
        print(
            f"| {name} | {threshold} | {shares['one_ahead_reach']:.3f} | {shares['two_ahead_reach']:.3f} | "
            f"{result['one_ahead_right']:.3f} / {result['two_ahead_right']:.3f} | {span} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path("~/.cache/peft_diffusion/SmolLM2-135M-Instruct").expanduser()))
    parser.add_argument("--adapter", action="append", default=[], help="a saved diffusion adapter (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=8, help="next tokens summed over in the two-ahead marginal")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="a JSON file for the figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def load_base():
        return AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = load_base()
    rows = base_answers(base, tokenizer, args.max_new_tokens)
    results = {"base": figures(base_pairs(base, rows, args.top_k))}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for adapter in args.adapter:
        model = DiffusionLM.from_pretrained(adapter, base_model=load_base()).eval()  # loading resizes its base
        results[adapter] = figures(adapter_pairs(model, rows, pad_id))
    print(f"\n{Path(args.model).name}: {len(rows)} answers, {results['base']['pairs']} pairs of tokens, top-k "
          f"{args.top_k}, {time.perf_counter() - start:.0f} s")  # fmt: skip
    print("| model | threshold | one ahead reaches it | two ahead reaches it | argmax right (one / two ahead) | "
          "tokens/forward at block 2 (`prefix`) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        show("base (a perfect copy)" if name == "base" else name, result)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(args=vars(args), results=results), indent=1))


if __name__ == "__main__":
    main()
