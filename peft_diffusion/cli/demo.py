"""The demo after `convert`: chat answers beside the AR base (NFE, tokens/s), self-speculative decoding (block
attention: the adapter drafts, the base verifies, the text is the base's), an infilling example, the trajectory.

`generate` reuses the prompt and answer helpers (`chat_input_ids`, `answer_length`).
"""

from __future__ import annotations

import time

from .live import id_list, save_trajectory

DEFAULT_CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
)
# Infilling demo: a line of code whose middle is masked (the text after the gap stays fixed).
INFILL_EXAMPLE = ("def average(numbers):\n    return sum(numbers) / ", "len(numbers)", "\n")


def chat_input_ids(tokenizer, message: str):
    """`[1, P]` prompt ids of one user message under the tokenizer's chat template (plain text without one)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(message, return_tensors="pt").input_ids


def answer_length(tokens, eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first EOS (what a reader gets), from `tokens` `[N]`."""
    return next((index + 1 for index, token in enumerate(tokens.tolist()) if token in eos_ids), len(tokens))


def _eos_ids(model) -> set[int]:
    return set(id_list(model.generation_config.eos_token_id))


def run_demo(
    model,
    tokenizer,
    *,
    model_path,
    model_kwargs=None,
    max_new_tokens=48,
    threshold=0.9,
    trajectory_path=None,
    prompts=DEFAULT_CHAT_PROMPTS,
) -> dict:
    """Print chat generations of `model` beside its AR base (and, for block attention, self-speculative decoding:
    the model drafts, the base verifies), an infilling example; save the trajectory PNG.

    Returns the figures printed (`nfe_per_token`, `tokens_per_second` per decoding, the texts).
    """
    from transformers import AutoModelForCausalLM

    # the AR base: the checkpoint as it was before conversion (also after full finetuning)
    base = AutoModelForCausalLM.from_pretrained(model_path, **(model_kwargs or {})).eval()
    eos_ids = _eos_ids(base)
    # speculation needs block attention; a fully finetuned model has no adapter to switch off: the base verifies
    speculative = model.config.attention == "block"
    verifier = None if model.is_peft else base
    names = ("ar", "diffusion", "speculative") if speculative else ("ar", "diffusion")
    answers = []
    print(f"\n=== Generations ({max_new_tokens} new tokens at most, greedy) ===")
    for message in prompts:
        input_ids = chat_input_ids(tokenizer, message)  # [1, P]
        answer = _answer_both(base, model, tokenizer, message, input_ids, max_new_tokens, threshold, eos_ids)
        if speculative:
            answer["speculative"] = _answer_speculative(model, verifier, tokenizer, input_ids, max_new_tokens, eos_ids)
        answers.append(answer)
        ar_text, text = answer["ar"]["text"], answer["diffusion"]["text"]
        print(
            f"\n> {message}\n  AR base  : {_one_line(ar_text)}\n  diffusion: {_one_line(text)}  "
            f"[{answer['output'].nfe} forwards]"
        )
        if speculative:
            item = answer["speculative"]
            same = "identical to the AR base" if item["text"] == ar_text else "DIFFERS from the AR base"
            print(
                f"  speculative: {item['nfe']} base verifications + {item['drafter_forwards']} drafts for "
                f"{item['tokens']} tokens, {same}"
            )
    figures = {}
    for name in names:
        item = {key: sum(answer[name][key] for answer in answers) for key in ("nfe", "tokens", "seconds")}
        item["nfe_per_token"] = item["nfe"] / max(item["tokens"], 1)
        item["tokens_per_second"] = item["tokens"] / max(item["seconds"], 1e-9)
        figures[name] = item
    print(
        "\n=== Speed (same prompts, one thread count, batch 1) ===\n"
        f"  AR base (HF generate, KV cache): {figures['ar']['tokens_per_second']:.1f} tokens/s, "
        f"NFE/token {figures['ar']['nfe_per_token']:.2f}\n"
        f"  diffusion (threshold {threshold}): {figures['diffusion']['tokens_per_second']:.1f} tokens/s, "
        f"NFE/token {figures['diffusion']['nfe_per_token']:.2f}"
    )
    if speculative:
        item = figures["speculative"]
        print(
            f"  speculative (adapter drafts {model.config.attention_block_size} tokens, base verifies; the base's "
            f"text): {item['tokens_per_second']:.1f} tokens/s, base forwards/token {item['nfe_per_token']:.2f}"
        )
    figures["texts"] = [(answer["message"], answer["ar"]["text"], answer["diffusion"]["text"]) for answer in answers]
    figures["infill"] = infill_example(model, tokenizer)
    if trajectory_path is not None and answers:
        longest = max(answers, key=lambda answer: answer["diffusion"]["tokens"])  # the first of the longest
        out, count = longest["output"], longest["diffusion"]["tokens"]
        saved = save_trajectory(
            out.history,
            tokenizer,
            model.config.mask_token_id,
            trajectory_path,
            title=f"{longest['message']!r}: {count} tokens in {out.nfe} forwards",
            block_size=model.config.attention_block_size,
            offset=longest["prompt_length"],
        )
        if saved:
            print(f"\ntrajectory of the longest answer saved to {saved}")
    return figures


