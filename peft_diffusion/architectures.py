"""The one table of per-architecture facts (the dependency check that fills it lives in `probe.py`).

Every causal LM goes through the generic path (`attention.py`). This table says, for every model type of
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` in the supported transformers releases, whether it was VERIFIED (a tiny random
copy, under eager and sdpa, has exactly the dependency structure of every diffusion pattern) or REFUSED (with a
category and a one-line reason). `benchmarks/classify_architectures.py` regenerates it on the installed transformers;
`tests/test_architectures.py` re-checks every verified type against hand-written rules.

The dependency check (one-token perturbation): for a token sequence of length L, row j+1 of one batched forward
changes token j, and `reach[i, j]` says whether logits[:, i] changed. With n attention layers (residuals keep every
token's own state), token j reaches i iff a chain q=i <- ... <- k=j of at most n allowed (query, key) pairs exists.

| pattern                 | one-layer rule (q, k), L = 12, block size 4                                      |
|-------------------------|----------------------------------------------------------------------------------|
| `causal`                | k <= q                                                                           |
| `bidirectional`         | always (also with `unmasked=True`: no mask at all, non-causal attention modules) |
| `block`                 | k // 4 <= q // 4                                                                 |
| `block` + clean context | `[x_t ; x_0]`: noisy q: noisy k of its block or clean k of earlier blocks;        |
|                         | clean q: clean k of blocks <= its own                                            |
| `annealed`              | k <= q or is_open[q, k] (a random half of the upper triangle)                    |

Architectures outside the table (a newer transformers, remote code) are probed once (`probe.probe_architecture`): the same
check runs on a tiny copy of the same architecture, on the model's attention implementation and on eager.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------

# Why a model type is refused: category -> what it means for the user.
REFUSAL_CATEGORIES: dict[str, str] = {
    "non_attention_mixer": "its token mixer is not attention alone, and that mixer stays causal whatever the "
    "attention mask says",
    "chunked_attention": "it has chunked attention layers, which a diffusion pattern does not cover yet",
    "mask_outside_masking_utils": "it builds its attention masks outside transformers' masking_utils, so a "
    "diffusion attention pattern does not reach its attention",
    "crashes_under_diffusion_mask": "its attention fails under a diffusion attention mask",
    "not_text_only": "its causal-LM class needs inputs a text-only causal LM path cannot give",
    "no_tiny_config": "no small random config of it could be built to verify it",
}

# Verified on transformers 5.23 and 5.24 by `benchmarks/classify_architectures.py`; re-checked by
# tests/test_architectures.py (every pattern x eager/sdpa against hand-written rules).
VERIFIED_ARCHITECTURES: tuple[str, ...] = (
    "afmoe",
    "apertus",
    "apertus1p5_text",
    "arcee",
    "aria_text",
    "axk1",
    "bart",
    "beam",
    "bert",
    "bert-generation",
    "big_bird",
    "bigbird_pegasus",
    "biogpt",
    "bitnet",
    "blenderbot",
    "blenderbot-small",
    "bloom",
    "camembert",
    "codegen",
    "cohere",
    "cohere2",
    "cohere2_moe",
    "ctrl",
    "cwm",
    "data2vec-text",
    "deepseek_v3",
    "diffllama",
    "doge",
    "electra",
    "emu3",
    "ergo",
    "ernie",
    "ernie4_5",
    "ernie4_5_moe",
    "exaone",
    "exaone4",
    "exaone_moe",
    "falcon",
    "flex_olmo",
    "flint",
    "fuyu",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gemma4",
    "gemma4_text",
    "gemma4_unified",
    "gemma4_unified_text",
    "git",
    "glm",
    "glm4",
    "glm4_moe",
    "glm4_moe_lite",
    "got_ocr2",
    "gpt-sw3",
    "gpt2",
    "gpt_bigcode",
    "gpt_neox",
    "gpt_neox_japanese",
    "gpt_oss",
    "gptj",
    "granite",
    "granite_swa",
    "granitemoe",
    "granitemoe_swa",
    "granitemoeshared",
    "helium",
    "hrm_text",
    "hunyuan_v1_dense",
    "hunyuan_v1_moe",
    "hy_v3",
    "hyperclovax",
    "internlm3",
    "iquestcoder",
    "jais2",
    "jetmoe",
    "laguna",
    "llama",
    "marian",
    "mbart",
    "megatron-bert",
    "mellum",
    "minicpm3",
    "minicpm5_moe",
    "ministral",
    "ministral3",
    "mistral",
    "mixtral",
    "mllama",
    "modernbert-decoder",
    "moshi",
    "moss_transcribe_diarize",
    "mpt",
    "mvp",
    "nanochat",
    "nemotron",
    "olmo",
    "olmo2",
    "olmo3",
    "olmoe",
    "opt",
    "param2moe",
    "pegasus",
    "persimmon",
    "phi",
    "phi3",
    "phi4_multimodal",
    "phimoe",
    "plbart",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "rembert",
    "roberta",
    "roberta-prelayernorm",
    "roc_bert",
    "roformer",
    "sarvam_mla",
    "sarvam_moe",
    "seed_oss",
    "smollm3",
    "solar_open",
    "stablelm",
    "starcoder2",
    "trocr",
    "vaultgemma",
    "whisper",
    "xglm",
    "xlm-roberta",
    "xlm-roberta-xl",
    "youtu",
)

# model_type -> (category in REFUSAL_CATEGORIES, detail).
REFUSED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "minimax_m2": (
        "mask_outside_masking_utils",
        "causal/sdpa: 1 wrong token dependency in a float32 run of an MoE, not reproducible (may be numerical, re-check)",
    ),
    "axk2": ("non_attention_mixer", "layers of kind ['indexed_attention']"),
    "bailing_hybrid": ("non_attention_mixer", "layers of kind ['linear_attention']"),
    "bamba": ("non_attention_mixer", "layers of kind ['linear_attention']"),
    "blt": ("no_tiny_config", "RuntimeError: mat1 and mat2 shapes cannot be multiplied (13x32 and 2048x64)"),
    "cohere_compass_text": ("no_tiny_config", "KeyError: 'full_attention'"),
    "cpmant": (
        "mask_outside_masking_utils",
        "block/eager: 48 wrong token dependencies; block+clean_context/eager: 384 wrong token dependencies; causal/eager: 66 wrong token dependencies",
    ),
    "dbrx": ("no_tiny_config", "AttributeError: 'DbrxAttentionConfig' object has no attribute 'rope_theta'"),
    "deepseek_v2": ("no_tiny_config", "TypeError: topk(): argument 'k' must be int, not NoneType"),
    "deepseek_v32": ("non_attention_mixer", "layers of kind ['indexed_attention']"),
    "deepseek_v4": (
        "non_attention_mixer",
        "layers of kind ['compressed_sparse_attention', 'heavily_compressed_attention']",
    ),
    "dory": (
        "no_tiny_config",
        "StrictDataclassClassValidationError: Class validation error for validator 'validate_architecture':",
    ),
    "dots1": ("no_tiny_config", "TypeError: empty() takes 1 positional argument but 3 were given"),
    "dots3_note": ("non_attention_mixer", "layers of kind ['indexed_attention']"),
    "dots3_note_text": ("non_attention_mixer", "layers of kind ['indexed_attention']"),
    "falcon_h1": ("non_attention_mixer", "mamba heads beside its attention heads (layer kind 'hybrid')"),
    "falcon_mamba": ("non_attention_mixer", "mamba (selective state-space) layers: FalconMambaBlock"),
    "gemma3n": (
        "no_tiny_config",
        "ImportError: TimmWrapperModel requires the timm library but it was not found in your environment. You can install it with pip:",
    ),
    "gemma3n_text": (
        "no_tiny_config",
        "ValueError: The set of layer types producing a cache is different than the set of layer types using them",
    ),
    "gemma4_assistant": (
        "no_tiny_config",
        "StrictDataclassClassValidationError: Class validation error for validator 'validate_architecture':",
    ),
    "gemma4_unified_assistant": (
        "no_tiny_config",
        "ValueError: The set of layer types producing a cache is different than the set of layer types using them",
    ),
    "glm_moe_dsa": ("non_attention_mixer", "layers of kind ['indexed_attention']"),
    "gpt_neo": (
        "mask_outside_masking_utils",
        "bidirectional/eager: 66 wrong token dependencies; block/eager: 18 wrong token dependencies; block+clean_context/eager: 84 wrong token dependencies",
    ),
    "granitemoehybrid": ("non_attention_mixer", "mamba (selective state-space) layers: GraniteMoeHybridMambaLayer"),
    "hy_v4": ("non_attention_mixer", "layers of kind ['indexed_attention']"),
    "inkling2_loop_text": ("non_attention_mixer", "short causal convolutions: Inkling2LoopDynamicShortConvolution"),
    "inkling2_text": ("non_attention_mixer", "short causal convolutions: Inkling2DynamicShortConvolution"),
    "inkling_text": ("non_attention_mixer", "short causal convolutions: InklingShortConvolution"),
    "jamba": ("non_attention_mixer", "mamba (selective state-space) layers: JambaMambaDecoderLayer"),
    "kimi_linear": ("non_attention_mixer", "linear-attention layers: KimiLinearAttention"),
    "kolibri1": (
        "mask_outside_masking_utils",
        "block/eager: 1 wrong token dependencies; block/sdpa: 1 wrong token dependencies; causal/sdpa: 1 wrong token dependencies (float32 run of an MoE; may be numerical, re-check)",
    ),
    "kolibri1_1": ("non_attention_mixer", "layers of kind ['indexed_attention']"),
    "lara_mini": ("non_attention_mixer", "linear-attention (gated delta net) layers: LaraMiniGatedDeltaNet"),
    "lfm2": ("non_attention_mixer", "short causal convolutions: Lfm2ShortConv"),
    "lfm2_moe": ("non_attention_mixer", "short causal convolutions: Lfm2MoeShortConv"),
    "lfm3": ("non_attention_mixer", "short causal convolutions: Lfm3ShortConv"),
    "llama4": ("chunked_attention", "chunked attention layers (attention_chunk_size)"),
    "llama4_text": ("chunked_attention", "chunked attention layers (attention_chunk_size)"),
    "longcat_flash": (
        "no_tiny_config",
        "RuntimeError: split_with_sizes expects split_sizes to sum exactly to 192 (input tensor's size at dimension -1), but got split_sizes=[8, 8]",
    ),
    "mamba": ("non_attention_mixer", "mamba (selective state-space) layers: MambaBlock"),
    "mamba2": ("non_attention_mixer", "mamba (selective state-space) layers: Mamba2Block"),
    "mimo_v2_flash": (
        "mask_outside_masking_utils",
        "causal/eager: 1 wrong token dependencies (float32 run of an MoE; may be numerical, re-check)",
    ),
    "minimax": ("non_attention_mixer", "linear-attention layers: MiniMaxLightningAttention"),
    "minimax_m3_vl_text": (
        "mask_outside_masking_utils",
        "causal/sdpa: 1 wrong token dependencies (float32 run of an MoE; may be numerical, re-check)",
    ),
    "musicgen": ("no_tiny_config", "AttributeError: 'MusicgenConfig' object has no attribute 'dropout'"),
    "musicgen_melody": ("no_tiny_config", "AttributeError: 'MusicgenMelodyConfig' object has no attribute 'dropout'"),
    "nemotron_h": ("non_attention_mixer", "mamba (selective state-space) layers: NemotronHMamba2Mixer"),
    "olmo_hybrid": ("non_attention_mixer", "linear-attention (gated delta net) layers: OlmoHybridGatedDeltaNet"),
    "openai-gpt": (
        "mask_outside_masking_utils",
        "bidirectional/eager: 66 wrong token dependencies; block/eager: 18 wrong token dependencies; block+clean_context/eager: 276 wrong token dependencies",
    ),
    "prophetnet": (
        "mask_outside_masking_utils",
        "bidirectional/eager: 2 wrong token dependencies; block/eager: 48 wrong token dependencies; block+clean_context/eager: 375 wrong token dependencies",
    ),
    "qwen3_5": ("non_attention_mixer", "linear-attention (gated delta net) layers: Qwen3_5GatedDeltaNet"),
    "qwen3_5_moe": ("non_attention_mixer", "linear-attention (gated delta net) layers: Qwen3_5MoeGatedDeltaNet"),
    "qwen3_5_moe_text": ("non_attention_mixer", "linear-attention (gated delta net) layers: Qwen3_5MoeGatedDeltaNet"),
    "qwen3_5_text": ("non_attention_mixer", "linear-attention (gated delta net) layers: Qwen3_5GatedDeltaNet"),
    "qwen3_next": ("non_attention_mixer", "linear-attention (gated delta net) layers: Qwen3NextGatedDeltaNet"),
    "qwen4_exp": ("non_attention_mixer", "linear-attention (gated delta net) layers: Qwen4ExpTextGatedDeltaNet"),
    "qwen4_exp_text": ("non_attention_mixer", "linear-attention (gated delta net) layers: Qwen4ExpTextGatedDeltaNet"),
    "recurrent_gemma": ("non_attention_mixer", "recurrent (RG-LRU) layers: RecurrentGemmaRecurrentBlock"),
    "reformer": (
        "no_tiny_config",
        "AssertionError: If you want to use `ReformerModelWithLMHead` make sure that `is_decoder=True`.",
    ),
    "rwkv": ("non_attention_mixer", "a recurrent (RWKV) mixer: RwkvBlock"),
    "xlm": (
        "mask_outside_masking_utils",
        "block/eager: 48 wrong token dependencies; block+clean_context/eager: 384 wrong token dependencies; causal/eager: 66 wrong token dependencies",
    ),
    "xlnet": (
        "mask_outside_masking_utils",
        "block/eager: 48 wrong token dependencies; block+clean_context/eager: 384 wrong token dependencies; causal/eager: 66 wrong token dependencies",
    ),
    "xlstm": ("non_attention_mixer", "a recurrent (xLSTM) mixer: xLSTMBackend"),
    "xmod": (
        "no_tiny_config",
        "ValueError: Input language unknown. Please call `XmodPreTrainedModel.set_default_language()`",
    ),
    "zamba": ("non_attention_mixer", "mamba (selective state-space) layers: ZambaMambaDecoderLayer"),
    "zamba2": ("non_attention_mixer", "mamba (selective state-space) layers: Zamba2MambaDecoderLayer"),
    "zaya": ("non_attention_mixer", "layers of kind ['hybrid']"),
}

# Layer kinds (from `config.layer_types`) that are attention with a mask we control.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")

SUGGESTED = "llama, qwen2/qwen3, mistral, gemma 1-3, phi3, gpt2, olmo2, granite (see VERIFIED_ARCHITECTURES)"


def linear_layers_lora_cannot_wrap(model) -> list[str]:
    """Names of the modules that are `nn.Linear` to PEFT's `target_modules="all-linear"` but whose output is not a
    tensor: a modeling file's own `nn.Linear` subclass with its own `forward` is called once on one zero row (e.g.
    Phi-MoE's router, `PhimoeTopKRouter`, returns a tuple of logits, routing weights and experts; a LoRA layer around
    it fails on its first forward). Subclasses that return a tensor (Falcon's `FalconLinear`) stay targets."""
    import torch

    names = []
    for name, module in model.named_modules():
        if (
            not isinstance(module, torch.nn.Linear)
            or not type(module).__module__.startswith("transformers.models.")
            or type(module).forward is torch.nn.Linear.forward
            or module.weight.device.type == "meta"
        ):
            continue
        with torch.no_grad():
            output = module(torch.zeros(1, module.in_features, dtype=module.weight.dtype, device=module.weight.device))
        if not isinstance(output, torch.Tensor):
            names.append(name)
    return names


def check_architecture(config) -> None:
    """Raise `ValueError` when `config` describes a model type that cannot become a diffusion LM.

    Refused types (the table) raise with their reason; verified types pass; other types pass the structural checks
    below (non-attention `layer_types`, encoder-decoder) and are then probed (`probe_architecture`).
    """
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED_ARCHITECTURES:
        category, detail = REFUSED_ARCHITECTURES[model_type]
        raise ValueError(
            f"Model type {model_type!r} cannot be converted to a diffusion LM: {REFUSAL_CATEGORIES[category]} "
            f"({detail}). Use a verified pure-attention causal LM instead: {SUGGESTED}."
        )
    if model_type in VERIFIED_ARCHITECTURES:
        return
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({kind for kind in layer_types if kind not in ATTENTION_LAYER_TYPES})
    if other:
        raise ValueError(
            f"Model type {model_type!r} has layers of kind {other} (config.layer_types); only attention layers "
            f"({', '.join(ATTENTION_LAYER_TYPES)}) can follow a diffusion attention pattern. Use {SUGGESTED}."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"Model type {model_type!r} is an encoder-decoder; pass a decoder-only causal LM.")


def is_verified(config) -> bool:
    """Whether the architecture is in the verified table (else it is probed once with `probe_architecture`)."""
    return getattr(config, "model_type", None) in VERIFIED_ARCHITECTURES


# ----------------------------------------------------------------------------------------------------------------
# Context window
# ----------------------------------------------------------------------------------------------------------------

# Config keys that hold the context window (the most positions the model was built for), read in this order:
# transformers' name (its attribute maps alias others to it, e.g. gpt2's `n_positions`), the older names some configs
# keep, and a decoder's limit in the encoder-decoder families' naming (whisper's `max_target_positions`).
CONTEXT_WINDOW_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_target_positions")


def context_window(config) -> int | None:
    """The context window of a causal LM: the most token positions it was built for, or `None` when unknown.

    Read from the config's text decoder (`config.get_text_config(decoder=True)`: a multimodal model such as gemma3
    keeps it in its `text_config`), under the first key of `CONTEXT_WINDOW_KEYS` that is set to a positive integer.

    `None` means the config names no limit (e.g. bloom: ALiBi positions have no table to run out of). Callers then
    check nothing: `generate` accepts any length, `loglikelihood_batch` does not truncate the context, and
    `nll_per_token` needs an explicit `max_length` for its windows.

    Args:
        config (`PreTrainedConfig`): the base causal LM's config (`model.causal_lm.config` of a `DiffusionLM`).

    Returns:
        `int` or `None`.

    Example:
    ```python
    >>> from transformers import GPT2Config, LlamaConfig
    >>> from peft_diffusion.architectures import context_window
    >>> context_window(LlamaConfig(max_position_embeddings=4096)), context_window(GPT2Config(n_positions=1024))
    (4096, 1024)
    ```
    """
    text_config = config.get_text_config(decoder=True)
    for key in CONTEXT_WINDOW_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
