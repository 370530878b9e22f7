"""Shared pieces of the small-scale replication (`benchmarks/replication/*.py`).

The replication runs on `../shared/models/stories260K` (karpathy's 260K-parameter TinyStories Llama, vocab 512,
context 512). The shared TinyStories sample holds only five stories (about 1.8K tokens), far too few to train on, so
the training corpus is stories sampled from the AR checkpoint itself (temperature 1, from BOS; the checkpoint separates
stories with BOS, so each sampled row is cut there and only complete stories are kept). Held-out sets:
  - `heldout`: sampled stories never used for training (same distribution as the training data);
  - `real`: the five real TinyStories of `../shared/data/tinystories_sample.txt` (never trained on).
The corpus is cached as JSON (`--cache`, default `/tmp/peft_diffusion_replication`) and is a deterministic function
of the seed.

Everything goes through the public API: `get_diffusion_model`, `DiffusionTrainer` / `DiffusionTrainingConfig`,
`generate` / `infill`, `peft_diffusion.evaluation.nll_per_token` and `peft_diffusion.metrics.generative_perplexity`;
the papers' task metrics are `metrics.py` here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
MODEL_DIR = SHARED / "models" / "stories260K"
STORIES_TXT = SHARED / "data" / "tinystories_sample.txt"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "peft_diffusion_replication"
DOCS_DIR = REPO / "docs" / "replication"

try:  # run from a source checkout without an install
    import peft_diffusion  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))


def require_shared() -> None:
    """Exit with one clear line when the shared checkpoint or data are absent."""
    missing = [str(path) for path in (MODEL_DIR, STORIES_TXT) if not path.exists()]
    if missing:
        sys.exit(f"error: the replication needs {', '.join(missing)} (the checkpoint and data of ../shared).")


def require_matplotlib():
    """`matplotlib.pyplot` with the non-interactive backend, or exit with an install hint."""
    try:
        import matplotlib
    except ImportError:
        sys.exit('error: plots need matplotlib: `pip install matplotlib` (or `pip install -e ".[demo]"`).')
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def set_threads(num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))


# ----------------------------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------------------------


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def load_ar(attn_implementation: str = "sdpa"):
    """A fresh copy of the AR checkpoint (eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation=attn_implementation).eval()


def random_init_like_ar(seed: int, attn_implementation: str = "sdpa"):
    """The same architecture as the checkpoint, randomly initialised (transformers' default init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(MODEL_DIR)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def real_stories() -> list[str]:
    """The five real TinyStories of the shared sample."""
    text = STORIES_TXT.read_text(encoding="utf-8")
    return [story.strip() for story in text.split("<|endoftext|>") if story.strip()]


@torch.no_grad()
def sample_stories(model, tokenizer, count: int, *, seed: int, row_tokens: int = 512, batch_size: int = 64):
    """`count` complete stories sampled from the AR model (temperature 1), cut at the BOS separators it emits."""
    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id
    stories: list[str] = []
    while len(stories) < count:
        start = torch.full((batch_size, 1), bos)
        out = model.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=row_tokens,
            pad_token_id=tokenizer.eos_token_id,
        )  # [b, 1 + row_tokens]
        for row in out[:, 1:].tolist():
            # Complete stories only: each one ends where the model starts the next with BOS.
            pieces, current = [], []
            for token in row:
                if token == bos:
                    pieces.append(current)
                    current = []
                else:
                    current.append(token)
            for piece in pieces:
                text = tokenizer.decode(piece, skip_special_tokens=True).strip()
                if len(piece) >= 16 and text:
                    stories.append(text)
    return stories[:count]


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    real: list[str]

    def num_tokens(self, tokenizer, split: str) -> int:
        return sum(len(ids) for ids in tokenizer(getattr(self, split), add_special_tokens=False)["input_ids"])


def load_corpus(cache: Path, *, num_train: int = 3000, num_heldout: int = 200, seed: int = 1234) -> Corpus:
    """The training / held-out stories (sampled once from the AR model, then read from `cache`) and the real ones."""
    path = Path(cache) / f"corpus_{num_train}_{num_heldout}_{seed}.json"
    if path.exists():
        data = json.loads(path.read_text())
    else:
        tokenizer = load_tokenizer()
        started = time.time()
        stories = sample_stories(load_ar(), tokenizer, num_train + num_heldout, seed=seed)
        data = {"train": stories[:num_train], "heldout": stories[num_train:]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        print(f"sampled {len(stories)} stories from the AR model in {time.time() - started:.0f}s -> {path}")
    return Corpus(train=data["train"], heldout=data["heldout"], real=real_stories())


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One conversion run: the diffusion settings, the initialisation, the adapter and the optimisation budget."""

    name: str
    init: str = "ar"  # "ar" (the pretrained checkpoint) or "random" (same architecture, random weights)
    attention: str = "bidirectional"
    block_size: int = 16
    clean_context: bool = True
    shift: bool = True
    masking: str = "uniform"
    masking_strength: float = 0.0
    lora_r: int = 0  # 0: full finetuning
    anneal_steps: int = 0
    learning_rate: float = 1e-3
    max_steps: int = 300
    batch_size: int = 16
    max_length: int = 128
    warmup_steps: int = 20
    eval_steps: int = 50
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.max_length


def diffusion_config_of(spec: RunSpec):
    from peft_diffusion import DiffusionConfig

    return DiffusionConfig(
        attention=spec.attention,
        block_size=spec.block_size,
        clean_context=spec.clean_context,
        shift=spec.shift,
        masking=spec.masking,
        masking_strength=spec.masking_strength,
    )


