"""`DiffusionConfig`: what a diffusion LM *is*, everything needed to run or score it after training.

The base causal model's config is kept whole as a sub-config (`base_config`), not flattened, so a saved
diffusion model rebuilds its base with the ordinary transformers class. Training-only knobs live in
`DiffusionTrainingConfig`, decoding-only knobs in `DiffusionGenerationConfig`.
"""

from __future__ import annotations

import difflib
import logging
import math
from contextvars import ContextVar

from transformers import AutoConfig, PreTrainedConfig

from ._compat import SubConfigSpec
from .attention import AttentionPattern, get_attention_pattern
from .corruption import MASKING_POLICIES
from .noise import NOISE_SCHEDULES

logger = logging.getLogger(__name__)

DEFAULT_MASK_TOKEN = "<|mask|>"
# Keys `PreTrainedConfig` itself reads or writes for backward compatibility (beyond what its `to_dict` emits); any
# other unknown keyword is a typo.
_HOST_KEYS = frozenset(
    {
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "num_labels",
        "architectures",
        "auto_map",
        "use_cache",
        "name_or_path",
        "attn_implementation",
        "experts_implementation",
        "trust_remote_code",
        "revision",
        "token",
        "cache_dir",
        "local_files_only",
        "force_download",
        "subfolder",
        "return_unused_kwargs",
    }
)


def _host_keys() -> frozenset[str]:
    """Every key a plain `PreTrainedConfig` serialises or reads back (`to_dict` of a default config)."""
    global _ALL_HOST_KEYS
    if _ALL_HOST_KEYS is None:
        _ALL_HOST_KEYS = _HOST_KEYS | frozenset(PreTrainedConfig().to_dict())
    return _ALL_HOST_KEYS


_ALL_HOST_KEYS: frozenset[str] | None = None
# True while a config is rebuilt from a dict (a saved file, or a copy): unknown keys are then logged, not refused, so
# a file written by another transformers release still loads.
_FROM_DICT: ContextVar[bool] = ContextVar("peft_diffusion_config_from_dict", default=False)
# Beyond this position-dependent masking strength, most late targets are masked with certainty and carry no ELBO
# weight (their per-token schedule is flat), so the loss loses its signal (`corruption.position_dependent_masking`).
MAX_MASKING_STRENGTH = 10.0
# The field types checked at construction (bool is not accepted where an int is expected, nor a string for a bool).
_FIELD_TYPES = {
    "attention": (str,),
    "block_size": (int,),
    "clean_context": (bool,),
    "causal_first_token": (bool,),
    "shift": (bool,),
    "mask_token_id": (int, type(None)),
    "mask_token": (str, type(None)),
    "noise_schedule": (str,),
    "masking": (str,),
    "masking_strength": (int, float),
    "base_model_name_or_path": (str, type(None)),
    "base_fingerprint": (dict, type(None)),
}


