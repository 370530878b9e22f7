"""Two views of one LoRA model for inference without PEFT's per-layer dispatch: the base alone, and the adapter
model through lean LoRA layers.

Self-speculative decoding (`speculation.py`) alternates every round between the drafter (the adapter on) and the
base (the adapter off); plain decoding, infilling and likelihoods run the adapter model for many forwards. Through
PEFT every LoRA layer pays for its dispatch (checks, dropout, casts, a scaling multiply and an add: about eight small
operations), which at a few tokens per forward costs far more than the rank-r matrix products themselves: on
SmolLM2-135M with LoRA r=32 on all 210 linear layers, a drafter forward of 8 tokens took 146-183 ms through PEFT and
121-141 ms with the adapter merged into the weights (one CPU thread, 2026-12-07). `AdapterViews` swaps modules
instead, and never writes a weight:

- `base()`: every plain LoRA linear layer is replaced in its parent module by its own `base_layer` (the very module
  PEFT wraps, so the output is the base's bit for bit); adapter layers that cannot be replaced (other LoRA layer
  types, token rows that are read) are switched off with their public `enable_adapters(False)`, the call PEFT's
  `disable_adapter()` makes.
- `adapter()`: every plain LoRA linear layer is replaced by a `LeanLora` holding the same base layer and the same
  `A` with `B` pre-scaled: `base(x) + (x A^T)(s B)^T`, three operations. Measured beside the merged weights: the
  same time within noise (135-138 ms), without a copy of the weights or the time to build one. Its output equals
  PEFT's up to float rounding (the scaling is applied to `B`, not to the product).

Both contexts restore the PEFT layers when they exit, also on an error. Inference only: `lean_inference` does nothing
with gradients on (a training forward must reach PEFT's parameters through its layers). Not for two threads on one
model.

"Plain LoRA linear layer": exactly `peft.tuners.lora.Linear` (not a quantized or other subclass), vanilla LoRA for
every active adapter (no DoRA or other variant, no `lora_bias`), no active dropout, not merged, adapters enabled.

Trainable token rows that the verification never reads stay on in `base()`: rows at or past `vocab_size` (the mask
token's row added for the conversion) are neither an input of a verification (the canvas holds committed and drafted
tokens) nor a scored logit column, so the base's output is the same with them, and they stay merged
(`token_rows_merged`) instead of being unmerged by the switch and rebuilt on every draft forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper

__all__ = ["AdapterViews", "LeanLora", "lean_inference"]


def _active(layer: LoraLinear) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _is_plain_lora_linear(module: torch.nn.Module) -> bool:
    if type(module) is not LoraLinear or module.merged or module.disable_adapters:
        return False
    active = _active(module)
    return bool(active) and all(
        name not in module.lora_variant
        and not module.lora_bias.get(name, False)
        and (isinstance(module.lora_dropout[name], torch.nn.Identity) or not module.lora_dropout[name].training)
        for name in active
    )


class LeanLora(torch.nn.Module):
    """`base(x) + sum_a (x A_a^T)(s_a B_a)^T` over the active adapters of a plain LoRA linear layer: PEFT's LoRA
    forward in three operations per adapter (module docstring). Holds the layer's own base layer and `A`; `s B` is
    computed once, here."""

    def __init__(self, layer: LoraLinear):
        super().__init__()
        self.base_layer = layer.get_base_layer()
        with torch.no_grad():
            self.pairs = [
                (layer.lora_A[name].weight, layer.lora_B[name].weight * layer.scaling[name]) for name in _active(layer)
            ]

    def __getattr__(self, name: str):
        """The base layer's attributes (`weight`, `in_features`, ...), as PEFT's LoRA layers give them: modeling code
        reads e.g. `o_proj.weight.dtype` (Hunyuan MoE) or `in_features` (Ergo)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for weight_a, weight_b in self.pairs:
            result = result + F.linear(F.linear(x.to(weight_a.dtype), weight_a), weight_b).to(result.dtype)
        return result