def _timed(call):
    """`(call(), seconds)`, without gradients."""
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        result = call()
        return result, time.perf_counter() - start


def _answer_both(base, model, tokenizer, message: str, input_ids, max_new_tokens: int, threshold, eos_ids) -> dict:
    """One chat message (`input_ids` `[1, P]`) answered by the AR base (HF `generate`, greedy) and by the diffusion
    model (with its denoising history): per model the forwards (`nfe`; one per token for AR), answer `tokens`,
    `seconds`, `text`."""
    prompt_length = input_ids.shape[1]
    ar, ar_seconds = _timed(
        lambda: base.generate(
            input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    )  # [1, P + N]
    out, seconds = _timed(
        lambda: model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            threshold=threshold,
            return_dict_in_generate=True,
            output_history=True,
        )
    )
    ar_new, new = ar[0, prompt_length:], out.sequences[0, prompt_length:]  # [N], [N]
    ar_count, count = answer_length(ar_new, eos_ids), answer_length(new, eos_ids)
    return {
        "message": message,
        "prompt_length": prompt_length,
        "output": out,
        "ar": {
            "nfe": ar_count,
            "tokens": ar_count,
            "seconds": ar_seconds,
            "text": _decode(tokenizer, ar_new, ar_count),
        },
        "diffusion": {"nfe": out.nfe, "tokens": count, "seconds": seconds, "text": _decode(tokenizer, new, count)},
    }


def _answer_speculative(model, verifier, tokenizer, input_ids, max_new_tokens: int, eos_ids: set[int]) -> dict:
    """One chat message (`input_ids` `[1, P]`) by self-speculative greedy decoding: `nfe` counts base verifications
    (each costs about an AR step), `drafter_forwards` the drafts; the text is the base's greedy text."""
    out, seconds = _timed(
        lambda: model.generate(
            input_ids, max_new_tokens=max_new_tokens, speculative=True, verifier=verifier, return_dict_in_generate=True
        )
    )
    new = out.sequences[0, input_ids.shape[1] :]  # [N]
    count = answer_length(new, eos_ids)
    return {
        "nfe": out.base_forwards,
        "drafter_forwards": out.drafter_forwards,
        "tokens": count,
        "seconds": seconds,
        "text": _decode(tokenizer, new, count),
    }


def _decode(tokenizer, tokens, count: int) -> str:
    return tokenizer.decode(tokens[:count], skip_special_tokens=True).strip()


