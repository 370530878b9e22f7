"""The one table of per-architecture facts.

Every causal LM goes through the generic path (`attention.py`). This table only says which architectures were
verified by the test matrix, and which ones cannot become diffusion LMs because their token mixing is not attention
alone (a recurrent or convolutional mixer stays causal whatever the attention mask says). Architectures in neither
list take the generic path after a quick probe (`DiffusionLM` checks that a change to the last token reaches the
first position under bidirectional attention) and get a clear error if the probe fails.
"""

from __future__ import annotations

# Verified by tests/test_attention.py (every attention pattern x eager/sdpa, one-token perturbation test).
VERIFIED_ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
    "stablelm",
    "granite",
    "starcoder2",
)

# Token mixers other than attention: refused, with the reason shown to the user.
UNSUPPORTED_ARCHITECTURES: dict[str, str] = {
    "mamba": "a selective state-space (recurrent) mixer",
    "mamba2": "a selective state-space (recurrent) mixer",
    "falcon_mamba": "a selective state-space (recurrent) mixer",
    "jamba": "mamba layers between its attention layers",
    "bamba": "mamba layers between its attention layers",
    "zamba": "mamba layers between its attention layers",
    "zamba2": "mamba layers between its attention layers",
    "falcon_h1": "mamba heads beside its attention heads",
    "nemotron_h": "mamba layers between its attention layers",
    "granitemoehybrid": "mamba layers between its attention layers",
    "plamo2": "mamba layers between its attention layers",
    "lfm2": "short causal convolutions between its attention layers",
    "lfm2_moe": "short causal convolutions between its attention layers",
    "qwen3_next": "linear-attention (gated delta net) layers",
    "recurrent_gemma": "recurrent (RG-LRU) layers",
    "rwkv": "a recurrent (RWKV) mixer",
    "xlstm": "a recurrent (xLSTM) mixer",
    "llama4_text": "chunked attention layers (not supported yet)",
}

# Layer kinds (from `config.layer_types`) that are attention with a mask we control.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_architecture(config) -> None:
    """Raise `ValueError` when `config` describes a model whose token mixing is not attention alone."""
    model_type = getattr(config, "model_type", None)
    if model_type in UNSUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Model type {model_type!r} cannot be converted to a diffusion LM: it has "
            f"{UNSUPPORTED_ARCHITECTURES[model_type]}, which stays causal whatever the attention mask says. "
            "Use a pure-attention causal LM (llama, qwen2/3, mistral, gemma, phi3, gpt2, ...)."
        )
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({kind for kind in layer_types if kind not in ATTENTION_LAYER_TYPES})
    if other:
        raise ValueError(
            f"Model type {model_type!r} has layers of kind {other} (config.layer_types); only attention layers "
            f"({', '.join(ATTENTION_LAYER_TYPES)}) can follow a diffusion attention pattern."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"Model type {model_type!r} is an encoder-decoder; pass a decoder-only causal LM.")


def is_verified(config) -> bool:
    """Whether the architecture is in the tested matrix (else `DiffusionLM` probes it once)."""
    return getattr(config, "model_type", None) in VERIFIED_ARCHITECTURES
