"""The self-distilled rows' quality filters, their statistics and their on-disk cache (`data.py` builds the rows).

A cache file is named by a hash of everything that decides its rows: the model (name, config, a sample of the
weights), the tokenizer (vocabulary, special tokens, chat template), the texts and every generation and filter
setting. Another model or other settings never reuse it; a corrupt file is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Bump when the rows written for the same settings change, so that old cache files are not reused.
CACHE_VERSION = 1
FILTERS = (
    "empty_prompt",
    "unfinished_prompt",
    "duplicate_prompt",
    "completion_cut",
    "completion_too_short",
    "completion_repetitive",
)


@dataclass
class DistillationStats:
    """What `self_distilled_dataset` generated and kept. Stored as JSON in the returned `Dataset.info.description`.

    Attributes:
        attempted (`int`): prompts generated (chat) or texts tried (base).
        kept (`int`): rows returned.
        dropped (`dict[str, int]`): rows dropped, by filter (every name of `FILTERS`).
        trimmed (`int`): kept answers that were cut by `max_new_tokens` and trimmed to a sentence end
            (`cut_completions="trim"`).
        unused (`int`): prompts that passed their filters but were not needed (`num_examples` was reached); so
            `attempted == kept + sum(dropped.values()) + unused`.
        seconds (`float`): generation time of the run that built the rows (a cached load keeps it).
        rows_per_minute (`float`): `kept / seconds * 60`.
        cache_file (`str`): the cache file, or `""`.
    """

    attempted: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    unused: int = 0
    trimmed: int = 0
    seconds: float = 0.0
    rows_per_minute: float = 0.0
    cache_file: str = ""

    @classmethod
    def from_dataset(cls, dataset) -> DistillationStats:
        """The stats of a dataset returned by `self_distilled_dataset`."""
        return cls(**json.loads(dataset.info.description))

    def summary(self) -> str:
        dropped = ", ".join(f"{name} {count}" for name, count in self.dropped.items() if count) or "none"
        return (
            f"kept {self.kept} of {self.attempted} ({self.rows_per_minute:.1f} rows/min over {self.seconds:.0f} s); "
            f"dropped: {dropped}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Filters (pure functions over token sequences or strings)
# ----------------------------------------------------------------------------------------------------------------


def distinct_n(tokens: Sequence, n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / n-grams; 1.0 when the sequence has no n-gram."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def max_repeat_run(tokens: Sequence, max_n: int = 8) -> int:
    """The most times any n-gram (1 <= n <= `max_n`) occurs back to back: `a b a b a b` gives 3, `a b c` gives 1."""
    best = 1 if len(tokens) else 0
    for n in range(1, max_n + 1):
        for start in range(n):  # each phase of the n-gram grid
            run = 1
            for i in range(start + n, len(tokens) - n + 1, n):
                run = run + 1 if tokens[i : i + n] == tokens[i - n : i] else 1
                best = max(best, run)
    return best


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _completion_filter(
    tokens: Sequence, reached_eos: bool, *, require_eos: bool, min_tokens: int, min_distinct2: float, max_repeats: int
) -> str | None:
    """The name of the filter that drops a completion (its token ids), or None to keep it."""
    if require_eos and not reached_eos:
        return "completion_cut"
    if len(tokens) < min_tokens:
        return "completion_too_short"
    if distinct_n(list(tokens), 2) < min_distinct2 or max_repeat_run(list(tokens)) >= max_repeats:
        return "completion_repetitive"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Cache key
# ----------------------------------------------------------------------------------------------------------------


def _model_fingerprint(model: PreTrainedModel) -> dict:
    """name_or_path, a hash of the config, the vocabulary size, and a hash of a strided sample of every weight (a
    cheap way to tell two checkpoints of one config apart, e.g. two random inits or a finetune)."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
        digest.update(f"{name}:{tuple(parameter.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    config = model.config.to_json_string(use_diff=False)
    return {
        "name_or_path": str(model.name_or_path),
        "class": type(model).__name__,
        "config": hashlib.sha256(config.encode()).hexdigest(),
        "vocab_size": model.get_input_embeddings().num_embeddings,
        "weights": digest.hexdigest(),
    }


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
        "special_tokens": sorted(map(str, tokenizer.all_special_tokens)),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def cache_key(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: dict) -> str:
    """The name of the cache file: a SHA-256 over the model, the tokenizer and `settings` (JSON-serialisable)."""
    payload = {
        "version": CACHE_VERSION,
        "model": _model_fingerprint(model),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _load_cache(path: Path, key: str):
    """The cached rows and stats, or None when absent; a file that does not parse as ours is rebuilt with a warning."""
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload["key"] != key or not isinstance(payload["rows"], list) or not payload["rows"]:
            raise ValueError("unexpected content")
        return payload["rows"], DistillationStats(**payload["stats"])
    except (ValueError, KeyError, TypeError, OSError) as error:
        warnings.warn(
            f"The self-distilled data cache {path} is unreadable ({error}); rebuilding it.", UserWarning, stacklevel=3
        )
        return None


def _save_cache(path: Path, key: str, rows: list[dict], stats: DistillationStats, settings: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as file:  # written whole, then moved: never half a file
        json.dump({"key": key, "settings": settings, "stats": asdict(stats), "rows": rows}, file)
    os.replace(staging, path)