def _one_line(text: str, width: int = 400) -> str:
    flat = " ".join(text.split("\n"))
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def split_at_tokens(tokenizer, prefix: str, middle: str, suffix: str):
    """The ids of `prefix + middle + suffix` tokenized as one text, split into `[1, P]`, `[1, G]`, `[1, S]`.

    Tokenizing the three pieces apart puts token boundaries where the text has none ("/ " + "len" gives `Ġ/ Ġ len`
    where the whole text gives `Ġ/ Ġlen`), and the model is then asked to continue after a token it never sees there.
    With a fast tokenizer the gap is every token that overlaps `middle` (a token that straddles the boundary joins the
    gap); a slow tokenizer (no offsets) falls back to tokenizing the pieces apart.
    """
    import torch

    if not getattr(tokenizer, "is_fast", False):
        pieces = [tokenizer(prefix).input_ids]
        pieces += [tokenizer(text, add_special_tokens=False).input_ids for text in (middle, suffix)]
        return tuple(torch.tensor([ids], dtype=torch.long) for ids in pieces)
    encoded = tokenizer(prefix + middle + suffix, return_offsets_mapping=True)
    start, end = len(prefix), len(prefix) + len(middle)
    ids, offsets = encoded.input_ids, encoded.offset_mapping
    # Special tokens (BOS) have the empty span (0, 0): they stay in the prefix.
    in_gap = [first < end and last > start and last > first for first, last in offsets]
    if not any(in_gap):
        raise ValueError(f"The infilling middle {middle!r} covers no token of the text.")
    lo = in_gap.index(True)
    hi = len(in_gap) - in_gap[::-1].index(True)
    return tuple(torch.tensor([ids[a:b]], dtype=torch.long) for a, b in ((0, lo), (lo, hi), (hi, len(ids))))


def infill_example(model, tokenizer, example=INFILL_EXAMPLE) -> dict:
    """Fill a masked span between fixed text and print it; honest about what the attention pattern can see.

    `DiffusionLM.infill`, one token per forward, most confident first. Bidirectional / annealed models read the whole
    suffix. Block attention: a block-causal model sees the text after a gap only inside the gap's own block, so the
    input is the prefix, the gap and the suffix up to the end of that block (later blocks could not influence the
    gap anyway).
    """
    import torch

    prefix, middle, suffix = example
    prefix_ids, middle_ids, suffix_ids = split_at_tokens(tokenizer, prefix, middle, suffix)  # [1, P], [1, G], [1, S]
    prefix, middle = tokenizer.decode(prefix_ids[0], skip_special_tokens=True), tokenizer.decode(middle_ids[0])
    suffix = tokenizer.decode(suffix_ids[0])
    mask_token_id = model.config.mask_token_id
    num_prefix, gap = prefix_ids.shape[1], middle_ids.shape[1]
    grid = model.config.attention_block_size
    if grid is not None:
        # The gap's last block must hold some of the text after it: move the gap's last tokens into the fixed text
        # until it does (the reference shrinks accordingly), then drop the text beyond that block.
        while gap > 1 and (num_prefix + gap) % grid == 0:
            suffix_ids = torch.cat([middle_ids[:, -1:], suffix_ids], dim=1)
            middle_ids, gap = middle_ids[:, :-1], gap - 1
        block_end = ((num_prefix + gap - 1) // grid + 1) * grid
        suffix_ids = suffix_ids[:, : block_end - num_prefix - gap]
        middle = tokenizer.decode(middle_ids[0])
        suffix = tokenizer.decode(suffix_ids[0])
    input_ids = torch.cat([prefix_ids, torch.full((1, gap), mask_token_id), suffix_ids], dim=1)  # [1, T]
    with torch.no_grad():
        out = model.infill(input_ids, return_dict_in_generate=True)
    filled, nfe = out.sequences, out.nfe
    answer = tokenizer.decode(filled[0, num_prefix : num_prefix + gap])
    right = tokenizer.decode(suffix_ids[0])
    print("\n=== Infilling (the gap holds as many mask tokens as the reference) ===")
    print(f"  text     : {prefix!r} [{gap} masked tokens] {suffix!r}")
    print(f"  filled   : {answer!r}   (reference {middle!r}, {nfe} forwards)")
    if grid is not None:
        print(
            f"  note     : block attention (block_size {grid}) sees the text after the gap only inside the gap's "
            f"block, here {suffix_ids.shape[1]} token(s) {right!r}; infilling with the whole suffix needs "
            "--attention bidirectional (or annealed)."
        )
    return {"filled": answer, "reference": middle, "nfe": nfe, "right_context": right}
