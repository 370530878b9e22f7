"""`get_diffusion_model`: turn any transformers causal LM into a `DiffusionLM` (LoRA/QLoRA through PEFT, or full
finetuning), finding or adding the mask token and recording what identifies the base model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import GENERATION_CONFIG_NAME

from . import _compat
from .architectures import check_architecture, is_verified, linear_layers_lora_cannot_wrap
from .config import DEFAULT_MASK_TOKEN, DiffusionConfig
from .model import DiffusionLM, _check_attention_backend
from .probe import probe_architecture
from .sources import local_model_path

logger = logging.getLogger(__name__)


def get_diffusion_model(
    model: PreTrainedModel | str,
    config: DiffusionConfig | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    peft_config: PeftConfig | None = None,
    load_in_4bit: bool = False,
    **model_kwargs,
) -> DiffusionLM:
    r"""Turn a causal LM into a `DiffusionLM`, with a PEFT adapter (LoRA/QLoRA) or for full finetuning.

    Outline:
    1. load the causal LM if a path is given (4-bit with bitsandbytes when `load_in_4bit`);
    2. refuse architectures whose token mixing is not attention alone;
    3. resolve the mask token: the config's id, else the tokenizer's mask token, else a reserved/unused special token,
       else a new `<|mask|>` token (embeddings resized, mean-initialised row);
    4. wrap with PEFT when `peft_config` is given; the mask-token row is trained and saved through
       `trainable_token_indices` under LoRA;
    5. probe architectures outside the verified table once.

    Args:
        model (`PreTrainedModel` or `str`): any `AutoModelForCausalLM`, or a path/Hub id to load one from.
        config (`DiffusionConfig`, *optional*): the diffusion settings (defaults: block attention, block_size 32).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): used to find or add the mask token (a new token is added
            to it); needed unless `config.mask_token_id` is set.
        peft_config (`PeftConfig`, *optional*): e.g. `LoraConfig(r=64, target_modules="all-linear")`; `None` for full
            finetuning.
        load_in_4bit (`bool`, defaults to `False`): load `model` (a path) in 4-bit NF4 for QLoRA (needs bitsandbytes).
        model_kwargs: passed to `AutoModelForCausalLM.from_pretrained` when `model` is a path.

    Example:
    ```python
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft import LoraConfig
    >>> from peft_diffusion import DiffusionConfig, get_diffusion_model
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...                                     num_hidden_layers=2, num_attention_heads=4))
    >>> model = get_diffusion_model(base, DiffusionConfig(attention="block", block_size=4, mask_token_id=127),
    ...                             peft_config=LoraConfig(r=8, target_modules="all-linear"))
    >>> model(input_ids=torch.tensor([[1, 2, 127, 127]])).logits.shape
    torch.Size([1, 4, 128])
    ```
    """
    # 1. load
    config = DiffusionConfig() if config is None else DiffusionConfig.from_dict(config.to_dict())
    if isinstance(model, (str, os.PathLike)):
        if load_in_4bit:
            model_kwargs["quantization_config"] = _nf4_config(model_kwargs.get("dtype"))
        model = load_base_model(model, **model_kwargs)
    elif load_in_4bit:
        raise ValueError("`load_in_4bit=True` needs a path to load from; pass an already-quantized model instead.")
    if isinstance(model, PeftModel):
        raise ValueError("`model` is already a PeftModel; pass the plain causal LM and a `peft_config`.")
    if isinstance(model, DiffusionLM):
        raise ValueError(
            "`model` is already a DiffusionLM; pass the plain causal LM (`model.causal_lm`) to convert it again, or "
            "use the DiffusionLM as it is."
        )
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise ValueError(
            f"`model` must be a transformers causal LM (an `AutoModelForCausalLM`, with an LM head), got "
            f"{type(model).__name__}; load it with `AutoModelForCausalLM.from_pretrained(...)`."
        )

    # 2. architecture and attention backend
    check_architecture(model.config)
    _check_attention_backend(config, _compat.attn_implementation(model.config))
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding matrix has "
            f"{model.get_input_embeddings().weight.shape[0]} rows: `tokenizer` does not belong to `model`."
        )

    # 3. mask token (the base is fingerprinted first: a resize changes its vocabulary)
    fingerprint = base_fingerprint(model, revision=model_kwargs.get("revision"))
    mask_token_id, resized = _resolve_mask_token(model, config, tokenizer)
    config.mask_token_id = mask_token_id
    if tokenizer is not None and config.mask_token is None:
        config.mask_token = tokenizer.convert_ids_to_tokens(mask_token_id)
    config.base_config = model.config
    config.base_model_name_or_path = config.base_model_name_or_path or model.config.name_or_path or None
    fingerprint["name_or_path"] = config.base_model_name_or_path
    if config.base_model_name_or_path:  # the saved base config and PEFT's model card name it the same way
        model.config.name_or_path = model.name_or_path = config.base_model_name_or_path
    config.base_fingerprint = fingerprint
    _compat.set_attn_implementation(config, _compat.attn_implementation(model.config))
    config.validate_diffusion()

    # 4. PEFT
    if peft_config is not None:
        if _is_quantized(model):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if isinstance(peft_config, LoraConfig) and peft_config.trainable_token_indices is None:
            # The mask token's embedding is new (or an untrained reserved row): train and save just that row.
            peft_config.trainable_token_indices = [mask_token_id]
        _exclude_non_linear_layers(model, peft_config)
        model = get_peft_model(model, peft_config)
        # adapter_config.json names the same base as diffusion_config.json (a path the user gave, a Hub id, or the
        # default checkpoint's stable name: never a path the caller did not choose)
        model.peft_config[model.active_adapter].base_model_name_or_path = config.base_model_name_or_path
    elif _is_quantized(model):
        raise ValueError("A 4-bit quantized model cannot be fully finetuned; pass a `peft_config` (QLoRA).")
    if resized:
        logger.info("Added the mask token %r as id %d (embeddings resized).", config.mask_token, mask_token_id)

    diffusion_model = DiffusionLM(config, model=model)
    # 5. probe unknown architectures
    if not is_verified(diffusion_model.causal_lm.config):
        probe_architecture(diffusion_model.causal_lm)
    return diffusion_model


def token_row_layers(model: torch.nn.Module) -> list[TrainableTokensLayer]:
    """PEFT's trainable-token layers of `model` (the mask token's row under LoRA: `get_diffusion_model` step 4), the
    embedding's and a tied LM head's."""
    return [module for module in model.modules() if isinstance(module, TrainableTokensLayer)]


def _exclude_non_linear_layers(model: PreTrainedModel, peft_config: PeftConfig) -> None:
    """Under LoRA's `target_modules="all-linear"`, leave out what only looks linear to PEFT
    (`architectures.linear_layers_lora_cannot_wrap`: e.g. an MoE router subclassing `nn.Linear` that returns a tuple),
    through PEFT's own `exclude_modules`."""
    target = getattr(peft_config, "target_modules", None)
    if not isinstance(peft_config, LoraConfig) or not isinstance(target, str) or target.lower() != "all-linear":
        return
    names = linear_layers_lora_cannot_wrap(model)
    if not names:
        return
    excluded = peft_config.exclude_modules
    if isinstance(excluded, str):
        raise ValueError(
            f"target_modules='all-linear' on {type(model).__name__} leaves out {len(names)} layers that are not linear "
            f"(e.g. {names[0]!r}), which needs `exclude_modules` as a list of names; got the regex {excluded!r}."
        )
    peft_config.exclude_modules = sorted(set(excluded or ()) | set(names))
    logger.info("LoRA leaves out %d nn.Linear subclasses that are not linear layers (e.g. %s)", len(names), names[0])