class DiffusionConfig(PreTrainedConfig):
    r"""Configuration of a masked diffusion LM converted from a causal LM.

    Args:
        attention (`str`, defaults to `"block"`):
            The attention pattern. `"bidirectional"`: every position sees every non-padding position of its document.
            `"block"`: bidirectional inside a block of `block_size` tokens, causal across blocks (Efficient-DLM,
            BD3-LM); decodes with an exact KV cache. `"annealed"`: causal with a growing random fraction of the upper
            triangle opened during training, bidirectional at inference (DiffuLLaMA, arXiv 2410.17891).
        block_size (`int`, defaults to 32):
            Tokens per block. Used by `attention="block"`; blocks are aligned at position 0 of each document.
        clean_context (`bool`, defaults to `True`):
            Under block attention, train on the two-stream layout `[x_t ; x_0]`: each noisy block attends to itself
            and to the *clean* earlier blocks, exactly what it sees at inference (Efficient-DLM, BD3-LM).
        causal_first_token (`bool`, defaults to `False`):
            The first token of each document attends only to itself, as in the causal base, under every pattern but
            `"causal"`. Language models lean on their first token as an attention sink; when it also sees the rest of
            its block, the sink changes with the text and the whole sequence moves away from the base. Before any
            training it puts SmolLM2-135M-Instruct's block-2 conversion 0.26 nats (KL) from its base on plain text,
            against 1.40 without it; after 10 minutes of training 0.21 against 1.09, with LAMBADA 0.28 against 0.21
            (the base 0.30; docs/conversion.md, section f). `peft-diffusion convert` turns it on. A config saved
            before this field existed loads with `False`, as its model was trained.
        shift (`bool`, defaults to `True`):
            Keep the AR alignment: the prediction for position `i` is read from the hidden state at `i - 1`
            (DiffuLLaMA's shift operation). Position 0 is then never predicted.
        mask_token_id (`int`, *optional*):
            Id of the mask token inside the base model's embedding matrix. Set by `get_diffusion_model`.
        mask_token (`str`, *optional*):
            The mask token's string, for tokenizers.
        noise_schedule (`str`, defaults to `"linear"`):
            The noise schedule `alpha_t` (`"linear"`: alpha_t = 1 - t, as in both papers; `"cosine"`).
        masking (`str`, defaults to `"uniform"`):
            Which tokens are masked at time `t`: `"uniform"` or `"position_dependent"` (later tokens masked more at
            small t, Efficient-DLM).
        masking_strength (`float`, defaults to 0.0):
            Strength >= 0 of position-dependent masking (0 is uniform): the i-th of the n target tokens of a block
            (of a document without blocks) is tilted by `exp(beta (1 - t) i)` with `beta = masking_strength / n`,
            so `masking_strength` = beta x n, beta x the block length for a block of answer tokens.
        base_config (`dict` or `PreTrainedConfig`, *optional*):
            The base causal LM's config, kept as a sub-config.
        base_model_name_or_path (`str`, *optional*):
            Where the base weights come from (a Hub id or a folder), used to reload a LoRA adapter.
        base_fingerprint (`dict`, *optional*):
            What identifies the base model (name, revision, config hash, vocabulary size, a weight checksum); set by
            `get_diffusion_model`, checked when an adapter is loaded onto a base (`model.base_fingerprint`).

    Example:
    ```python
    >>> from peft_diffusion import DiffusionConfig
    >>> config = DiffusionConfig(attention="block", block_size=32, shift=True)
    >>> config.attention, config.block_size
    ('block', 32)
    ```
    """

    model_type = "diffusion_lm"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True)}

    attention: str = "block"
    block_size: int = 32
    clean_context: bool = True
    causal_first_token: bool = False
    shift: bool = True
    mask_token_id: int | None = None
    mask_token: str | None = None
    noise_schedule: str = "linear"
    masking: str = "uniform"
    masking_strength: float = 0.0
    base_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str | None = None
    base_fingerprint: dict | None = None

    def __post_init__(self, **kwargs):
        unknown = sorted(
            key
            for key in kwargs
            if not key.startswith("_") and not key.endswith("_token_id") and key not in _host_keys()
        )
        if unknown and _FROM_DICT.get():
            logger.warning("DiffusionConfig: ignoring unknown keys %s of the saved config.", unknown)
        elif unknown:
            fields = sorted(_FIELD_TYPES) + ["base_config"]
            hints = [
                f"{key!r} (did you mean {match[0]!r}?)"
                if (match := difflib.get_close_matches(key, fields, 1))
                else repr(key)
                for key in unknown
            ]
            raise ValueError(
                f"Unknown `DiffusionConfig` argument(s): {', '.join(hints)}. The fields are {fields}; training knobs "
                "belong in `DiffusionTrainingConfig`, decoding knobs in `DiffusionGenerationConfig`."
            )
        super().__post_init__(**kwargs)
        self.validate_diffusion()

    def validate_diffusion(self) -> None:
        """Check every diffusion setting and raise `ValueError` naming the argument and the fix."""
        for name, types in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                expected = " or ".join("None" if kind is type(None) else kind.__name__ for kind in types)
                raise ValueError(f"`{name}` must be {expected}, got {name}={value!r} ({type(value).__name__}).")
        get_attention_pattern(self.attention)  # raises, naming the registered patterns
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
            raise ValueError(f"`block_size` must be a positive integer, got block_size={self.block_size!r}.")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(
                f"`noise_schedule` must be one of {sorted(NOISE_SCHEDULES)}, got noise_schedule={self.noise_schedule!r}; "
                "register a new one with @register_noise_schedule."
            )
        if self.masking not in MASKING_POLICIES:
            raise ValueError(
                f"`masking` must be one of {sorted(MASKING_POLICIES)}, got masking={self.masking!r}; register a new "
                "one with @register_masking_policy."
            )
        if not (math.isfinite(self.masking_strength) and 0 <= self.masking_strength <= MAX_MASKING_STRENGTH):
            raise ValueError(
                f"`masking_strength` must be a number in [0, {MAX_MASKING_STRENGTH:g}] (0 is uniform masking; beyond "
                f"{MAX_MASKING_STRENGTH:g} most late targets are always masked and carry no loss), got "
                f"masking_strength={self.masking_strength}."
            )
        if self.mask_token_id is not None:
            if not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
                raise ValueError(
                    f"`mask_token_id` must be a non-negative int, got mask_token_id={self.mask_token_id!r}."
                )
            special = {
                name: getattr(self.base_config, name, None)
                for name in ("eos_token_id", "pad_token_id", "bos_token_id")
            }
            for name, value in special.items():
                if self.mask_token_id == value or (isinstance(value, (list, tuple)) and self.mask_token_id in value):
                    raise ValueError(
                        f"`mask_token_id`={self.mask_token_id} is the base model's {name}: masked positions would read "
                        "as that token (generation would stop at once); leave `mask_token_id` unset and pass a "
                        "tokenizer so a dedicated mask token is found or added."
                    )
            vocab_size = getattr(self.base_config, "vocab_size", None)
            if vocab_size is not None and self.mask_token_id >= vocab_size:
                raise ValueError(
                    f"`mask_token_id`={self.mask_token_id} is outside the base model's embedding matrix "
                    f"(vocab_size={vocab_size}); pass a tokenizer to `get_diffusion_model` so a mask token is added "
                    "and the embeddings resized, or choose an id below vocab_size."
                )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Rebuild a config from a dict (a saved `config.json` / `diffusion_config.json`): unknown keys are logged
        and ignored here, while a typo passed to the constructor is an error."""
        token = _FROM_DICT.set(True)
        # a file saved before `causal_first_token` existed was trained with the first token seeing its block
        config_dict = {"causal_first_token": False, **config_dict}
        try:
            return super().from_dict(config_dict, **kwargs)
        finally:
            _FROM_DICT.reset(token)

    @property
    def attention_pattern(self) -> AttentionPattern:
        """The registered `AttentionPattern` named by `attention` (`attention.py`)."""
        return get_attention_pattern(self.attention)

    @property
    def attention_block_size(self) -> int | None:
        """Tokens per attention block (noise groups, likelihood groups, decoding grid); None: whole documents."""
        return self.attention_pattern.block_size(self)

    @property
    def uses_clean_context(self) -> bool:
        """Whether training and scoring use the two-stream `[x_t ; x_0]` layout."""
        return self.attention_pattern.uses_two_stream(self)
