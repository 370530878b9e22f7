"""One point of the conversion learning curve: train a LoRA conversion for a wall-clock budget, then measure it
against its own base (docs/conversion.md).

Training: `DiffusionTrainer` with the CLI's quick-start settings (block attention with clean context, shift, LoRA r=32
on every linear layer, lr 1e-3 cosine on the clock, batch 2, packing) for `--minutes` of training, on
  - `self_distilled`: the base's own chat answers (`self_distilled_dataset`, answers cut at 128 tokens trimmed to a
    sentence end; built once and cached), or
  - `stdlib`: the standard-library text sample,
optionally with the AR teacher (`--teacher-weight`).

Measured after training, each beside the base model in the same run:
  - held-out NLL (nats/token) on the first `--eval-texts` 600-character chunks of standard-library modules never
    trained on (`stdlib_texts(skip=100)`, each cut at 128 tokens): the diffusion model's Monte-Carlo ELBO bound (8
    samples) against the base's exact NLL on the same windows (a model without a chat template, e.g. stories260K:
    the real stories of ../shared/data/tinystories_sample.txt instead);
  - LAMBADA (first `--lambada` items of ../shared/data/lambada_test.jsonl): last-word accuracy, the base by greedy
    argmax of every target token, the diffusion model by its one-step greedy decoding of the masked word
    (`is_greedy`, as lm-eval's lambada), and the mean log-likelihood of the word (left-to-right estimator);
  - the chat prompts (story openings without a chat template): answers of the base (HF greedy) and of the diffusion
    model at thresholds 0.9 and 0.7 (with `--sampler`, by default the one `convert` saves), with tokens per
    forward, generative perplexity under the base and distinct-2 of the answers.

    python benchmarks/conversion.py --data self_distilled --minutes 5 --out runs/curve --save-adapter runs/sd5
    python benchmarks/conversion.py --adapter runs/sd5 --out runs/curve      # evaluate a saved point again
    python benchmarks/conversion.py --data stdlib --minutes 5 --teacher-weight 1.0 --out runs/curve
    python benchmarks/conversion.py --model ../shared/models/stories260K --lambada 0 --minutes 5 --out runs/curve

One seed moves a 10-minute point more than most settings do (docs/conversion.md), so compare settings over seeds:
run each point with `--seed 0`, `--seed 1`, ... into one folder, then `--summary` prints, per setting (the run name
without its seed), the mean and the range over its seeds of every figure, and how many of the four checkable chat
answers are right (`ANSWER_CHECKS`: the capital, the square function, the boiling point, two primary colours):

    python benchmarks/conversion.py --data self_distilled --minutes 10 --seed 1 --out runs/curve
    python benchmarks/conversion.py --summary runs/curve
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without an install

from speculative import STORY_PROMPTS  # noqa: E402  (benchmarks/ is the script's folder)

from peft_diffusion.cli.defaults import CONVERT_DECODING  # noqa: E402

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
    "What is the boiling point of water in Celsius?",
    "Name two primary colors.",
    "Explain in one sentence what a noun is.",
]
# `--prompts heldout`: 24 more chat prompts (none in the self-distilled data, which the base wrote from its own
# instructions): enough answers that one odd answer does not move the generative perplexity by a third.
HELDOUT_PROMPTS = [
    "What is the largest planet in our solar system?", "Give two reasons to learn a second language.",
    "Write a Python function that reverses a string.", "What do bees make?", "How many days are in a week?",
    "Describe a cat in one sentence.", "What is photosynthesis?", "Suggest a name for a pet goldfish.",
    "Why is the sky blue?", "List three fruits that are red.", "What is the opposite of hot?",
    "Write a haiku about the sea.", "How do you make a cup of tea?", "What is the capital of Japan?",
    "Explain what a computer is to a child.", "What is 2 plus 2?", "Give me a tip for sleeping better.",
    "What language is spoken in Brazil?", "Write a short greeting for a birthday card.", "What is a verb?",
    "Name a famous painter.", "Why do we need water?", "Write a Python function that adds two numbers.",
    "What is the freezing point of water in Fahrenheit?",
]  # fmt: skip

# Chat answers a script can judge (by `CHAT_PROMPTS` index): the capital, a square function (`x ** 2`, `x * x` or
# `pow(x, 2)`), the boiling point, two primary colours. The tips and the noun sentence need a reader.
ANSWER_CHECKS = {
    0: lambda answer: "paris" in answer.lower(),
    2: lambda answer: re.search(r"\*\*\s*2\b|\b(\w+)\s*\*\s*\1\b|pow\(\s*\w+\s*,\s*2\s*\)", answer) is not None,
    3: lambda answer: re.search(r"\b100\b", answer) is not None,
    4: lambda answer: sum(colour in answer.lower() for colour in ("red", "blue", "yellow", "green")) >= 2,
}
# The same for `HELDOUT_PROMPTS` (by index): facts the base knows (the planet, bees, the week, the opposite of hot,
# Japan's capital, 2 + 2, Brazil's language, water's freezing point) and two small functions.
HELDOUT_CHECKS = {
    0: lambda answer: "jupiter" in answer.lower(),
    2: lambda answer: re.search(r"\[\s*::\s*-1\s*\]|reversed\(", answer) is not None,
    3: lambda answer: re.search(r"\bhoney\b", answer.lower()) is not None,
    4: lambda answer: re.search(r"\b(7|seven)\b", answer.lower()) is not None,
    10: lambda answer: "cold" in answer.lower(),
    13: lambda answer: "tokyo" in answer.lower(),
    15: lambda answer: re.search(r"\b(4|four)\b", answer.lower()) is not None,
    17: lambda answer: "portuguese" in answer.lower(),
    22: lambda answer: re.search(r"return\s+\(?\s*(\w+)\s*\+\s*(\w+)", answer) is not None,
    23: lambda answer: re.search(r"\b32\b", answer) is not None,
}


def build_dataset(args, base, tokenizer):
    from datasets import Dataset

    from peft_diffusion import DistillationStats, self_distilled_dataset
    from peft_diffusion.sources import stdlib_texts

    if args.data == "stdlib":
        return Dataset.from_dict({"text": stdlib_texts(100)}), "100 standard-library modules"
    start = time.perf_counter()
    dataset = self_distilled_dataset(
        base, tokenizer, num_examples=args.distill_examples, max_new_tokens=128, cut_completions="trim"
    )
    stats = DistillationStats.from_dataset(dataset)
    source = f"self-distilled ({stats.summary()}; loaded in {time.perf_counter() - start:.0f} s)"
    if args.text_share:
        from peft_diffusion import mix_plain_text

        rows = len(dataset)
        dataset = mix_plain_text(dataset, tokenizer, share=args.text_share, seed=args.seed)
        source += f", plus {len(dataset) - rows} standard-library windows (share {args.text_share:g})"
    return dataset, source


def train(args, tokenizer, dataset, output_dir):
    from peft import LoraConfig

    from peft_diffusion import DiffusionConfig, DiffusionTrainer, DiffusionTrainingConfig

    training = DiffusionTrainingConfig(
        output_dir=output_dir,
        max_steps=100_000,
        max_train_minutes=args.minutes,
        per_device_train_batch_size=2,
        max_length=256 if args.data == "self_distilled" else 128,
        packing=True,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        teacher_weight=args.teacher_weight,
        teacher_positions=args.teacher_positions,
        certainty_weight=args.certainty_weight,
        model_init_kwargs={"attn_implementation": "sdpa"},
    )
    trainer = DiffusionTrainer(
        args.model,
        args=training,
        train_dataset=dataset,
        processing_class=tokenizer,
        diffusion_config=DiffusionConfig(
            attention="block",
            block_size=args.block_size,
            shift=True,
            masking=args.masking,
            masking_strength=args.masking_strength,
            causal_first_token=bool(args.causal_first_token),
        ),
        peft_config=LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
    )
    start = time.perf_counter()
    result = trainer.train()
    return trainer.model.eval(), {
        "steps": result.global_step,
        "train_minutes": (time.perf_counter() - start) / 60,
        "final_loss": result.training_loss,
    }


@torch.no_grad()
def heldout_nll(model, tokenizer, num_texts: int) -> dict:
    from peft_diffusion import ar_nll_per_token, nll_per_token
    from peft_diffusion.sources import stdlib_texts

    if tokenizer.chat_template:
        texts = stdlib_texts(num_texts, chunk_chars=600, skip=100)[:num_texts]  # the first chunks of unseen modules
    else:  # a base model (stories260K): the real stories of ../shared/data, never in its conversion data
        stories = (REPO.parent / "shared" / "data" / "tinystories_sample.txt").read_text(encoding="utf-8")
        texts = [story.strip() for story in stories.split("\n\n") if story.strip()][:num_texts]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer(text, add_special_tokens=False).input_ids[:128] for text in texts]
    bound = nll_per_token(model, ids, prefix_token_id=prefix, max_length=256, mc_samples=8, batch_size=16,
                          generator=torch.Generator().manual_seed(0), progress=True)  # fmt: skip
    # the exact NLL of the model's one-token-per-step left-to-right sampler (deterministic; not a bound)
    ltr = nll_per_token(model, ids, prefix_token_id=prefix, max_length=256, batch_size=16, estimator="left_to_right",
                        progress=True)  # fmt: skip
    with model.model.disable_adapter():
        exact = ar_nll_per_token(model.causal_lm, ids, prefix, 256)
    return {
        "diffusion_bound": bound.nll,
        "bound_stderr": bound.stderr,
        "base_exact": exact,
        "gap": bound.nll - exact,
        "left_to_right": ltr.nll,
        "left_to_right_gap": ltr.nll - exact,
    }


def raw_text_sets(count: int = 12) -> dict[str, list[str]]:
    """Plain text of three kinds that no conversion trains on: stories, Wikipedia paragraphs, code (HumanEval
    prompts), from ../shared/data (missing files are left out)."""
    import gzip
    import random

    data = REPO.parent / "shared" / "data"
    sets = {}
    if (data / "tinystories_sample.txt").is_file():
        lines = (data / "tinystories_sample.txt").read_text(encoding="utf-8").split("\n")
        sets["stories"] = [line.strip() for line in lines if len(line.strip()) > 150]
    if (data / "wikitext2_valid.tokens.txt").is_file():
        lines = (data / "wikitext2_valid.tokens.txt").read_text(encoding="utf-8").split("\n")
        sets["wiki"] = [line.strip() for line in lines if len(line.strip()) > 400 and not line.startswith(" =")]
    if (data / "HumanEval.jsonl.gz").is_file():
        with gzip.open(data / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as handle:
            sets["code"] = [json.loads(line)["prompt"].strip() for line in handle]
    rng = random.Random(0)
    return {name: rng.sample(texts, min(count, len(texts))) for name, texts in sets.items()}


@torch.no_grad()
def raw_text_fidelity(model, tokenizer, lengths=(3, 6, 12, 24, 48)) -> dict:
    """How far the converted model's next-token distribution is from its base's on plain text (no chat template),
    after the first n tokens of a text: KL(base || diffusion) in nats and top-1 agreement, per kind and length.

    The diffusion model predicts the token after the n given ones as in decoding (one mask token appended); the base
    reads the same n tokens. Short contexts are where chat-only training leaves the model least tied to its base.
    """
    mask_id = model.config.mask_token_id
    figures = {}
    for name, texts in raw_text_sets().items():
        kl, agree = {n: [] for n in lengths}, {n: [] for n in lengths}
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids  # [1, T]
            for n in lengths:
                if n >= ids.shape[1]:
                    continue
                context = ids[:, :n]
                noisy = torch.cat([context, torch.full((1, 1), mask_id)], dim=1)
                diffusion = model(input_ids=noisy).logits[0, -1]  # [V]
                with model.model.disable_adapter():
                    base = model.causal_lm(input_ids=context).logits[0, -1]  # [V]
                keep = torch.arange(base.shape[0]) != mask_id  # the mask token is never a prediction (any id)
                diffusion, base = diffusion[keep].log_softmax(-1), base[keep].log_softmax(-1)  # [V - 1]
                kl[n].append(float((base.exp() * (base - diffusion)).sum()))
                agree[n].append(float(base.argmax() == diffusion.argmax()))
        figures[name] = {
            str(n): {"kl": statistics.mean(kl[n]), "agree": statistics.mean(agree[n])} for n in lengths if kl[n]
        }
    cells = [cell for kind in figures.values() for cell in kind.values()]
    short = [cell for kind in figures.values() for n, cell in kind.items() if int(n) <= 12]
    figures["mean_kl"] = statistics.mean(cell["kl"] for cell in cells) if cells else None
    figures["mean_kl_short"] = statistics.mean(cell["kl"] for cell in short) if short else None
    figures["mean_agree"] = statistics.mean(cell["agree"] for cell in cells) if cells else None
    return figures


def lambada_items(limit: int) -> list[tuple[str, str]]:
    path = REPO.parent / "shared" / "data" / "lambada_test.jsonl"
    items = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            context, word = text.rsplit(" ", 1)
            items.append((context, " " + word))
            if len(items) == limit:
                break
    return items


@torch.no_grad()
def lambada(model, tokenizer, limit: int) -> dict:
    from peft_diffusion.evaluation import loglikelihood_batch

    pairs = []
    for context, word in lambada_items(limit):
        whole = tokenizer(context + word, add_special_tokens=False).input_ids
        cut = len(tokenizer(context, add_special_tokens=False).input_ids)
        pairs.append((whole[:cut], whole[cut:]))
    estimates = loglikelihood_batch(model, pairs, estimator="left_to_right", batch_size=16, progress=True)
    base_hits = 0
    with model.model.disable_adapter():
        for context_ids, word_ids in pairs:
            ids = torch.tensor([context_ids + word_ids])
            logits = model.causal_lm(input_ids=ids).logits[0]  # [L, V]
            predicted = logits[len(context_ids) - 1 : -1].argmax(-1).tolist()
            base_hits += predicted == word_ids
    return {
        "items": len(pairs),
        "base_accuracy": base_hits / len(pairs),
        "diffusion_accuracy": sum(estimate.is_greedy for estimate in estimates) / len(pairs),
        "diffusion_ltr_logprob": sum(estimate.logprob for estimate in estimates) / len(pairs),
    }


def prompts(tokenizer, which: str = "benchmark") -> list[str]:
    """The chat questions (`CHAT_PROMPTS`, or `HELDOUT_PROMPTS` for `which="heldout"`) for a model with a chat
    template, story openings (plain text) for one without."""
    if not tokenizer.chat_template:
        return STORY_PROMPTS
    return HELDOUT_PROMPTS if which == "heldout" else CHAT_PROMPTS


@torch.no_grad()
def chat(model, tokenizer, max_new_tokens: int, sampler: str, messages: list[str]) -> dict:
    from peft_diffusion.cli.demo import answer_length, chat_input_ids
    from peft_diffusion.cli.live import id_list
    from peft_diffusion.data import distinct_n
    from peft_diffusion.metrics import generative_perplexity

    eos_ids = {tokenizer.eos_token_id, *id_list(model.generation_config.eos_token_id)}
    eos_ids = {int(i) for i in eos_ids if i is not None}
    results = {"base": [], "0.9": [], "0.7": []}
    counts = {"0.9": [0, 0], "0.7": [0, 0]}  # tokens, forwards
    for message in messages:
        input_ids = chat_input_ids(tokenizer, message)
        length = input_ids.shape[1]
        with model.model.disable_adapter():
            ar = model.causal_lm.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)[0, length:]  # fmt: skip
        results["base"].append(tokenizer.decode(ar[: answer_length(ar, eos_ids)], skip_special_tokens=True).strip())
        for threshold in ("0.9", "0.7"):
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, threshold=float(threshold),
                                 sampler=sampler, return_dict_in_generate=True)  # fmt: skip
            new = out.sequences[0, length:]
            count = answer_length(new, eos_ids)
            counts[threshold][0] += count
            counts[threshold][1] += out.nfe
            results[threshold].append(tokenizer.decode(new[:count], skip_special_tokens=True).strip())
    with model.model.disable_adapter():
        evaluator = model.causal_lm
        figures = {}
        for name, texts in results.items():
            kept = [text for text in texts if text]
            ids = [tokenizer(text, add_special_tokens=False).input_ids for text in kept]
            figures[name] = {
                "gen_ppl": generative_perplexity(kept, evaluator, tokenizer) if kept else math.inf,
                "distinct2": sum(distinct_n(i, 2) for i in ids) / max(len(ids), 1),
                "tokens_per_forward": counts[name][0] / max(counts[name][1], 1) if name in counts else 1.0,
                "answers": texts,
            }
    return figures


def run_name(args: dict, seed: bool = True) -> str:
    """The model, the data and every setting that departs from the recipe, so that runs never share a file; without
    `seed`, the setting that `--summary` groups seeds under."""
    parts = [Path(args["model"]).name, args["data"], f"b{args['block_size']}"]
    parts += [f"posdep{args['masking_strength']:g}"] if args.get("masking") == "position_dependent" else []
    parts += ["first_masked"] if args.get("teacher_positions") == "first_masked" else []
    parts += [f"t{args['teacher_weight']:g}"]
    parts += [f"text{args['text_share']:g}"] if args.get("text_share") else []
    parts += ["causal_first"] if args.get("causal_first_token") else []
    parts += [f"certainty{args['certainty_weight']:g}"] if args.get("certainty_weight") else []
    parts += [f"{args['minutes']:g}min"]
    sampler = args.get("sampler", "confidence")  # files written before --sampler decoded with `confidence`
    parts += [] if sampler == CONVERT_DECODING["sampler"] else [sampler]
    parts += ["heldout_prompts"] if args.get("prompts") == "heldout" else []
    parts += ["adapter"] if args.get("adapter") else []  # a saved point: its budget and seed are unknown here
    return "-".join(parts + ([f"seed{args['seed']}"] if seed and args["seed"] else []))


def answers_right(result: dict, which: str) -> float | None:
    """The share of the checkable answers (`ANSWER_CHECKS` for `CHAT_PROMPTS`, `HELDOUT_CHECKS` for
    `HELDOUT_PROMPTS`) among the `which` answers ("base", "0.9", "0.7") of one run that pass; None for other
    prompts (story openings)."""
    prompts_used = result.get("prompts", CHAT_PROMPTS)  # files written before "prompts" was stored: chat runs only
    answers = result["chat"][which]["answers"]
    for prompts, checks in ((CHAT_PROMPTS, ANSWER_CHECKS), (HELDOUT_PROMPTS, HELDOUT_CHECKS)):
        if prompts_used == prompts and len(answers) == len(prompts):
            return sum(check(answers[index]) for index, check in checks.items()) / len(checks)
    return None


def summary(folder: str) -> None:
    """Per setting (the run's arguments but its seed), the mean and range over seeds of each figure."""
    groups: dict[str, list[dict]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        result = json.loads(path.read_text())
        if "heldout_nll" not in result:
            continue  # not a conversion.py point
        groups.setdefault(run_name(result["args"], seed=False), []).append(result)
    if not groups:
        raise SystemExit(f"--summary: no conversion.py results (*.json) in {folder}")
    figures = {
        "steps": lambda r: r["training"]["steps"],
        "bound gap": lambda r: r["heldout_nll"] and r["heldout_nll"]["gap"],
        "LTR gap": lambda r: r["heldout_nll"] and r["heldout_nll"]["left_to_right_gap"],
        "LAMBADA (base)": lambda r: r["lambada"] and r["lambada"]["diffusion_accuracy"],
        "tok/fwd @0.9": lambda r: r["chat"]["0.9"]["tokens_per_forward"],
        "gen PPL @0.9": lambda r: r["chat"]["0.9"]["gen_ppl"],
        "distinct-2 @0.9": lambda r: r["chat"]["0.9"]["distinct2"],
        "answers right @0.9": lambda r: answers_right(r, "0.9"),
    }
    base = {"LAMBADA (base)": lambda r: r["lambada"] and r["lambada"]["base_accuracy"],
            "gen PPL @0.9": lambda r: r["chat"]["base"]["gen_ppl"],
            "distinct-2 @0.9": lambda r: r["chat"]["base"]["distinct2"],
            "answers right @0.9": lambda r: answers_right(r, "base")}  # fmt: skip

    def cell(values: list) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"

        def number(value: float) -> str:
            return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"

        low, high = min(values), max(values)
        mean = number(statistics.fmean(values))
        return mean if low == high else f"{mean} ({number(low)}-{number(high)})"

    print("| setting | seeds | " + " | ".join(figures) + " |")
    print("|---|---:|" + "---|" * len(figures))
    for name, results in groups.items():
        row = []
        for figure, get in figures.items():
            text = cell([get(r) for r in results])
            if figure in base:
                text += f" vs {cell([base[figure](r) for r in results])}"
            row.append(text)
        print(f"| {name} | {len(results)} | " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the CLI's SmolLM2-135M-Instruct folder")
    parser.add_argument("--data", choices=["self_distilled", "stdlib"], default="self_distilled")
    parser.add_argument("--distill-examples", type=int, default=128)
    parser.add_argument("--teacher-weight", type=float, default=0.0)
    parser.add_argument("--teacher-positions", default="masked")
    parser.add_argument("--certainty-weight", type=float, default=0.0, help="dParallel's certainty forcing (0: off)")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--masking", choices=["uniform", "position_dependent"], default="uniform")
    parser.add_argument("--masking-strength", type=float, default=0.0, help="position_dependent only")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-texts", type=int, default=24, help="held-out windows (600-character chunks; 0: skip)")
    parser.add_argument("--prompts", choices=["benchmark", "heldout"], default="benchmark",
                        help="chat prompts: the 6 of CHAT_PROMPTS or the 24 of HELDOUT_PROMPTS")  # fmt: skip
    parser.add_argument("--lambada", type=int, default=100)
    parser.add_argument("--raw-text", type=int, default=1, help="1: measure plain-text fidelity to the base; 0: skip")
    parser.add_argument("--causal-first-token", type=int, default=0, help="1: DiffusionConfig(causal_first_token)")
    parser.add_argument("--text-share", type=float, default=0.0, help="share of plain-text windows in the data")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--sampler", default=CONVERT_DECODING["sampler"], help="of the chat answers (default: convert's)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-adapter", default=None)
    parser.add_argument("--adapter", default=None, help="evaluate this saved adapter instead of training one")
    parser.add_argument("--out", default="runs/conversion")
    parser.add_argument("--summary", default=None, metavar="FOLDER", help="only summarise the results in FOLDER")
    args = parser.parse_args()
    if args.summary:
        return summary(args.summary)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from peft_diffusion.cli.defaults import default_model_path

        args.model = default_model_path()
    name = run_name(vars(args))
    if args.adapter:  # a saved point: evaluate only (the settings in the name are the caller's word)
        from peft_diffusion import DiffusionLM

        tokenizer = AutoTokenizer.from_pretrained(args.adapter)
        base = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa")
        model = DiffusionLM.from_pretrained(args.adapter, base_model=base).eval()
        source, training = f"saved adapter {args.adapter}", {"steps": None, "train_minutes": None, "final_loss": None}
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model).eval()
        dataset, source = build_dataset(args, base, tokenizer)
        del base
        print(f"[{name}] data: {source}", flush=True)
        with tempfile.TemporaryDirectory() as output_dir:
            model, training = train(args, tokenizer, dataset, output_dir)
    if args.save_adapter:
        model.save_pretrained(args.save_adapter)
        tokenizer.save_pretrained(args.save_adapter)
    start = time.perf_counter()
    result = {
        "name": name,
        "args": vars(args),
        "data": source,
        "training": training,
        "heldout_nll": heldout_nll(model, tokenizer, args.eval_texts) if args.eval_texts else None,
        "lambada": lambada(model, tokenizer, args.lambada) if args.lambada else None,
        "raw_text": raw_text_fidelity(model, tokenizer) if args.raw_text else None,
        "chat": chat(model, tokenizer, args.max_new_tokens, args.sampler, prompts(tokenizer, args.prompts)),
        "prompts": prompts(tokenizer, args.prompts),
    }
    result["eval_minutes"] = (time.perf_counter() - start) / 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    nll, lam, gen = result["heldout_nll"], result["lambada"], result["chat"]
    print(
        f"| {name} | {training['steps']} "
        + (f"| {nll['diffusion_bound']:.2f} vs {nll['base_exact']:.2f} " if nll else "| - ")
        + (f"| {nll['left_to_right']:.2f} (gap {nll['left_to_right_gap']:.2f}) " if nll else "| - ")
        + (f"| {lam['diffusion_accuracy']:.2f} vs {lam['base_accuracy']:.2f} " if lam else "| - ")
        + f"| {gen['0.9']['tokens_per_forward']:.2f} / {gen['0.7']['tokens_per_forward']:.2f} "
        f"| {gen['0.9']['gen_ppl']:.1f} / {gen['0.7']['gen_ppl']:.1f} vs {gen['base']['gen_ppl']:.1f} "
        f"| {gen['0.9']['distinct2']:.2f} vs {gen['base']['distinct2']:.2f} |"
    )
    raw = result["raw_text"]
    if raw:
        print(f"plain-text KL to the base: {raw['mean_kl']:.2f} (contexts <= 12 tokens: {raw['mean_kl_short']:.2f}), "
              f"top-1 agreement {raw['mean_agree']:.2f}")  # fmt: skip
    for message, base_answer, answer in zip(result["prompts"], gen["base"]["answers"], gen["0.9"]["answers"]):
        print(f"> {message}\n  base: {base_answer[:160]!r}\n  0.9 : {answer[:160]!r}")


if __name__ == "__main__":
    main()