class AdapterViews:
    """The base and the adapter views of `peft_model` (module docstring).

    Args:
        peft_model (`PeftModel`): the adapter model; its layers are found once, here.
        vocab_size (`int`, *optional*): the vocabulary the base view scores; token rows at or past it stay on in
            `base()` (None: every token row is switched off there).
    """

    def __init__(self, peft_model: PeftModel, vocab_size: int | None = None):
        def unread(module) -> bool:
            layer = getattr(module, "token_adapter", module)
            if vocab_size is None or not isinstance(layer, TrainableTokensLayer):
                return False
            return all(not indices or min(indices) >= vocab_size for indices in layer.token_indices.values())

        self.swaps: list[tuple[torch.nn.Module, str, LoraLinear]] = []  # (parent, attribute, LoRA layer)
        self.switched: list[torch.nn.Module] = []  # switched off by `enable_adapters(False)` in `base()`
        for name, module in peft_model.named_modules():
            if _is_plain_lora_linear(module):
                parent_name, _, attribute = name.rpartition(".")
                self.swaps.append((peft_model.get_submodule(parent_name), attribute, module))
            elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not unread(module):
                self.switched.append(module)
        # what each view puts in the swapped places: PEFT's layers, their base layers, lean layers
        self.peft = [layer for _, _, layer in self.swaps]
        self.bases = [layer.get_base_layer() for layer in self.peft]
        self.lean = [LeanLora(layer) for layer in self.peft]

    def _put(self, modules) -> None:
        for (parent, attribute, _), module in zip(self.swaps, modules, strict=True):
            setattr(parent, attribute, module)

    def _restore(self) -> None:
        self._put(self.peft)

    @contextlib.contextmanager
    def base(self):
        """The base model: LoRA linears replaced by their base layers, other adapter layers switched off."""
        self._put(self.bases)
        for layer in self.switched:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.switched:
                layer.enable_adapters(True)
            self._restore()

    @contextlib.contextmanager
    def adapter(self):
        """The adapter model: LoRA linears replaced by `LeanLora` layers, other adapter layers as they are."""
        self._put(self.lean)
        try:
            yield
        finally:
            self._restore()


@contextlib.contextmanager
def lean_inference(model: torch.nn.Module):
    """Inference through `LeanLora` layers for the duration of the context (`AdapterViews.adapter`): the adapter model
    without PEFT's per-layer dispatch. A no-op with gradients on (a training forward must reach the LoRA weights
    through PEFT's layers) and for a model without a PEFT adapter. `model`: a `PeftModel`, or a `DiffusionLM` holding
    one."""
    peft_model = model if isinstance(model, PeftModel) else getattr(model, "model", None)
    if torch.is_grad_enabled() or not isinstance(peft_model, PeftModel):
        yield
        return
    with AdapterViews(peft_model).adapter():
        yield


# ----------------------------------------------------------------------------------------------------------------------
# The LM head over a few rows on CPU
# ----------------------------------------------------------------------------------------------------------------------


def _head_rows_first(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as `(weight @ x^T)^T`: for a vocabulary-sized `weight` and 2-64 rows of
    `x`, 2-3x faster on the CPU BLAS of this project (`docs/benchmarks.md`, block forward), equal up to rounding."""
    rows = x.reshape(-1, x.shape[-1])
    out = (weight @ rows.T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def output_head(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """The module that holds `causal_lm`'s LM head weight: its output embeddings under PEFT's wrappers (a LoRA layer's
    base layer, the mask row's trainable-token layer and its base layer)."""
    head = causal_lm.get_output_embeddings()
    while isinstance(head, (AuxiliaryTrainingWrapper, BaseTunerLayer)):
        inner = getattr(head, "token_adapter", None) or getattr(head, "get_base_layer", lambda: None)()
        if inner is None or inner is head:
            break
        head = inner
    return head


@contextlib.contextmanager
def head_rows_first(causal_lm: torch.nn.Module, rows: int):
    """For the duration, the LM head of `causal_lm` computes its product weight-first (`_head_rows_first`) when it is a
    plain `nn.Linear` on CPU (under PEFT's wrappers, e.g. the mask row's trainable tokens: their base layer, which a
    merged token layer calls), inference only, and the forward scores between 2 and 64 rows. A no-op otherwise (GPU,
    quantized heads, training, one row)."""
    head = output_head(causal_lm)
    if (
        torch.is_grad_enabled()
        or type(head) is not torch.nn.Linear
        or head.weight.device.type != "cpu"
        or not 2 <= rows <= 64
        or "forward" in vars(head)
    ):
        yield
        return
    head.forward = lambda x: _head_rows_first(head.weight, head.bias, x)
    try:
        yield
    finally:
        del head.forward
