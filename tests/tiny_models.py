"""Tiny random causal LMs of any model type, built in code (never downloaded).

`tiny_config(model_type)` starts from the model type's default config, shrinks it with the library's generic
`shrink_config` rules (hidden 32, 2 layers, 4 heads of 8, vocabulary 128, no dropout, special ids inside the
vocabulary), applies the shared test sizes below, then the per-model-type overrides of `TINY_OVERRIDES` (data, for
the types the generic shrink does not fit), then the caller's overrides.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from peft_diffusion.probe import _shrink_dict

VOCAB_SIZE = 128
MASK_ID = 127

# The sizes every test model shares, set where the config has the key (kv heads dividing heads).
COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    head_dim=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Per-model-type overrides where the generic shrink does not build (or does not fit 4 heads of 8), as data.
_MLA = dict(num_key_value_heads=4)  # multi-head latent attention: one latent kv per query head
TINY_OVERRIDES: dict[str, dict] = {
    **dict.fromkeys(
        ("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "minicpm3", "sarvam_mla", "youtu", "axk1", "longcat_flash"),
        _MLA,
    ),
    "lfm2": dict(layer_types=["conv", "full_attention"]),  # the default 2-layer config has no convolution
}


def tiny_config(model_type: str, attn_implementation: str = "eager", **overrides):
    """A small config of `model_type` (special ids inside the vocabulary, kv heads dividing heads, no dropout)."""
    values = _shrink_dict(AutoConfig.for_model(model_type).to_dict())
    for key, value in COMMON.items():
        if key in values:
            values[key] = value
    values.update(TINY_OVERRIDES.get(model_type, {}))
    values.update(overrides)
    depth = overrides.get("num_hidden_layers")
    if depth is not None and isinstance(values.get("layer_types"), list) and "layer_types" not in overrides:
        values["layer_types"] = values["layer_types"][:depth]
    for key in ("transformers_version", "_name_or_path"):
        values.pop(key, None)
    values["dtype"] = "float32"
    config = type(AutoConfig.for_model(model_type)).from_dict(values)
    config._attn_implementation = attn_implementation
    for sub in ("text_config", "decoder"):
        if hasattr(getattr(config, sub, None), "_attn_implementation"):
            getattr(config, sub)._attn_implementation = attn_implementation
    return config


def build_tiny_causal_lm(model_type: str, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """The tiny model, in eval mode (raises when transformers cannot build it)."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, attn_implementation, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()