@contextlib.contextmanager
def token_rows_merged(model: torch.nn.Module):
    """Inference with the trainable token rows written into the embedding matrix for the duration of the context.

    Unmerged, PEFT's `TrainableTokensLayer` rebuilds the whole embedding matrix with `index_copy` on every forward,
    and again for a tied LM head: on SmolLM2-135M (49153 x 576) about 2 x 46 ms per forward on this CPU, more than the
    transformer itself at batch 1. Merged, the forward reads the base weight directly. PEFT's `merge()` writes the
    rows and `unmerge()` copies back the originals it kept when the adapter was made: exact, nothing drifts. Only
    without gradients (a training forward must reach the row's parameter); a no-op where nothing is to merge.
    """
    layers = [
        layer
        for layer in token_row_layers(model)
        if not layer.merged and not layer.disable_adapters and layer.active_adapters
    ]
    if torch.is_grad_enabled() or not layers:
        yield
        return
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer in layers:
            if layer.merged:  # a layer switched off meanwhile has unmerged itself
                layer.unmerge()


def _resolve_mask_token(
    model: PreTrainedModel, config: DiffusionConfig, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[int, bool]:
    """The mask token's id, and whether the embeddings were resized for it."""
    num_rows = model.get_input_embeddings().weight.shape[0]
    if config.mask_token_id is not None:
        if not 0 <= config.mask_token_id < num_rows:
            raise ValueError(
                f"`mask_token_id`={config.mask_token_id} is outside the embedding matrix ({num_rows} rows); "
                "leave it unset and pass `tokenizer` to add a mask token."
            )
        return config.mask_token_id, False
    if tokenizer is None:
        raise ValueError(
            "No mask token: pass `tokenizer` (its mask token is used or one is added) or set "
            "`DiffusionConfig(mask_token_id=...)` to an id inside the embedding matrix."
        )
    if config.mask_token is not None and config.mask_token in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(config.mask_token), False
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id, False
    reserved = _reserved_token_id(tokenizer)
    if reserved is not None:
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(reserved)
        return reserved, False
    # A new special token: it takes a spare row when the matrix is padded (multiples of 64/128), else one is added.
    tokenizer.add_special_tokens({"mask_token": config.mask_token or DEFAULT_MASK_TOKEN})
    mask_token_id = tokenizer.mask_token_id
    resized = mask_token_id >= num_rows
    if resized:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return mask_token_id, resized


def _reserved_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """A reserved/unused special token (Llama-3 `<|reserved_special_token_k|>`, Gemma `<unused0>`), if any."""
    candidates = sorted(
        (token_id, token.content)
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if "reserved" in token.content or "unused" in token.content
    )
    return candidates[0][0] if candidates else None


def _is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _nf4_config(dtype=None):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            '`load_in_4bit=True` (QLoRA) needs bitsandbytes: `pip install "peft-diffusion[qlora]"`.'
        ) from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
    )


