"""Every reliance on a private name or an undocumented behaviour of transformers / peft / trl, one hook each.

peft-diffusion reuses its hosts instead of forking them, so it leans on a few internals. They all live here, so that
a host release that moves one breaks in one named place, loudly, instead of silently somewhere else. Each hook says
what it relies on and since which version it was checked; `tests/test_compat.py` has a test per hook that fails with
a message naming the hook when the host changes under it. Everything else in the package uses public APIs only.

| hook                        | relies on                                                              | checked on |
|-----------------------------|------------------------------------------------------------------------|------------|
| `CACHE_KWARG`               | the KV-cache keyword of model forwards: `cache` (5.24+), else          | 5.23-5.25  |
|                             | `past_key_values`; read from the fields of `CausalLMOutputWithPast`    |            |
| `mask_materialisers`        | `AttentionMaskInterface` entries for sdpa/eager/flex taking            | 5.23-5.25  |
|                             | `mask_function`, `local_size`, `allow_is_causal_skip`,                 |            |
|                             | `allow_is_bidirectional_skip`, `use_vmap` keywords                     |            |
| `set_attention_is_causal`   | attention modules' `is_causal` attribute, read by sdpa/flash when a    | 5.23-5.25  |
|                             | layer gets no mask                                                     |            |
| `mark_initialized`          | `module._is_hf_initialized`: `post_init` skips modules carrying it     | 5.23-5.25  |
| `attn_implementation`       | `config._attn_implementation` (no public getter on a config)           | 5.23-5.25  |
| `SubConfigSpec`             | `transformers.configuration_utils.SubConfigSpec` (not exported)        | 5.23-5.25  |
| `disable_label_shift_count` | `Trainer._loss_shifts_labels`: `num_items_in_batch` counts             | 5.23-5.25  |
|                             | `labels[..., 1:]` when true                                            |            |
| `CheckpointLoading`         | `Trainer._load_from_checkpoint(checkpoint, model)` and                 | 5.23-5.25  |
|                             | `Trainer._load_best_model()`, the only places a resume / best-model    |            |
|                             | load can be intercepted                                                |            |
| `generation_defaults`       | `GenerationConfig._get_default_generation_params()`: the values        | 5.23-5.25  |
|                             | `generate` gives fields left unset (`temperature`, `top_k`, `top_p`)   |            |

Not hooks any more (public routes used instead): the sdpa/eager/flex materialisers are read with public indexing
(`ALL_MASK_ATTENTION_FUNCTIONS[name]`) and replaced with the public `AttentionMaskInterface.register`; optional files
of a model folder or Hub repo are found with `find_file` below (no private download flags); `GenerationConfig.validate`
is extended without naming its parameters; the trainer reads its tokenizer from the public `processing_class`.
Evaluated and not usable: transformers' `create_causal_mask(block_sequence_ids=...)` (`blockwise_overlay`) ORs
bidirectional groups onto the causal mask, which is exactly block-causal attention, but only multimodal models forward
the argument; text causal LMs (llama, qwen, ...) never pass it, so it cannot reach them.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Iterable

import torch
import transformers
from transformers import Trainer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import CausalLMOutputWithPast


class HostCompatibilityError(RuntimeError):
    """A host library changed under one of the hooks of `peft_diffusion._compat`."""

    def __init__(self, hook: str, problem: str):
        super().__init__(
            f"peft_diffusion._compat hook `{hook}`: {problem} (transformers {transformers.__version__}). "
            "This transformers release is not supported yet; install a version listed in peft-diffusion's README, "
            "or report the hook name."
        )
        self.hook = hook


# ----------------------------------------------------------------------------------------------------------------
# CACHE_KWARG: the KV-cache keyword
# ----------------------------------------------------------------------------------------------------------------


def _cache_kwarg() -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` in model forwards, outputs and mask builders (the old
    keyword still works until 5.40, with a deprecation warning). The name is read off the stock output class."""
    names = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    raise HostCompatibilityError(
        "CACHE_KWARG", f"CausalLMOutputWithPast has neither `cache` nor `past_key_values`: {names}"
    )


CACHE_KWARG: str = _cache_kwarg()


