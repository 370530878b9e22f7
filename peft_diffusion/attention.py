"""Diffusion attention patterns for any transformers causal LM, as transformers mask functions.

A causal LM builds its attention masks through `transformers.masking_utils`: the modeling code describes the
pattern with a *mask function* `f(batch_idx, head_idx, q_idx, kv_idx) -> bool` and the backend-specific
materialisation (`AttentionMaskInterface[attn_implementation]`) turns it into a float mask (eager), a boolean mask
(sdpa) or a `BlockMask` (flex_attention). We wrap those materialisers once: while an `AttentionLayout` is active
(`with diffusion_attention(layout):`), the causal pattern the model asked for is replaced by the diffusion pattern.
Padding, KV-cache offsets and sliding windows keep going through transformers' own code, so no modeling file is
copied and every architecture that uses `masking_utils` is covered.

Notation (per token, over the whole key range: cached tokens first, then the current input):

| name        | shape  | meaning                                                                     |
|-------------|--------|-----------------------------------------------------------------------------|
| `positions` | [B, S] | position of the token inside its document (0 at the first real token)      |
| `doc_ids`   | [B, S] | document index inside a packed row; tokens of different documents never mix |
| `block_ids` | [B, S] | `positions // block_size`                                                   |
| `is_clean`  | [B, S] | token belongs to the clean copy x_0 of the two-stream layout `[x_t ; x_0]`  |
| `is_open`   | [P, P] | annealing: entry (p_q, p_kv) of the upper triangle opened (DiffuLLaMA)       |

Patterns, for a query token q and a key token k of the same document:

- `causal`:        p_k <= p_q
- `bidirectional`: always
- `block`:         b_k <= b_q                                  (bidirectional in a block, causal across blocks)
- `block` with clean context (BD3-LM, Efficient-DLM), input `[x_t ; x_0]`, positions `[0..L-1, 0..L-1]`:
    noisy q:  noisy k with b_k == b_q, or clean k with b_k < b_q
    clean q:  clean k with b_k <= b_q                           (the clean copy is block-causal over itself)
- `annealed`:      p_k <= p_q  or  is_open[p_q, p_k]              (ratio 1 is bidirectional)

Sliding-window layers keep their window, made symmetric on positions: |p_q - p_k| < window.

Unmasked fast path: when every query of a forward may attend to every key (no padding, one document, and the pattern
allows all pairs: bidirectional attention, or a block window over a cache holding everything before it), the layout
is built with `unmasked=True` (`DiffusionLM.forward` proves it from host-side facts) and its non-sliding layers get no
mask at all: sdpa runs its unmasked kernel (with `is_causal=False`, see `non_causal`), flex runs without a
`BlockMask`; eager still gets an all-zero additive mask (some eager attention functions add the mask without a `None`
check). Sliding-window layers still get their (windowed) mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.masking_utils import AttentionMaskInterface

from . import _compat

# Mask materialisers we wrap: sdpa, eager, flex_attention (`_compat.MATERIALISER_KEYWORDS`). flash_attention_* only
# take a 2D padding mask: bidirectional attention reaches them through `is_causal=False` instead (see `model.py`),
# every other pattern is refused there.
# Backends whose attention functions take `None` for "no mask" (an unmasked kernel). Eager attention functions of
# several architectures add the mask unconditionally, so eager always gets a (zero) mask.
_UNMASKED_BACKENDS = ("sdpa", "flex_attention")


@dataclass(frozen=True)
class AttentionLayout:
    """Everything a diffusion pattern needs about the tokens of one forward pass.

    Args:
        pattern (`str`): a registered attention pattern (`ATTENTION_PATTERNS`: `"causal"`, `"bidirectional"`,
            `"block"`, `"annealed"`, ...).
        positions (`torch.LongTensor` of shape `(batch_size, total_length)`): position inside the document.
        doc_ids (`torch.LongTensor` of shape `(batch_size, total_length)`): document index (packing).
        block_size (`int`, *optional*): block length of the `"block"` pattern.
        is_clean (`torch.BoolTensor` of shape `(batch_size, total_length)`, *optional*): two-stream layout flag.
        is_open (`torch.BoolTensor` of shape `(max_position, max_position)`, *optional*): opened entries of the
            annealed pattern.
        unmasked (`bool`, defaults to `False`): the caller guarantees every query may attend to every key of the
            forward; non-sliding layers then run without a mask (the attention modules must be non-causal for sdpa:
            `non_causal`).
        causal_start (`bool`, defaults to `False`): the first token of each document (position 0) attends only to
            itself, whatever the pattern allows (`DiffusionConfig.causal_first_token`).
        ancestors (`torch.BoolTensor` of shape `(batch_size, num_nodes, num_nodes)`, *optional*): the `"tree"`
            pattern: the last `num_nodes` tokens form a token tree, and `ancestors[b, i, j]` says node `j` is node `i`
            or one of its ancestors.
    """

    pattern: str
    positions: torch.Tensor
    doc_ids: torch.Tensor
    block_size: int | None = None
    is_clean: torch.Tensor | None = None
    is_open: torch.Tensor | None = None
    unmasked: bool = False
    ancestors: torch.Tensor | None = None
    causal_start: bool = False

    def __post_init__(self):
        get_attention_pattern(self.pattern, selectable_only=False).check_layout(self)

    def mask_function(self, sliding_window: int | None = None) -> Callable:
        """The pattern as a transformers mask function over absolute token indices."""
        positions, doc_ids, causal_start = self.positions, self.doc_ids, self.causal_start
        rule = get_attention_pattern(self.pattern, selectable_only=False).rule(self)

        def mask_fn(batch_idx, head_idx, q_idx, kv_idx):
            # Indices broadcast as [B,1,1,1], [1,1,Q,1], [1,1,1,K]; every lookup below is [B,1,Q,K]-broadcastable.
            allowed = doc_ids[batch_idx, q_idx] == doc_ids[batch_idx, kv_idx]
            if rule is not None:
                allowed = allowed & rule(batch_idx, q_idx, kv_idx)
            if causal_start:  # a document's first token sees only itself (and the other stream's copy, if allowed)
                allowed = allowed & ((positions[batch_idx, q_idx] > 0) | (positions[batch_idx, kv_idx] == 0))
            if sliding_window is not None:
                distance = positions[batch_idx, q_idx] - positions[batch_idx, kv_idx]
                allowed = allowed & (distance.abs() < sliding_window)
            return allowed

        return mask_fn

    def dense(self, sliding_window: int | None = None) -> torch.Tensor:
        """The pattern materialised as a boolean `[B, S, S]` tensor (for tests and inspection)."""
        batch, length = self.positions.shape
        device = self.positions.device
        b = torch.arange(batch, device=device)[:, None, None, None]
        q = torch.arange(length, device=device)[None, None, :, None]
        k = torch.arange(length, device=device)[None, None, None, :]
        h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
        return self.mask_function(sliding_window)(b, h, q, k).expand(batch, 1, length, length)[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# Attention patterns: one registered class each
# ----------------------------------------------------------------------------------------------------------------


class AttentionPattern:
    """One attention pattern: its mask rule and everything the rest of the package asks of it.

    Subclass it, set `name`, implement `rule`, and register it with `@register_attention_pattern`; it is then a value
    of `DiffusionConfig.attention`, a choice of the CLI's `--attention`, and training, scoring and decoding follow it.
    The defaults describe a pattern over whole documents (no blocks, one stream, the same pattern at inference).
    """

    name: ClassVar[str] = ""
    # Selectable as `DiffusionConfig.attention` (`causal` exists as the reference pattern only).
    selectable: ClassVar[bool] = True
    # Expressible as a padding mask alone (every pair of a document allowed): flash kernels can run it.
    padding_mask_only: ClassVar[bool] = False

    def rule(self, layout: AttentionLayout) -> Callable | None:
        """`(batch_idx, q_idx, kv_idx) -> bool tensor`: which pairs of the same document may attend (None: all)."""
        raise NotImplementedError

    def check_layout(self, layout: AttentionLayout) -> None:
        """Raise `ValueError` when `layout` lacks what the rule reads."""

    def block_size(self, config) -> int | None:
        """Tokens per attention block: the groups sharing one noise time, the likelihood groups and the decoding grid
        (`None`: whole documents)."""
        return None

    def uses_two_stream(self, config) -> bool:
        """Whether training and scoring run on the clean-context layout `[x_t ; x_0]`."""
        return False

    def layout(self, config, positions, doc_ids, *, training=False, annealing_ratio=1.0, generator=None):
        """The single-stream layout of one forward (training or inference)."""
        return AttentionLayout(self.name, positions, doc_ids, block_size=self.block_size(config))

    def allows_every_pair(self, layout: AttentionLayout, past_length: int, length: int) -> bool:
        """Whether every query of an unpadded one-document forward may attend to every key (the unmasked fast path),
        for `length` new tokens over `past_length` cached ones."""
        return False

    def supports_backend(self, implementation: str | None) -> bool:
        """Flash kernels take only a 2D padding mask: causal or fully bidirectional, nothing in between."""
        return self.padding_mask_only or not (implementation or "").startswith("flash_attention")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


ATTENTION_PATTERNS: dict[str, type[AttentionPattern]] = {}


def register_attention_pattern(name: str) -> Callable[[type], type]:
    """Class decorator that registers an `AttentionPattern` subclass under `name` (a `DiffusionConfig.attention`).

    Args:
        name (`str`): the registry key, lower_snake.
    """

    def decorator(cls: type) -> type:
        if name in ATTENTION_PATTERNS:
            raise ValueError(
                f"An attention pattern named {name!r} is already registered ({ATTENTION_PATTERNS[name]})."
            )
        if not (isinstance(cls, type) and issubclass(cls, AttentionPattern)):
            raise TypeError(
                f"`@register_attention_pattern({name!r})` takes an AttentionPattern subclass, got {cls!r}."
            )
        cls.name = name
        ATTENTION_PATTERNS[name] = cls
        return cls

    return decorator


def selectable_patterns() -> list[str]:
    """The names `DiffusionConfig.attention` accepts."""
    return sorted(name for name, cls in ATTENTION_PATTERNS.items() if cls.selectable)


def get_attention_pattern(
    name_or_pattern: str | AttentionPattern, *, selectable_only: bool = True
) -> AttentionPattern:
    """Resolve an attention pattern from its registered name (or return an instance unchanged)."""
    if isinstance(name_or_pattern, AttentionPattern):
        return name_or_pattern
    cls = ATTENTION_PATTERNS.get(name_or_pattern)
    if cls is None or (selectable_only and not cls.selectable):
        names = selectable_patterns() if selectable_only else sorted(ATTENTION_PATTERNS)
        raise ValueError(
            f"`attention` must be one of {names}, got attention={name_or_pattern!r}; use 'block' for KV-cached "
            "semi-autoregressive decoding or 'bidirectional' for infilling, or register a new pattern with "
            "@register_attention_pattern."
        )
    return cls()


@register_attention_pattern("causal")
class CausalPattern(AttentionPattern):
    """The AR pattern `p_k <= p_q`: the reference the diffusion patterns are tested against (not selectable)."""

    selectable = False

    def rule(self, layout):
        positions = layout.positions
        return lambda b, q, k: positions[b, k] <= positions[b, q]


@register_attention_pattern("bidirectional")
class BidirectionalPattern(AttentionPattern):
    """Every token of a document sees every other (DiffuLLaMA, LLaDA)."""

    padding_mask_only = True

    def rule(self, layout):
        return None

    def allows_every_pair(self, layout, past_length, length):
        return True


@register_attention_pattern("block")
class BlockPattern(AttentionPattern):
    """Bidirectional inside a block of `block_size` positions, causal across blocks (BD3-LM, Efficient-DLM).

    Trained with clean context (`clean_context=True`) on the two-stream layout `[x_t ; x_0]`: a noisy block sees
    itself and the clean earlier blocks, exactly what it sees at decoding time over the KV cache.
    """

    def check_layout(self, layout):
        if layout.block_size is None or layout.block_size <= 0:
            raise ValueError(f"The 'block' pattern needs a positive `block_size`, got block_size={layout.block_size}.")

    def rule(self, layout):
        block_ids, is_clean = layout.positions // layout.block_size, layout.is_clean

        def allowed(b, q, k):
            block_q, block_k = block_ids[b, q], block_ids[b, k]
            if is_clean is None:
                return block_k <= block_q
            clean_q, clean_k = is_clean[b, q], is_clean[b, k]
            noisy_rule = torch.where(clean_k, block_k < block_q, block_k == block_q)
            clean_rule = clean_k & (block_k <= block_q)
            return torch.where(clean_q, clean_rule, noisy_rule)

        return allowed

    def block_size(self, config):
        return config.block_size

    def uses_two_stream(self, config):
        return bool(config.clean_context)

    def allows_every_pair(self, layout, past_length, length):
        # A decoding window: the input lies in one block and the cache holds everything before it.
        if layout.is_clean is not None:
            return False
        return past_length // layout.block_size == (past_length + length - 1) // layout.block_size


@register_attention_pattern("annealed")
class AnnealedPattern(AttentionPattern):
    """Causal with a growing random part of the upper triangle opened during training, bidirectional at inference
    (DiffuLLaMA's attention-mask annealing, arXiv 2410.17891)."""

    def check_layout(self, layout):
        if layout.is_open is None:
            raise ValueError("The 'annealed' pattern needs `is_open`; build it with `annealed_open_entries`.")

    def rule(self, layout):
        positions, is_open = layout.positions, layout.is_open

        def allowed(b, q, k):
            pos_q, pos_k = positions[b, q], positions[b, k]
            return (pos_k <= pos_q) | is_open[pos_q, pos_k]

        return allowed

    def layout(self, config, positions, doc_ids, *, training=False, annealing_ratio=1.0, generator=None):
        if not training or annealing_ratio >= 1.0:
            # Fully annealed, and always at inference: the bidirectional pattern.
            return AttentionLayout("bidirectional", positions, doc_ids)
        num_positions = int(positions.max()) + 1
        is_open = annealed_open_entries(num_positions, annealing_ratio, generator=generator, device=positions.device)
        return AttentionLayout(self.name, positions, doc_ids, is_open=is_open)


@register_attention_pattern("tree")
class TreePattern(AttentionPattern):
    """Causal over a context, then a token tree (speculative verification of several candidate drafts at once, as in
    SpecInfer, arXiv:2305.09781, and Medusa, arXiv:2401.10774). Not selectable: it is a decoding-time pattern.

    The last `N` tokens of the key range are tree nodes (`layout.ancestors`, `[B, N, N]`); the tokens before them are
    the context. A context token sees the context causally (`p_k <= p_q`); a node sees the whole context (padding
    and uncommitted columns are removed by the padding mask) and its own ancestors, itself included. With each node
    at position `context length + depth`, every node is computed exactly as the last token of its path would be in
    a plain causal forward.
    """

    selectable = False

    def check_layout(self, layout):
        ancestors = layout.ancestors
        if ancestors is None or ancestors.dim() != 3 or ancestors.shape[1] != ancestors.shape[2]:
            raise ValueError("The 'tree' pattern needs `ancestors`, a `[batch, nodes, nodes]` boolean tensor.")

    def rule(self, layout):
        positions, ancestors = layout.positions, layout.ancestors
        start = positions.shape[1] - ancestors.shape[1]  # column of the first node

        def allowed(b, q, k):
            is_node_q, is_node_k = q >= start, k >= start
            node_q, node_k = (q - start).clamp(min=0), (k - start).clamp(min=0)
            from_node = ~is_node_k | ancestors[b, node_q, node_k]
            from_context = ~is_node_k & (positions[b, k] <= positions[b, q])
            return torch.where(is_node_q, from_node, from_context)

        return allowed


def positions_from_inputs(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, batch_size: int, length: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token positions and document ids over the whole key range.

    Explicit `position_ids` win (packing: a position that does not follow its left neighbour starts a new document).
    Else positions count real tokens of `attention_mask` (left padding: the first real token is position 0). Else
    `0..length-1`.

    Returns:
        `(positions, doc_ids)`, two `[B, length]` long tensors.
    """
    if position_ids is not None:
        positions = position_ids.expand(batch_size, -1).long()  # [B, S]
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        doc_ids = starts.long().cumsum(-1) - 1  # [B, S]
        return positions, doc_ids
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, S]
    else:
        positions = torch.arange(length, device=device).expand(batch_size, -1)  # [B, S]
    return positions, torch.zeros_like(positions)


def annealed_open_entries(
    num_positions: int, ratio: float, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """The opened entries of the annealed pattern: each upper-triangle entry is open with probability `ratio`.

    DiffuLLaMA (arXiv 2410.17891, attention mask annealing) opens a growing random part of the upper triangle,
    shared across the batch, until the mask is fully bidirectional.

    Returns:
        `torch.BoolTensor` of shape `(num_positions, num_positions)`.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"The annealing `ratio` must be in [0, 1], got ratio={ratio}.")
    scores = torch.rand(
        num_positions, num_positions, generator=generator, device=generator.device if generator else device
    )
    return (scores < ratio).to(device)  # [P, P]


def two_stream_layout(positions: torch.Tensor, doc_ids: torch.Tensor, block_size: int) -> AttentionLayout:
    """The clean-context training layout `[x_t ; x_0]` for `[B, L]` positions and document ids (both halves)."""
    batch, length = positions.shape
    is_clean = torch.zeros(batch, 2 * length, dtype=torch.bool, device=positions.device)  # [B, 2L]
    is_clean[:, length:] = True
    return AttentionLayout(
        pattern="block",
        positions=torch.cat([positions, positions], dim=1),  # [B, 2L]
        doc_ids=torch.cat([doc_ids, doc_ids], dim=1),  # [B, 2L]
        block_size=block_size,
        is_clean=is_clean,
    )


# ----------------------------------------------------------------------------------------------------------------
# Hooking into transformers' mask builders
# ----------------------------------------------------------------------------------------------------------------

_ACTIVE_LAYOUT: ContextVar[AttentionLayout | None] = ContextVar("peft_diffusion_attention_layout", default=None)
_ORIGINAL_MATERIALISERS: dict[str, Callable] = {}


@contextmanager
def diffusion_attention(layout: AttentionLayout) -> Iterator[AttentionLayout]:
    """Within this context, every mask a transformers model builds follows `layout` instead of the causal pattern."""
    install_mask_interface()
    token = _ACTIVE_LAYOUT.set(layout)
    try:
        yield layout
    finally:
        _ACTIVE_LAYOUT.reset(token)


def _wrap_materialiser(backend: str, original: Callable) -> Callable:
    def materialise(*args, mask_function=None, local_size=None, config=None, **kwargs):
        layout = _ACTIVE_LAYOUT.get()
        if layout is None:
            return original(*args, mask_function=mask_function, local_size=local_size, config=config, **kwargs)
        # Sliding-window layers pass their window as `local_size` (chunked layers too; those are refused in
        # `architectures.py`). The window stays, made symmetric.
        sliding_window = local_size if local_size is not None and local_size > 0 else None
        if layout.unmasked and sliding_window is None and backend in _UNMASKED_BACKENDS:
            return None  # every pair allowed: no mask, the backend's unmasked kernel
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=False)
        return original(
            *args, mask_function=layout.mask_function(sliding_window), local_size=None, config=config, **kwargs
        )

    materialise.__wrapped__ = original
    materialise._peft_diffusion_wrapper = True
    return materialise


@contextmanager
def non_causal(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Set `is_causal = False` on attention modules for the duration (restored after).

    sdpa reads `module.is_causal` when a layer gets no mask: without this, an unmasked layer would run causally.
    Not for gradient-checkpointed training: the recomputation in backward runs outside this context.
    """
    saved = _compat.set_attention_is_causal(modules, False)
    try:
        yield
    finally:
        for module, value in saved:
            module.is_causal = value


def install_mask_interface() -> None:
    """Wrap transformers' sdpa/eager/flex mask materialisers once per process (idempotent, inactive by default)."""
    for backend in _compat.MATERIALISER_KEYWORDS:
        current = _compat.mask_materialiser(backend)
        if getattr(current, "_peft_diffusion_wrapper", False):
            continue
        _compat.check_mask_materialiser(backend, current)
        _ORIGINAL_MATERIALISERS[backend] = current
        AttentionMaskInterface.register(backend, _wrap_materialiser(backend, current))
