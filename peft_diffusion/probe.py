"""The dependency check behind the architecture table, and the probe for architectures outside it.

`dependency_failures` runs the one-token perturbation check of every diffusion pattern (see the table in
`architectures.py`) on a causal LM; `benchmarks/classify_architectures.py` runs it on a tiny copy of every model type
to fill the table, and `probe_architecture` runs it once on a tiny copy of an architecture outside the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from . import _compat
from .architectures import SUGGESTED
from .attention import AttentionLayout, annealed_open_entries, diffusion_attention, non_causal, two_stream_layout

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Tiny copies of an architecture
# ----------------------------------------------------------------------------------------------------------------

TINY_VOCAB_SIZE = 128

# Config keys (as stored, i.e. after `attribute_map`) -> the tiny value. Only keys the config has are set; a key
# whose value is None (e.g. an optional low-rank dimension) stays None.
_TINY_SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "model_dim", "hidden_dim"), 32),
    **dict.fromkeys(
        (
            "intermediate_size",
            "n_inner",
            "ffn_dim",
            "ffn_hidden_size",
            "decoder_ffn_dim",
            "encoder_ffn_dim",
            "mlp_hidden_size",
            "inner_hidden_size",
            "d_ff",
        ),
        64,
    ),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers"), 2),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "num_heads",
            "n_heads",
            "decoder_attention_heads",
            "encoder_attention_heads",
        ),
        4,
    ),
    **dict.fromkeys(("head_dim", "attention_head_dim", "v_head_dim", "d_head"), 8),
    **dict.fromkeys(("qk_nope_head_dim", "qk_rope_head_dim"), 8),  # MLA: the rope part is head_dim
    "rotary_dim": 4,
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(
        ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length", "max_sequence_length"),
        128,
    ),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"), 2),
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "expert_intermediate_size",
            "shared_expert_intermediate_size",
            "moe_shared_expert_intermediate_size",
        ),
        32,
    ),
    **dict.fromkeys(("n_group", "topk_group", "n_shared_experts", "first_k_dense_replace"), 1),
}
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num", "num_key_value_groups")
_DROPOUT_WORDS = ("dropout", "pdrop")
_SPECIAL_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def _shrink_dict(values: dict) -> dict:
    original, values = values, dict(values)
    heads = values.get("num_attention_heads", values.get("n_head"))
    for key, value in list(values.items()):
        if isinstance(value, dict) and "model_type" in value:
            values[key] = _shrink_dict(value)  # a sub-config (text_config, vision_config, ...)
        elif key in _TINY_SIZES and isinstance(value, int) and not isinstance(value, bool):
            values[key] = _TINY_SIZES[key]
        elif key in _KV_HEAD_KEYS and isinstance(value, int) and not isinstance(value, bool):
            # multi-query (1) stays 1; grouped-query becomes 2 of 4 heads; full multi-head stays full
            values[key] = 1 if value == 1 else (4 if value == heads else 2)
        elif key == "vocab_size" and isinstance(value, int):
            values[key] = TINY_VOCAB_SIZE
        elif key in _SPECIAL_TOKEN_IDS and isinstance(value, int) and not isinstance(value, bool):
            values[key] = _SPECIAL_TOKEN_IDS[key]
        elif key in ("eos_token_id", "bos_token_id") and isinstance(value, list):
            values[key] = [_SPECIAL_TOKEN_IDS[key]]
        elif any(word in key for word in _DROPOUT_WORDS) and isinstance(value, float):
            values[key] = 0.0
        elif key == "sliding_window" and isinstance(value, int) and not isinstance(value, bool):
            values[key] = max(value, 64)  # longer than any probe sequence: windows are tested on their own
    depth_key = next((key for key in _DEPTH_KEYS if isinstance(values.get(key), int)), None)
    if depth_key is not None:
        _shrink_per_layer(values, depth_key, original)
    return values


def _shrink_per_layer(values: dict, depth_key: str, original: dict) -> None:
    """Per-layer lists (same length as the original depth: `layer_types`, `mlp_layer_types`, per-layer sizes) keep
    one layer of every kind of `layer_types` (sliding and full attention both exercised), at least 2 layers."""
    old_depth = original.get(depth_key)
    layer_types = values.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        first = {}
        for index, kind in enumerate(layer_types):
            first.setdefault(kind, index)
        kept = sorted(first.values())
    else:
        kept = [0]
    kept = (kept + [i for i in range(old_depth or 0) if i not in kept])[: max(len(kept), 2)]
    if not old_depth or max(kept) >= old_depth:
        return
    values[depth_key] = len(kept)
    for key, value in values.items():
        if isinstance(value, list) and len(value) == old_depth and key != depth_key:
            values[key] = [value[i] for i in kept]
        elif isinstance(value, dict) and value and all(isinstance(k, int) or str(k).isdigit() for k in value):
            # a per-layer dict keyed by layer index: keep the kept layers, renumbered
            values[key] = {new: value[k] for new, i in enumerate(kept) for k in value if int(k) == i}


def shrink_config(config, attn_implementation: str | None = None):
    """A tiny random copy of `config`'s architecture: hidden 32, 2 layers, 4 heads of 8, vocabulary 128, no dropout.

    Generic over architectures: the size keys the config has are replaced (`_TINY_SIZES`), per-layer lists keep one
    layer of every kind, sub-configs are shrunk too, special token ids are moved inside the vocabulary, sliding
    windows made longer than the probe sequence.
    """
    values = _shrink_dict(config.to_dict())
    values.pop("transformers_version", None)
    values.pop("_name_or_path", None)
    values.pop("quantization_config", None)
    values["dtype"] = "float32"
    tiny = type(config).from_dict(values)
    if attn_implementation is not None:
        _compat.set_attn_implementation(tiny, attn_implementation)
    return tiny


# ----------------------------------------------------------------------------------------------------------------
# The dependency check (one implementation: the classifier and the probe)
# ----------------------------------------------------------------------------------------------------------------

CHECK_LENGTH = 12
CHECK_BLOCK_SIZE = 4
CHECK_PATTERNS = ("bidirectional", "block", "block+clean_context", "annealed", "causal", "bidirectional+unmasked")


@dataclasses.dataclass(frozen=True)
class DependencyFailure:
    """One failed check: the pattern, the attention implementation, and the exception or the wrong dependencies."""

    pattern: str
    backend: str
    error: BaseException | None = None
    seen: torch.Tensor | None = None
    expected: torch.Tensor | None = None

    @property
    def crashed(self) -> bool:
        return self.error is not None

    def __str__(self) -> str:
        if self.error is not None:
            message = str(self.error).strip().splitlines()[0][:160] if str(self.error).strip() else ""
            return f"{self.pattern}/{self.backend}: {type(self.error).__name__}: {message}"
        wrong = int((self.seen != self.expected).sum())
        return f"{self.pattern}/{self.backend}: {wrong} wrong token dependencies"


def _closure(one_layer: torch.Tensor, num_layers: int) -> torch.Tensor:
    """[q, k] -> k reaches q through at most `num_layers` allowed pairs (every token keeps its own state)."""
    one = one_layer | torch.eye(one_layer.shape[0], dtype=torch.bool)
    total = one
    for _ in range(num_layers - 1):
        total = (one.float() @ total.float()) > 0
    return total


def _num_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return 2


def _influence(causal_lm, input_ids: torch.Tensor, position_ids: torch.Tensor, tolerance: float) -> torch.Tensor:
    """[i, j] -> does changing token j change logits[:, i]? One batched forward: row j + 1 changes token j."""
    length = input_ids.shape[1]
    vocab = causal_lm.get_input_embeddings().weight.shape[0]
    batch = input_ids.repeat(length + 1, 1)  # [L+1, L]
    for j in range(length):
        batch[j + 1, j] = 3 + (batch[j + 1, j] - 3 + 5) % max(vocab - 4, 1)
    outputs = causal_lm(input_ids=batch, position_ids=position_ids.expand(length + 1, -1), use_cache=False)
    logits = (outputs.logits if hasattr(outputs, "logits") else outputs[0]).float()  # [L+1, L, V]
    difference = (logits[1:] - logits[:1]).abs().amax(-1)  # [j, i]
    scale = logits[:1].abs().amax().clamp(min=1.0)
    return (difference > tolerance * scale).T  # [i, j]


@torch.no_grad()
def dependency_failures(
    causal_lm,
    *,
    length: int = CHECK_LENGTH,
    block_size: int = CHECK_BLOCK_SIZE,
    patterns: tuple[str, ...] = CHECK_PATTERNS,
    tolerance: float | None = None,
    seed: int = 0,
) -> list[DependencyFailure]:
    """Run the one-token perturbation check of every pattern on `causal_lm` (a plain transformers causal LM, no
    shift), on its own attention implementation. Returns the failures (empty: the architecture follows every
    pattern exactly). Exceptions raised by the forward are caught and returned as failures.

    Run it in float64 (tiny copies are): a two-layer chain through a freshly initialised model changes the logits
    by ~1e-7 only, below float32 noise. `tolerance` (relative to the logit scale) defaults to 1e-9 in float64 and
    to 0 otherwise (positions a change cannot reach are computed bitwise identically in every row).

    Outline:
    1. one random token sequence (and a second for the clean stream), positions 0..L-1;
    2. per pattern, the layout and the expected dependencies: the one-layer rule closed over the model's depth;
    3. the batched perturbation forward inside `diffusion_attention(layout)` (unmasked: attention modules
       non-causal, as `DiffusionLM` runs them), compared exactly with the expectation.
    """
    # 1. inputs
    backend = _compat.attn_implementation(causal_lm.config) or "eager"
    was_training = causal_lm.training
    causal_lm.eval()
    if tolerance is None:
        tolerance = 1e-9 if causal_lm.get_input_embeddings().weight.dtype == torch.float64 else 0.0
    device = causal_lm.get_input_embeddings().weight.device
    vocab = causal_lm.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, max(vocab - 1, 4), (1, 2 * length), generator=generator).to(device)  # [1, 2L]
    positions = torch.arange(length, device=device)[None]  # [1, L]
    doc_ids = torch.zeros_like(positions)
    num_layers = _num_layers(causal_lm.config)
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    modules = [m for m in causal_lm.modules() if isinstance(getattr(m, "is_causal", None), bool)]

    # 2. layouts and expectations: (layout, one-layer rule [Q, K], input ids, position ids, unmasked)
    def single(pattern: str, rule: torch.Tensor, **fields) -> tuple:
        rows = length + 1  # the perturbation batch
        layout = AttentionLayout(pattern, positions.expand(rows, -1), doc_ids.expand(rows, -1), **fields)
        return layout, rule, input_ids[:, :length], positions

    cases: dict[str, Callable[[], tuple]] = {
        "causal": lambda: single("causal", k <= q),
        "bidirectional": lambda: single("bidirectional", torch.ones(length, length, dtype=torch.bool)),
        "block": lambda: single("block", k // block_size <= q // block_size, block_size=block_size),
        "bidirectional+unmasked": lambda: single(
            "bidirectional", torch.ones(length, length, dtype=torch.bool), unmasked=True
        ),
    }

    def annealed() -> tuple:
        is_open = annealed_open_entries(length, 0.5, generator=torch.Generator().manual_seed(seed + 3)).to(device)
        return single("annealed", (k <= q) | is_open.cpu(), is_open=is_open)

    def clean_context() -> tuple:
        rows = 2 * length + 1
        layout = two_stream_layout(positions.expand(rows, -1), doc_ids.expand(rows, -1), block_size)
        qq, kk = torch.arange(2 * length)[:, None], torch.arange(2 * length)[None, :]
        q_clean, k_clean = qq >= length, kk >= length
        bq, bk = (qq % length) // block_size, (kk % length) // block_size
        noisy_rule = (~k_clean & (bk == bq)) | (k_clean & (bk < bq))
        rule = torch.where(q_clean, k_clean & (bk <= bq), noisy_rule)
        return layout, rule, input_ids, torch.cat([positions, positions], dim=1)

    cases["annealed"] = annealed
    cases["block+clean_context"] = clean_context

    # 3. forwards
    failures = []
    try:
        for name in patterns:
            layout, rule, ids, position_ids = cases[name]()
            expected = _closure(rule, num_layers)
            try:
                with diffusion_attention(layout), non_causal(modules if layout.unmasked else ()):
                    seen = _influence(causal_lm, ids, position_ids, tolerance).cpu()
            except Exception as error:  # noqa: BLE001 - any failure of the forward is a verdict on the architecture
                failures.append(DependencyFailure(name, backend, error=error))
                continue
            if not torch.equal(seen, expected):
                failures.append(DependencyFailure(name, backend, seen=seen, expected=expected))
    finally:
        causal_lm.train(was_training)
    return failures


def per_expert_loop(model) -> None:
    """Switch a tiny MoE model's grouped expert matmuls (transformers >= 5.25's default) to the per-expert loop, in
    place: grouped matmuls take no float64, and in float32 a token's result depends on how many others share its
    expert, which a dependency check would read as a dependency. A no-op for other models."""
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        with contextlib.suppress(ValueError, AttributeError):
            model.set_experts_implementation("eager")


def tiny_model_failures(model) -> list[DependencyFailure]:
    """`dependency_failures` of a tiny model, in float64; in float32 (tolerance 0) when float64 crashes (some
    kernels take no float64). Converts `model` in place (and to the per-expert loop: `per_expert_loop`)."""
    per_expert_loop(model)
    failures = dependency_failures(model.to(torch.float64))
    if any(failure.crashed for failure in failures):
        failures = dependency_failures(model.to(torch.float32))
    return failures


# ----------------------------------------------------------------------------------------------------------------
# The probe for architectures outside the table
# ----------------------------------------------------------------------------------------------------------------


def _tiny_copy(causal_lm, attn_implementation: str):
    """A tiny random model of `causal_lm`'s class from its shrunk config, or None when it cannot be built."""
    try:
        config = shrink_config(causal_lm.config, attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return type(causal_lm)(config).eval()
    except Exception as error:  # noqa: BLE001 - fall back to the model itself
        logger.info("No tiny copy of %s (%s); probing the model itself.", type(causal_lm).__name__, error)
        return None


def probe_architecture(causal_lm, *, use_tiny_copy: bool = True) -> None:
    """Check once that every diffusion pattern reaches the attention of an architecture outside the table.

    Runs `dependency_failures` (every pattern, the clean-context two-stream layout, the unmasked layout) on a tiny
    copy of the same architecture (its config shrunk: cheap even for a 7B model; the model itself when the copy
    cannot be built), on the model's attention implementation and on eager when the model is not eager. Backends
    other than sdpa/eager/flex (flash) are checked through eager and sdpa.

    Args:
        causal_lm (`PreTrainedModel`): the plain transformers causal LM (not the PEFT wrapper).
        use_tiny_copy (`bool`, defaults to `True`): probe a shrunk copy rather than the model itself.

    Raises:
        `ValueError` naming the model type, the failing pattern and backend, and the cause.
    """
    model_type = getattr(causal_lm.config, "model_type", type(causal_lm).__name__)
    own = _compat.attn_implementation(causal_lm.config) or "eager"
    backends = [own] if own in ("eager", "sdpa") else ["sdpa"]
    if "eager" not in backends:
        backends.append("eager")
    start = time.perf_counter()
    failures: list[DependencyFailure] = []
    for backend in backends:
        model = _tiny_copy(causal_lm, backend) if use_tiny_copy else None
        if model is None:
            model = causal_lm
            saved = _compat.attn_implementation(model.config)
            try:
                model.set_attn_implementation(backend)
                failures += dependency_failures(model)
            finally:
                model.set_attn_implementation(saved)
        else:
            failures += tiny_model_failures(model)
    logger.info("Probed %s on %s in %.2f s.", model_type, "/".join(backends), time.perf_counter() - start)
    if failures:
        first = failures[0]
        cause = (
            "it fails under a diffusion attention mask"
            if first.crashed
            else "the diffusion pattern does not reach its attention as expected (masks built outside transformers' "
            "masking_utils, or a token mixer other than attention)"
        )
        raise ValueError(
            f"Model type {model_type!r} failed the diffusion attention probe: {cause}; {first}"
            + (f" (and {len(failures) - 1} more failures)" if len(failures) > 1 else "")
            + f". Use a verified causal LM instead: {SUGGESTED}."
        ) from first.error