def train(spec: RunSpec, corpus: Corpus, output_dir: Path, *, eval_texts: list[str] | None = None):
    """Train one run with `DiffusionTrainer`; returns `(model, curve)` with the held-out eval bound along training.

    `curve` is a list of `{"step", "tokens", "eval_nll_bound"}`: the trainer's evaluation (the per-token ELBO with one
    fixed noise draw per held-out row, identical across checkpoints and runs) every `eval_steps`, step 0 included.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from peft_diffusion import DiffusionTrainer, DiffusionTrainingConfig

    tokenizer = load_tokenizer()
    base = load_ar() if spec.init == "ar" else random_init_like_ar(spec.seed)
    peft_config = None
    if spec.lora_r:
        peft_config = LoraConfig(
            r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=0.0, target_modules="all-linear"
        )
    args = DiffusionTrainingConfig(
        output_dir=str(output_dir),
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=32,
        max_length=spec.max_length,
        packing=True,
        # Fixed-length rows of `max_length` (stories concatenated with EOS, as in the papers' packing). TRL's default
        # "bfd" strategy is padding-free: one flattened row with a block-diagonal mask, 9-20x slower on CPU here.
        packing_strategy="wrapped",
        learning_rate=spec.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=spec.warmup_steps,
        weight_decay=0.0,
        anneal_steps=spec.anneal_steps,
        eval_strategy="steps",
        eval_steps=spec.eval_steps,
        logging_steps=spec.eval_steps,
        save_strategy="no",
        report_to="none",
        seed=spec.seed,
        data_seed=spec.seed,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # The curves use the first 100 held-out stories (~32K tokens); final figures score all of them (`diffusion_nll`).
    eval_dataset = Dataset.from_dict({"text": eval_texts if eval_texts is not None else corpus.heldout[:100]})
    trainer = DiffusionTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_dict({"text": corpus.train}),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        diffusion_config=diffusion_config_of(spec),
        peft_config=peft_config,
    )

    curve: list[dict] = []

    class Record(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            curve.append(
                {
                    "step": state.global_step,
                    "tokens": state.global_step * spec.tokens_per_step,
                    "eval_nll_bound": metrics["eval_nll_bound"],
                }
            )

    trainer.add_callback(Record())
    started = time.time()
    trainer.evaluate()
    trainer.train()
    if not curve or curve[-1]["step"] != spec.max_steps:
        trainer.evaluate()
    model = trainer.model.eval()
    model.train_seconds = time.time() - started
    return model, curve


def run_dir(models: Path, spec: RunSpec) -> Path:
    return Path(models) / f"{spec.name}-{spec.max_steps}steps-seed{spec.seed}"


def get_trained(spec: RunSpec, corpus: Corpus, models: Path, *, log=print):
    """The trained model of `spec` and its curve: loaded from `models/<name>-seed<k>` or trained and saved there."""
    from peft_diffusion import DiffusionLM

    folder = run_dir(models, spec)
    record = folder / "run.json"
    if record.exists() and json.loads(record.read_text())["spec"] == asdict(spec):
        payload = json.loads(record.read_text())
        model = DiffusionLM.from_pretrained(folder / "model").eval()
        log(f"[{spec.name} seed {spec.seed}] loaded from {folder}")
        return model, payload
    tag = f"[{spec.name} seed {spec.seed}]"
    log(f"{tag} training {spec.max_steps} steps ({spec.max_steps * spec.tokens_per_step} tokens)")
    model, curve = train(spec, corpus, folder / "trainer")
    payload = {"spec": asdict(spec), "curve": curve, "train_seconds": model.train_seconds}
    model.save_pretrained(folder / "model")
    record.write_text(json.dumps(payload, indent=2))
    log(f"{tag} done in {model.train_seconds:.0f}s, final eval bound {curve[-1]['eval_nll_bound']:.3f}")
    return model, payload


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


def final_bounds(model, corpus: Corpus, mc_samples: int) -> dict:
    """`diffusion_nll` on the first 100 held-out stories (`mc_samples`) and on the real ones (4x the samples)."""
    return {
        "heldout": diffusion_nll(model, corpus.heldout[:100], mc_samples=mc_samples),
        "real": diffusion_nll(model, corpus.real, mc_samples=4 * mc_samples),
    }


def diffusion_nll(model, texts: list[str], *, mc_samples: int, seed: int = 0) -> dict:
    """Per-token MC-ELBO NLL bound (`nll_per_token`), each text preceded by BOS."""
    from peft_diffusion.evaluation import nll_per_token

    tokenizer = load_tokenizer()
    bound = nll_per_token(
        model.eval(),
        texts,
        tokenizer=tokenizer,
        prefix_token_id=tokenizer.bos_token_id,
        mc_samples=mc_samples,
        batch_size=64,
        generator=torch.Generator().manual_seed(seed),
    )
    return {"nll": bound.nll, "stderr": bound.stderr, "num_tokens": bound.num_tokens}


@torch.no_grad()
def ar_nll(model, tokenizer, texts: list[str]) -> float:
    """Exact per-token NLL of an AR model, each text preceded by BOS (the same tokens `diffusion_nll` scores)."""
    total, count = 0.0, 0
    for text in texts:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([ids[:512]])
        logits = model(input_ids=input_ids).logits[0, :-1].float()  # [L-1, V]
        total += torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum").item()
        count += input_ids.shape[1] - 1
    return total / count


def save_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path}")


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def print_table(headers: list[str], rows: list[list]) -> None:
    """A GitHub-flavoured markdown table on stdout (pasted as-is into docs/replication.md)."""

    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(cell(value) for value in row) + " |")