def output_cache(outputs) -> object | None:
    """The KV cache of a host model output, under whichever name the installed transformers uses."""
    return outputs.get(CACHE_KWARG)


# ----------------------------------------------------------------------------------------------------------------
# mask_materialisers: transformers' mask builders for sdpa / eager / flex_attention
# ----------------------------------------------------------------------------------------------------------------

# The keywords our wrapper reads or sets on every materialiser call (`attention.py: _wrap_materialiser`).
MATERIALISER_KEYWORDS = {
    "sdpa": ("mask_function", "local_size", "allow_is_causal_skip", "allow_is_bidirectional_skip", "use_vmap"),
    "eager": ("mask_function", "allow_is_bidirectional_skip", "use_vmap"),
    "flex_attention": ("mask_function",),
}


def mask_materialiser(backend: str) -> Callable:
    """The current mask materialiser of `backend` (public indexing of `ALL_MASK_ATTENTION_FUNCTIONS`)."""
    try:
        return ALL_MASK_ATTENTION_FUNCTIONS[backend]
    except KeyError as error:
        raise HostCompatibilityError(
            "mask_materialisers", f"no mask materialiser registered for {backend!r}"
        ) from error


def check_mask_materialiser(backend: str, function: Callable) -> None:
    """Check that a materialiser takes the keywords the diffusion wrapper relies on (`attention.py`).

    Every transformers model builds its masks through `masking_utils.create_*_mask`, which looks up
    `ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]` and calls it with a `mask_function` (the pattern) and,
    for sliding layers, `local_size`. The wrapper swaps the pattern and turns the skip shortcuts off.
    """
    parameters = inspect.signature(function).parameters
    missing = [name for name in MATERIALISER_KEYWORDS[backend] if name not in parameters]
    if missing:
        raise HostCompatibilityError(
            "mask_materialisers", f"the {backend} mask materialiser no longer takes the keywords {missing}"
        )


# ----------------------------------------------------------------------------------------------------------------
# set_attention_is_causal: the `is_causal` flag of attention modules
# ----------------------------------------------------------------------------------------------------------------


def attention_is_causal_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules carrying a boolean `is_causal` flag (the attention layers of transformers models).

    When a layer gets no mask, transformers' sdpa and flash attention read `module.is_causal` to choose between the
    causal and the unmasked kernel: that is how an unmasked layer runs bidirectionally.
    """
    return [module for module in model.modules() if isinstance(getattr(module, "is_causal", None), bool)]


def set_attention_is_causal(modules: Iterable[torch.nn.Module], value: bool) -> list[tuple[torch.nn.Module, bool]]:
    """Set `is_causal` on attention modules; returns the previous values (to restore them)."""
    saved = [(module, module.is_causal) for module in modules]
    for module, _ in saved:
        module.is_causal = value
    return saved


# ----------------------------------------------------------------------------------------------------------------
# mark_initialized, attn_implementation, SubConfigSpec: model and config internals
# ----------------------------------------------------------------------------------------------------------------


def mark_initialized(model: torch.nn.Module) -> None:
    """Mark every module as initialised, so that `PreTrainedModel.post_init` of a wrapper does not re-initialise
    pretrained weights (or LoRA layers) it was handed. transformers skips modules with `_is_hf_initialized = True`."""
    for module in model.modules():
        module._is_hf_initialized = True


def attn_implementation(config) -> str | None:
    """The attention implementation a config was resolved to (`"eager"`, `"sdpa"`, `"flash_attention_2"`, ...)."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config, value: str | None) -> None:
    """Record the attention implementation on a config (the wrapper's config mirrors its base model's)."""
    config._attn_implementation = value


try:
    from transformers.configuration_utils import SubConfigSpec  # noqa: F401 (re-exported for config.py)
except ImportError as error:  # pragma: no cover - exercised only on an incompatible transformers
    raise HostCompatibilityError(
        "SubConfigSpec", "transformers.configuration_utils.SubConfigSpec is gone (composite configs)"
    ) from error


# ----------------------------------------------------------------------------------------------------------------
# disable_label_shift_count, CheckpointLoading: Trainer internals
# ----------------------------------------------------------------------------------------------------------------


