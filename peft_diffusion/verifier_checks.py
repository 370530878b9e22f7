"""What the base model must do for self-speculative decoding to give its own text, probed once per model.

Speculation verifies a whole draft in one forward of the base (`speculation.py`), so a token's logits must not
depend on later tokens (`check_causal`); a draft tree puts the nodes of one depth at one position, so the base must
take its positions from `position_ids` and its mask from the attention pattern (`check_tree_positions`). Each probe is
a few forwards of 3-4 tokens, run once per model object and remembered; what fails is refused with a message.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache

from . import _compat
from .attention import AttentionLayout, diffusion_attention

__all__ = ["check_causal", "check_tree_positions", "takes_position_ids"]


# verifier -> {probe name: passed}
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def takes_position_ids(verifier) -> bool:
    """Whether the base's forward takes `position_ids` (HF `generate` passes them only then)."""
    return "position_ids" in inspect.signature(verifier.forward).parameters


def _probe(verifier, name: str, run: Callable[[], bool]) -> bool:
    results = _PROBED.setdefault(verifier, {})
    if name not in results:
        with torch.no_grad():
            results[name] = run()
    return results[name]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of two differently shaped forwards in the logits' dtype (1e-4 relative in float32,
    16 ulps in half precision)."""
    relative = max(1e-4, 16 * torch.finfo(a.dtype).eps)
    return bool((a.float() - b.float()).abs().max() <= relative * max(1.0, float(b.abs().max())))


def check_causal(verifier, verifier_context: Callable, vocab_size: int) -> None:
    """Verification scores a whole draft in one forward, so a token's logits must not depend on later tokens. Some
    encoder families run as a causal LM only with `is_decoder=True`; without it they attend both ways. The probe: two
    uncached forwards that differ in their last token only."""

    def run() -> bool:
        tokens = torch.arange(1, 5, device=verifier.device)[None] % vocab_size  # [1, 4]
        other = tokens.clone()
        other[0, -1] = (tokens[0, -1] + 1) % vocab_size
        with verifier_context():
            first, second = (verifier(input_ids=ids, use_cache=False).logits[0, :-1] for ids in (tokens, other))
        return _close(first, second)

    if not _probe(verifier, "causal", run):
        raise ValueError(
            f"`speculative=True` needs a causal base model, but {type(verifier).__name__} attends both ways (its "
            "logits depend on later tokens); load it as a decoder (e.g. `is_decoder=True` for BERT-family models) or "
            "decode without `speculative`."
        )


def check_tree_positions(verifier, verifier_context: Callable, vocab_size: int) -> None:
    """Draft-tree nodes of one depth share a position (`committed length + depth`) and must not see each other, so
    the base must take its positions from `position_ids` and its mask from the pattern. Some decoders number tokens
    by their order in the input and the cache instead (the BART family's learned positions, ALiBi built from the
    attention mask, ...): a tree would be verified at wrong positions there, so `tree_size` is refused. The probe is
    one tree verification in miniature: a cached context token, then a context token and two sibling nodes; the second
    node's logits must match a plain causal forward over the context and that node alone."""

    def run() -> bool:
        device = verifier.device
        tokens = torch.arange(1, 5, device=device)[None] % vocab_size  # [1, 4]: two context tokens, two siblings
        positions = torch.tensor([[0, 1, 2, 2]], device=device)
        ancestors = torch.eye(2, dtype=torch.bool, device=device)[None]
        layout = AttentionLayout("tree", positions, torch.zeros_like(positions), ancestors=ancestors)

        reads_positions = takes_position_ids(verifier)

        def position_kwargs(columns: slice) -> dict:
            return {"position_ids": positions[:, columns]} if reads_positions else {}

        cache = DynamicCache()
        with verifier_context():
            verifier(input_ids=tokens[:, :1], **position_kwargs(slice(0, 1)), **{_compat.CACHE_KWARG: cache})
            with diffusion_attention(layout):
                tree_logits = verifier(
                    input_ids=tokens[:, 1:],
                    attention_mask=torch.ones_like(tokens),
                    **position_kwargs(slice(1, 4)),
                    **{_compat.CACHE_KWARG: cache},
                ).logits[0, -1]
            path = tokens[:, [0, 1, 3]]
            path_logits = verifier(input_ids=path, **position_kwargs(slice(0, 3)), use_cache=False).logits[0, -1]
        return _close(tree_logits, path_logits)

    if not _probe(verifier, "tree", run):
        raise ValueError(
            f"`tree_size` needs a base model that takes positions from `position_ids` and its mask from the attention "
            f"pattern (tree nodes of one depth share a position and do not see each other), but "
            f"{type(verifier).__name__} numbers tokens by their order (a probe tree forward differs from the causal "
            "one); drop `tree_size` to verify the chain draft alone."
        )