# ----------------------------------------------------------------------------------------------------------------
# What identifies a base model, and loading onto one
# ----------------------------------------------------------------------------------------------------------------

# Config keys that change with how a model was loaded, not with what it is.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "attn_implementation",
        "_attn_implementation_autoset",
        "_experts_implementation",
        "architectures",
        "use_cache",
        "_commit_hash",
        "quantization_config",
        "vocab_size",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)
_CHECKSUM_ROWS = 256  # embedding rows summed by the weight checksum (rows a resize never touches)


def base_fingerprint(model: PreTrainedModel, *, revision: str | None = None) -> dict:
    """What identifies a base causal LM: its name, revision (when known), a hash of its config, its vocabulary size
    and a checksum of its first embedding rows (input and output embeddings: signed sums of 8 row groups). Stored in `diffusion_config.json` by
    `get_diffusion_model` (before any resize for the mask token) and checked when an adapter is loaded onto a base."""
    config = model.config.to_dict()
    stable = {
        key: value
        for key, value in config.items()
        if key not in _VOLATILE_CONFIG_KEYS and not key.endswith("_token_id") and not key.startswith("_")
    }
    config_hash = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    checksum = []  # signed sums of 8 groups of embedding rows: different weights give an unrelated vector
    for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(embedding, "weight", None)
        if weight is not None and weight.device.type != "meta" and weight.dim() == 2:
            rows = weight[:_CHECKSUM_ROWS].detach().double()  # [<=256, H]
            groups = torch.arange(rows.shape[0], device=rows.device) % 8  # [<=256]
            sums = torch.zeros(8, dtype=torch.float64, device=rows.device).index_add_(0, groups, rows.sum(-1))
            checksum += [round(float(value), 6) for value in sums]
    return {
        "name_or_path": model.config.name_or_path or None,
        "revision": revision,
        "config_hash": config_hash,
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
        "weights_checksum": checksum,
    }