def disable_label_shift_count(trainer: Trainer) -> None:
    """Make the Trainer count every `labels != -100` in `num_items_in_batch`.

    The Trainer counts `labels[..., 1:]` for models whose loss shifts labels (causal LMs); diffusion labels are
    aligned to positions (the collator already dropped the tokens no prediction reads), so every label counts. If the
    flag were renamed, the loss scale would change silently: the attribute must exist, and `DiffusionTrainer`
    re-checks the count on its first training step (`check_num_items_in_batch`).
    """
    if not hasattr(trainer, "_loss_shifts_labels"):
        raise HostCompatibilityError(
            "disable_label_shift_count", "Trainer no longer sets `_loss_shifts_labels` (num_items_in_batch counting)"
        )
    trainer._loss_shifts_labels = False


def check_num_items_in_batch(num_items_in_batch, labels: torch.Tensor) -> None:
    """With one batch per step on one process, the Trainer's token count must equal the batch's own target count."""
    if num_items_in_batch is None:
        return
    expected = int(labels.ne(-100).sum())
    if int(num_items_in_batch) != expected:
        raise HostCompatibilityError(
            "disable_label_shift_count",
            f"the Trainer counted num_items_in_batch={int(num_items_in_batch)} target tokens, the batch holds "
            f"{expected}; the loss scale would be wrong",
        )


_CHECKPOINT_HOOKS = {"_load_from_checkpoint": ("resume_from_checkpoint", "model"), "_load_best_model": ()}


def _check_checkpoint_hooks() -> None:
    for name, parameters in _CHECKPOINT_HOOKS.items():
        method = getattr(Trainer, name, None)
        if method is None:
            raise HostCompatibilityError("CheckpointLoading", f"Trainer.{name} is gone")
        found = tuple(inspect.signature(method).parameters)[1:]
        if found[: len(parameters)] != parameters:
            raise HostCompatibilityError(
                "CheckpointLoading", f"Trainer.{name} takes {found}, expected {parameters} first"
            )


class CheckpointLoading:
    """Trainer mixin: resume and best-model loading go through `self._load_adapter(checkpoint) -> bool` first.

    The stock Trainer only knows a top-level `PeftModel` or full weights; a PEFT `DiffusionLM` wraps its `PeftModel`.
    The Trainer has no public hook for this, so the two private loaders are overridden (signatures checked at import).
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._load_adapter(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_adapter(self.state.best_model_checkpoint):
            super()._load_best_model()


_check_checkpoint_hooks()


# ----------------------------------------------------------------------------------------------------------------
# generation_defaults: what `generate` uses for unset generation-config fields
# ----------------------------------------------------------------------------------------------------------------

_SAMPLING_FIELDS = ("temperature", "top_k", "top_p")


def generation_defaults() -> dict:
    """transformers' `generate` values for the sampling fields a generation config leaves unset (`None`):
    `temperature`, `top_k`, `top_p` (1.0, 50, 1.0 in 5.23/5.24).

    `generate` fills unset fields from `GenerationConfig._get_default_generation_params()` (private) before building
    its logits warpers; speculative sampling must build the same warpers to sample the base's distribution.
    """
    from transformers import GenerationConfig

    getter = getattr(GenerationConfig, "_get_default_generation_params", None)
    if getter is None:
        raise HostCompatibilityError("generation_defaults", "GenerationConfig._get_default_generation_params is gone")
    defaults = getter()
    missing = [name for name in _SAMPLING_FIELDS if defaults.get(name) is None]
    if missing:
        raise HostCompatibilityError("generation_defaults", f"generate no longer gives defaults for {missing}")
    return {name: defaults[name] for name in _SAMPLING_FIELDS}


# ----------------------------------------------------------------------------------------------------------------
# Public routes (no hook): optional files
# ----------------------------------------------------------------------------------------------------------------


def find_file(path_or_repo: str | os.PathLike, filename: str, **hub_kwargs) -> str | None:
    """The local path of `filename` in a model folder or Hub repo, or None when it is not there."""
    if os.path.isdir(path_or_repo):
        candidate = os.path.join(path_or_repo, filename)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    try:
        return cached_file(path_or_repo, filename, **hub_kwargs)
    except OSError:
        return None