def check_base_fingerprint(saved: dict | None, base_model: PreTrainedModel, *, source, allow_mismatch: bool) -> None:
    """Refuse to load an adapter onto a base that is not the one it was trained on (unless `allow_mismatch`).

    The config hash, the vocabulary size (before or after the mask-token resize) and the weight checksum (within 1%
    of its norm, so a bf16 load of the same weights passes) must match; a different name alone is only logged.
    """
    if not saved:
        return
    found = base_fingerprint(base_model)
    problems = []
    if saved.get("config_hash") != found["config_hash"]:
        problems.append("its config differs")
    if saved.get("vocab_size") not in (None, found["vocab_size"]):
        problems.append(f"its vocabulary has {found['vocab_size']} rows, the adapter's base had {saved['vocab_size']}")
    expected = saved.get("weights_checksum")
    if expected is not None:
        expected, got = torch.tensor(expected, dtype=torch.float64), torch.tensor(found["weights_checksum"])
        if expected.shape != got.shape or float((expected - got).norm()) > 1e-2 * max(float(expected.norm()), 1e-6):
            problems.append("its embedding weights differ")
    if problems and not allow_mismatch:
        raise ValueError(
            f"The adapter in {source} was trained on {saved.get('name_or_path')!r}, and the base model given "
            f"({found['name_or_path']!r}) is not that model: {'; '.join(problems)}. Load the adapter's own base, or "
            "pass `allow_base_mismatch=True` to load it anyway."
        )
    if problems:
        logger.warning("Loading the adapter in %s onto a different base (%s).", source, "; ".join(problems))
    elif saved.get("name_or_path") != found["name_or_path"]:
        logger.info(
            "Base %r has another name than the adapter's (%r) but the same weights.",
            found["name_or_path"],
            saved.get("name_or_path"),
        )


def load_base_model(name_or_path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` that never runs code from the checkpoint (`trust_remote_code=False`)."""
    if kwargs.pop("trust_remote_code", False):
        raise ValueError(
            "peft-diffusion never runs code shipped with a checkpoint: `trust_remote_code=True` is not supported. "
            "Use an architecture that transformers implements."
        )
    try:
        return AutoModelForCausalLM.from_pretrained(local_model_path(name_or_path), trust_remote_code=False, **kwargs)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ValueError(
            f"{name_or_path} needs custom code from the checkpoint (its config has `auto_map`); peft-diffusion never "
            "runs remote code. Use an architecture that transformers implements."
        ) from error


def adapter_weight_names(peft_model: PeftModel) -> tuple[set[str], set[str]]:
    """The names of a PEFT model's adapter weights (LoRA, mask-token row), and of the embedding layers PEFT adds to a
    save when it sees a resized vocabulary.

    PEFT's `save_embedding_layers="auto"` writes the whole input and output embedding modules (the base weights and,
    on a tied model, the output layer's copy of the mask-token row) whenever the base's folder holds a smaller
    vocabulary, i.e. after the mask-token resize. `DiffusionLM.save_pretrained` does not write them (the mask row is
    in the adapter, every other row is the base's); files that hold them (a stock PEFT save) still load.
    """
    from peft import get_peft_model_state_dict

    adapter = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    embedding_layers = set(get_peft_model_state_dict(peft_model, save_embedding_layers=True)) - adapter
    return adapter, embedding_layers


def check_adapter_weights(peft_model: PeftModel, saved: Iterable[str], source) -> set[str]:
    """Refuse saved adapter weights that do not cover the model's adapter exactly: missing weights would stay at
    their initial values, unexpected ones would be dropped silently. Returns the names of the adapter's weights
    (saved embedding layers, see `adapter_weight_names`, are accepted and left out)."""
    adapter, embedding_layers = adapter_weight_names(peft_model)
    saved = set(saved)
    missing, unexpected = sorted(adapter - saved), sorted(saved - adapter - embedding_layers)
    if missing or unexpected:
        raise ValueError(
            f"The adapter in {source} does not match the model it is loaded onto: "
            + (f"{len(missing)} adapter weights missing (e.g. {missing[:3]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected weights (e.g. {unexpected[:3]})" if unexpected else "")
            + ". The adapter file is incomplete or belongs to another base model."
        )
    return adapter


def load_adapter_strictly(base_model: PreTrainedModel, path, *, is_trainable: bool, **hub_kwargs) -> PeftModel:
    """`PeftModel.from_pretrained`, then refuse an adapter whose weights do not cover the model's adapter exactly
    (`check_adapter_weights`)."""
    from peft.utils import load_peft_weights

    if os.path.isdir(path) and not any(
        os.path.isfile(os.path.join(path, name)) for name in ("adapter_model.safetensors", "adapter_model.bin")
    ):
        # PEFT would look for the weights on the Hub (retries online, a cache notice offline)
        raise ValueError(
            f"{path} holds an adapter config but no adapter weights (adapter_model.safetensors); save the model again."
        )
    try:
        peft_model = PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable, **hub_kwargs)
    except KeyError as error:
        raise ValueError(
            f"The adapter in {path} does not match the model it is loaded onto: PEFT found no weight for {error}. "
            "The adapter file is incomplete or belongs to another base model."
        ) from error
    check_adapter_weights(peft_model, load_peft_weights(str(path), device="cpu", **hub_kwargs), path)
    return peft_model


def load_adapter_model(
    cls, path, *, base_model, is_trainable: bool, allow_base_mismatch: bool, hub_kwargs: dict, **kwargs
) -> DiffusionLM:
    """`DiffusionLM.from_pretrained` for an adapter folder: the diffusion settings, the base (loaded from its recorded
    name unless given, never with remote code), the fingerprint check, the mask-token resize, the strict adapter load.
    """
    from .model import DIFFUSION_CONFIG_NAME

    config_file = _compat.find_file(path, DIFFUSION_CONFIG_NAME, **hub_kwargs)
    if config_file is None:
        raise ValueError(
            f"{path} holds a PEFT adapter but no {DIFFUSION_CONFIG_NAME}: it was not saved by "
            "`DiffusionLM.save_pretrained`; load it with `peft.PeftModel.from_pretrained` instead."
        )
    try:
        with open(config_file, encoding="utf-8") as handle:
            config = DiffusionConfig.from_dict(json.load(handle))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise ValueError(
            f"{config_file} is not a valid {DIFFUSION_CONFIG_NAME} ({error}); save the model again."
        ) from error
    if base_model is None:
        if not config.base_model_name_or_path:
            raise ValueError(
                f"{path} holds an adapter whose base model path is unknown; pass "
                "`base_model=AutoModelForCausalLM.from_pretrained(...)`."
            )
        base_model = load_base_model(config.base_model_name_or_path, **kwargs)
    check_base_fingerprint(config.base_fingerprint, base_model, source=path, allow_mismatch=allow_base_mismatch)
    # The adapter was trained on a base whose embeddings may have grown by the mask token: grow them the same way.
    # The new rows are zeroed (deterministic, no random draw): the adapter holds the mask row's trained values.
    saved_vocab = config.base_config.vocab_size
    old_vocab = base_model.get_input_embeddings().weight.shape[0]
    if old_vocab < saved_vocab:
        base_model.resize_token_embeddings(saved_vocab, mean_resizing=False)
        with torch.no_grad():
            for embedding in (base_model.get_input_embeddings(), base_model.get_output_embeddings()):
                if embedding is not None and embedding.weight.shape[0] == saved_vocab:
                    embedding.weight[old_vocab:] = 0
    config.base_config = base_model.config
    peft_model = load_adapter_strictly(base_model, path, is_trainable=is_trainable, **hub_kwargs)
    return restore_generation_config(cls(config, model=peft_model).eval(), path, hub_kwargs)


def restore_generation_config(model: DiffusionLM, path, hub_kwargs: dict) -> DiffusionLM:
    """Give a loaded model the decoding settings saved beside it (`generation_config.json`, written by
    `save_pretrained`; e.g. the sampler `convert` chose) as a `DiffusionGenerationConfig`: transformers' own
    `GenerationConfig` drops the diffusion fields, and an adapter load would not read the file at all."""
    from .generation import DiffusionGenerationConfig

    if _compat.find_file(path, GENERATION_CONFIG_NAME, **hub_kwargs) is not None:
        model.generation_config = DiffusionGenerationConfig.from_pretrained(path, **hub_kwargs)
    return model
