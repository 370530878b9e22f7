"""`DiffusionLM` and `get_diffusion_model`: any transformers causal LM as a masked diffusion LM.

`DiffusionLM` wraps the causal LM (plain for full finetuning, or a `peft.PeftModel` for LoRA/QLoRA), runs it under the
diffusion attention pattern of its `DiffusionConfig` (`attention.py`) and applies the shift, so that
`logits[:, i]` always predicts the token at position `i`.

Outline of `DiffusionLM.forward`:
1. positions and document ids over the whole key range (cache + input), from `position_ids` or `attention_mask`;
2. the attention layout: the config's pattern, or the two-stream `[x_t ; x_0]` layout when `clean_input_ids` is given
   under block attention with clean context;
3. the causal LM's forward inside `diffusion_attention(layout)`;
4. the shift (DiffuLLaMA, arXiv 2410.17891): the logits for position i are read at i - 1 (in the two-stream layout,
   the first token of a block reads the last token of the previous *clean* block, what it sees at inference);
5. the mask token's logit set to the dtype's minimum: the mask token is never a prediction.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from . import _compat
from .adapter_views import head_rows_first
from .architectures import check_architecture
from .attention import (
    AttentionLayout,
    diffusion_attention,
    get_attention_pattern,
    non_causal,
    positions_from_inputs,
    selectable_patterns,
    two_stream_layout,
)
from .config import DiffusionConfig
from .objective import diffusion_objective

logger = logging.getLogger(__name__)

DIFFUSION_CONFIG_NAME = "diffusion_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"


@dataclass
class DiffusionLMOutput(ModelOutput):
    """Output of `DiffusionLM.forward`.

    Args:
        loss (`torch.FloatTensor`, *optional*): the diffusion loss, when `labels` were given.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): `logits[:, i]` predicts the
            token at position `i` (shift already applied; the noisy half only in the two-stream layout).
        cache (`Cache`, *optional*): the KV cache, when `use_cache=True` (transformers' name since 5.24;
            `past_key_values` reads it too).
        metrics (`dict`, *optional*): detached training statistics (raw masked CE, mean t, masked fraction, masked
            CE summed per noise-level bucket `ce_sum_by_t` and masked targets per bucket `masked_by_t`, ...).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    metrics: dict | None = None

    @property
    def past_key_values(self) -> Cache | None:
        """The KV cache under its pre-5.24 transformers name."""
        return self.cache


class DiffusionLM(PreTrainedModel):
    r"""A causal LM turned into a masked diffusion LM.

    Build one with `get_diffusion_model` (or its classmethod spelling `DiffusionLM.from_causal_lm`), reload one with
    `DiffusionLM.from_pretrained` (a LoRA adapter folder or a full model) or, for full models, with
    `AutoModelForCausalLM.from_pretrained` after `import peft_diffusion`.

    Args:
        config (`DiffusionConfig`): the diffusion settings, with the base model's config as `base_config`.
        model (`PreTrainedModel` or `PeftModel`, *optional*): the causal LM to wrap; built from
            `config.base_config` when omitted (the path `from_pretrained` takes for full models).
    """

    config_class = DiffusionConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: DiffusionConfig, model: PreTrainedModel | PeftModel | None = None):
        super().__init__(config)
        if model is None:
            if config.base_config is None:
                raise ValueError("`DiffusionConfig.base_config` is empty: build the model with `get_diffusion_model`.")
            model = AutoModelForCausalLM.from_config(config.base_config)
        else:
            # A model handed over is initialised already (pretrained, LoRA layers included): `post_init` must not
            # re-initialise it.
            _compat.mark_initialized(model)
        check_architecture(_causal_lm(model).config)
        _check_attention_backend(config, _compat.attn_implementation(_causal_lm(model).config))
        self.model = model
        # The annealing ratio is training state: the trainer sets it every step (DiffuLLaMA's attention annealing).
        self.annealing_ratio = 1.0
        if (_compat.attn_implementation(self.causal_lm.config) or "").startswith("flash_attention"):
            # Flash kernels take only a padding mask: bidirectional attention reaches them through `is_causal`.
            self.causal_lm.config.is_causal = False
            _compat.set_attention_is_causal(_compat.attention_is_causal_modules(self.causal_lm), False)
        self.post_init()

    # ------------------------------------------------------------------------------------------------------------
    # Conversion
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_causal_lm(
        cls,
        model: PreTrainedModel | str,
        config: DiffusionConfig | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        peft_config: PeftConfig | None = None,
        load_in_4bit: bool = False,
        **model_kwargs,
    ) -> DiffusionLM:
        """Same as `get_diffusion_model`."""
        from .conversion import get_diffusion_model

        return get_diffusion_model(
            model, config, tokenizer=tokenizer, peft_config=peft_config, load_in_4bit=load_in_4bit, **model_kwargs
        )

    @property
    def is_peft(self) -> bool:
        """Whether the causal LM is wrapped by PEFT (LoRA/QLoRA)."""
        return isinstance(self.model, PeftModel)

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The underlying transformers causal LM (inside the PEFT wrapper, if any)."""
        return _causal_lm(self.model)

    def tie_weights(self, *args, **kwargs):
        # Under PEFT the wrapped causal LM tied its own weights; the prefixed names transformers derives through the
        # PeftModel wrapper do not exist.
        if self.is_peft:
            return
        return super().tie_weights(*args, **kwargs)

    def get_input_embeddings(self):
        return self.causal_lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.causal_lm.get_output_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """Enable gradient checkpointing on the causal LM (non-reentrant by default); `kwargs` (`every_n_layers`,
        `offload`, passed by the Trainer's `activation_checkpointing_enable`) go to the causal LM."""
        checkpoint_kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        self.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        if self.is_peft:
            # Frozen embeddings give checkpointed blocks inputs without grad; PEFT's usual fix.
            self.causal_lm.enable_input_require_grads()

    def gradient_checkpointing_disable(self):
        self.causal_lm.gradient_checkpointing_disable()

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------

    def attention_layout(
        self,
        positions: torch.Tensor,
        doc_ids: torch.Tensor,
        *,
        two_stream: bool = False,
        generator: torch.Generator | None = None,
    ) -> AttentionLayout:
        """The attention layout of one forward pass (see `attention.py`).

        Args:
            positions (`torch.LongTensor` of shape `(batch_size, total_length)`): positions over the key range.
            doc_ids (`torch.LongTensor` of shape `(batch_size, total_length)`): document ids over the key range.
            two_stream (`bool`): build the clean-context layout `[x_t ; x_0]` (positions and ids given for x_t).
            generator (`torch.Generator`, *optional*): draws the opened entries of the annealed pattern.
        """
        if two_stream:
            layout = two_stream_layout(positions, doc_ids, self.config.block_size)
        else:
            layout = self.config.attention_pattern.layout(
                self.config,
                positions,
                doc_ids,
                training=self.training,
                annealing_ratio=self.annealing_ratio,
                generator=generator,
            )
        if self.config.causal_first_token and layout.pattern != "causal":
            layout = dataclasses.replace(layout, causal_start=True)
        return layout

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        clean_input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.FloatTensor | None = None,
        generator: torch.Generator | None = None,
        labels: torch.LongTensor | None = None,
        t: torch.Tensor | None = None,
        is_masked: torch.Tensor | None = None,
        time_eps: float = 1e-3,
        antithetic_time: bool = False,
        complementary_masking: bool = False,
        normalization: str = "targets",
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> DiffusionLMOutput:
        r"""Logits of the diffusion LM, aligned to positions.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                The (noisy) tokens x_t; masked positions hold `config.mask_token_id`.
            attention_mask (`torch.Tensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
                1 for real tokens, 0 for padding (left or right). With a KV cache it covers the cached tokens too.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Positions; a position that does not follow its left neighbour starts a new packed document, and
                documents never attend to each other. Derived from `attention_mask` when omitted.
            clean_input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                The clean tokens x_0. Under block attention with `clean_context`, the model runs on the two-stream
                layout `[x_t ; x_0]` and returns the logits of the noisy half (training and likelihood scoring).
            cache (`Cache`, *optional*): a KV cache of committed tokens (block decoding). `past_key_values=` is
                accepted as its older name, as transformers does until 5.40.
            use_cache (`bool`, defaults to `False`): return the updated cache.
            generator (`torch.Generator`, *optional*): randomness of the annealed pattern and, with `labels`, of
                the time and the corruption.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                With labels, `input_ids` are the clean tokens x_0 and the forward returns the diffusion loss: the
                tokens with `labels != -100` are the targets (prompt and padding stay clean), a time t and a
                corruption are drawn (`noise.py`, `corruption.py`), and the masked cross-entropy is weighted by the ELBO weight
                (`loss.py`); one step of `objective.diffusion_objective`. Like a causal LM with labels, but the labels are not shifted by the caller.
            t (`torch.Tensor` of shape `(batch_size,)` or `(batch_size, num_blocks)`, *optional*): an explicit time
                (per block under block attention: block b holds the tokens with `position // block_size == b`,
                positions counted from each row's first real token) instead of a draw.
            is_masked (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*): explicit masked
                positions (needs `t`); used by tests and likelihood evaluation.
            time_eps (`float`, defaults to 1e-3): t is drawn from U(time_eps, 1).
            antithetic_time (`bool`, defaults to `False`): stratified draws of t over the batch (lower variance).
            complementary_masking (`bool`, defaults to `False`): add the complementary corruption of every row, so
                each target is masked exactly once per pair (Fast-dLLM v2); doubles the batch.
            normalization (`str`, defaults to `"targets"`): divide by the number of target tokens (the ELBO) or by
                the number of masked tokens (`"masked"`).
            num_items_in_batch (`int`, *optional*): the Trainer's count of target tokens over accumulated batches.
            logits_to_keep (`int`, defaults to 0): return the logits of the last `logits_to_keep` positions only (0:
                all); the LM head then runs on those rows (plus the one row the shift reads), as in transformers.
                Not with the two-stream layout.

        The body follows the numbered outline of the module docstring in one piece (longer than usual): the layout,
        the fast-path decision and the shift read the same positions and must agree.

        Returns:
            `DiffusionLMOutput` with `logits` of shape `(batch_size, sequence_length, vocab_size)` and, with
            `labels`, the `loss` and detached `metrics`.
        """
        if "past_key_values" in kwargs:
            if cache is not None:
                raise ValueError("Pass the KV cache once, as `cache` (`past_key_values` is its older name).")
            cache = kwargs.pop("past_key_values")
        if labels is not None:
            step = diffusion_objective(
                self,
                input_ids,
                labels,
                attention_mask=attention_mask,
                position_ids=position_ids,
                generator=generator,
                t=t,
                is_masked=is_masked,
                time_eps=time_eps,
                antithetic_time=antithetic_time,
                complementary_masking=complementary_masking,
                normalization=normalization,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
            return DiffusionLMOutput(loss=step.loss, logits=step.logits, metrics=step.metrics)
        embeds = input_ids if input_ids is not None else inputs_embeds
        batch_size, length = embeds.shape[:2]
        device = embeds.device
        past_length = cache.get_seq_length() if cache is not None else 0
        given_attention_mask = attention_mask  # before the padding mask of a cached forward is filled in

        # 1. positions and document ids over the key range
        if past_length > 0 and attention_mask is None:
            attention_mask = torch.ones(batch_size, past_length + length, dtype=torch.long, device=device)
        if attention_mask is not None and attention_mask.shape[1] != past_length + length:
            raise ValueError(
                f"`attention_mask` must cover the cached and the new tokens: expected {past_length + length} columns, "
                f"got {attention_mask.shape[1]}."
            )
        layout_position_ids = position_ids if past_length == 0 else None
        positions, doc_ids = positions_from_inputs(
            attention_mask, layout_position_ids, batch_size, past_length + length, device
        )

        # 2. the attention layout
        two_stream = clean_input_ids is not None and self.config.uses_clean_context
        if clean_input_ids is not None and not two_stream:
            raise ValueError(
                "`clean_input_ids` is only used under attention='block' with clean_context=True, got "
                f"attention={self.config.attention!r}, clean_context={self.config.clean_context}."
            )
        if two_stream and past_length > 0:
            raise ValueError("The two-stream `[x_t ; x_0]` layout is for training and scoring; it takes no KV cache.")
        layout = self.attention_layout(positions, doc_ids, two_stream=two_stream, generator=generator)
        # Unmasked fast path: the pattern allows every pair, one document (position ids only shape the layout
        # without a cache), no padding (checked last: it is the only host sync, and only taken when it can pay).
        unmasked = (
            (position_ids is None or past_length > 0)
            and self._allows_every_pair(layout, past_length, length)
            and (given_attention_mask is None or bool(given_attention_mask.all()))
        )
        if unmasked:
            layout = dataclasses.replace(layout, unmasked=True)

        model_positions = positions[:, past_length:]  # [B, L]
        model_attention_mask = attention_mask
        if two_stream:
            input_ids = torch.cat([input_ids, clean_input_ids], dim=1)  # [B, 2L]
            model_positions = torch.cat([model_positions, model_positions], dim=1)  # [B, 2L]
            if attention_mask is not None:
                model_attention_mask = torch.cat([attention_mask, attention_mask], dim=1)  # [B, 2L]

        if logits_to_keep < 0:
            raise ValueError(f"`logits_to_keep` must be >= 0 (0 keeps all), got logits_to_keep={logits_to_keep}.")
        if logits_to_keep and two_stream:
            raise ValueError("`logits_to_keep` is not supported with the two-stream `[x_t ; x_0]` layout; pass 0.")
        keep = min(logits_to_keep, length) if logits_to_keep else length
        if keep < length:
            # Under shift, logits of position i are read at i - 1: one more row of the LM head.
            kwargs["logits_to_keep"] = min(length, keep + int(self.config.shift))
        head_rows = None
        if two_stream and "logits_to_keep" not in kwargs and self._head_takes_rows():
            # The LM head only on the rows a prediction reads: the noisy half and the clean tokens before block
            # starts, not the whole clean copy (about half of the two-stream head's cost).
            head_rows = torch.unique(self._source_rows(length, True, positions, length))  # [R], sorted
            kwargs["logits_to_keep"] = head_rows

        # 3. the causal LM under the diffusion pattern (unmasked: no mask, non-causal kernels)
        keep_arg = kwargs.get("logits_to_keep")  # rows of the LM head: an index tensor, a count, or every row (0/None)
        head_rows_per_sequence = (
            keep_arg.numel() if torch.is_tensor(keep_arg) else keep_arg or (length * (2 if two_stream else 1))
        )
        with (
            diffusion_attention(layout),
            non_causal(self._attention_modules() if unmasked else ()),
            head_rows_first(self.causal_lm, batch_size * head_rows_per_sequence),
        ):
            outputs = self.model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds if input_ids is None else None,
                attention_mask=model_attention_mask,
                position_ids=model_positions,
                use_cache=use_cache,
                **{_compat.CACHE_KWARG: cache},
                return_dict=True,
                **kwargs,
            )
        raw_logits = outputs.logits  # [B, L or 2L, V]

        # 4. the shift
        if head_rows is not None and raw_logits.shape[1] == head_rows.numel():
            # the LM head ran on `head_rows` only: read the predicting rows there
            slot = torch.zeros(2 * length, dtype=torch.long, device=raw_logits.device)
            slot[head_rows] = torch.arange(head_rows.numel(), device=raw_logits.device)
            source = slot[self._source_rows(length, True, positions, length)]  # [B, L]
            logits = raw_logits.gather(1, source[..., None].expand(-1, -1, raw_logits.shape[-1]))  # [B, L, V]
        else:
            logits = self._align(raw_logits, length, two_stream, positions[:, past_length:], keep)  # [B, keep, V]

        # 5. the mask token is never predicted
        if self.config.mask_token_id is not None:
            logits[..., self.config.mask_token_id] = torch.finfo(logits.dtype).min
        return DiffusionLMOutput(logits=logits, cache=_compat.output_cache(outputs) if use_cache else None)

    def _allows_every_pair(self, layout: AttentionLayout, past_length: int, length: int) -> bool:
        """Whether every query may attend to every key, for unpadded single-document input (host-side facts only).

        The pattern decides (`AttentionPattern.allows_every_pair`): bidirectional attention always; block attention
        when the input lies in one block and the cache holds everything before it (a decoding window).
        Gradient checkpointing (transformers' or a `CheckpointWrapper`, as FSDP's activation checkpointing applies)
        recomputes layers in backward, outside the forward's `non_causal` context: it keeps the masked path.
        """
        if torch.is_grad_enabled() and (
            self.causal_lm.is_activation_checkpointing
            or any(type(module).__name__ == "CheckpointWrapper" for module in self.model.modules())
        ):
            return False
        if layout.causal_start and past_length == 0 and length > 1:  # the first token is a query, and sees only itself
            return False
        return get_attention_pattern(layout.pattern, selectable_only=False).allows_every_pair(
            layout, past_length, length
        )

    def _head_takes_rows(self) -> bool:
        """Whether the causal LM's forward takes `logits_to_keep` (nearly all do; e.g. trocr and whisper do not)."""
        if getattr(self, "_takes_logits_to_keep", None) is None:
            self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.causal_lm.forward).parameters
        return self._takes_logits_to_keep

    def _attention_modules(self) -> list[torch.nn.Module]:
        """The modules carrying an `is_causal` flag (attention layers), found once."""
        if getattr(self, "_is_causal_modules", None) is None:
            self._is_causal_modules = _compat.attention_is_causal_modules(self.causal_lm)
        return self._is_causal_modules

    def _align(
        self, raw_logits: torch.Tensor, length: int, two_stream: bool, positions: torch.Tensor, keep: int | None = None
    ) -> torch.Tensor:
        """`logits[:, i]` predicts token i, for the last `keep` of `length` positions (all by default). Without
        shift this is the identity (on the noisy half). `raw_logits` holds the last rows of the model's output."""
        keep = length if keep is None else keep
        if not self.config.shift and not two_stream:
            return raw_logits[:, :length].clone() if keep == length else raw_logits[:, -keep:]
        offset = length - raw_logits.shape[1] if not two_stream else 0  # rows the LM head skipped
        source = self._source_rows(length, two_stream, positions, keep) - offset  # [B, keep]
        gather_index = source.clamp(min=0)[..., None].expand(-1, -1, raw_logits.shape[-1])  # [B, keep, V]
        return raw_logits.gather(1, gather_index)  # [B, keep, V]

    def _source_rows(self, length: int, two_stream: bool, positions: torch.Tensor, keep: int) -> torch.Tensor:
        """For each of the last `keep` positions, the row of the model's full output that predicts it: `[B, keep]`
        (in `[0, 2L)` for the two-stream layout)."""
        positions = positions[:, length - keep :]  # [B, keep]
        index = torch.arange(length - keep, length, device=positions.device).expand(positions.shape[0], -1)
        if not self.config.shift:
            return index  # [B, keep]
        # The first token of a document has no left neighbour: it reads itself (it is never a target under shift),
        # so padding or a previous packed document never leaks into it. With a KV cache, the first input token's left
        # neighbour is cached and has no logits here: it reads itself too, so its row is no prediction (the decoding
        # loop keeps those logits from the forward that committed the neighbour: `decoding.py`).
        source = torch.where(positions == 0, index, index - 1)  # [B, keep]
        if two_stream:
            # The first token of a noisy block is predicted from the clean copy of the previous token: under the
            # clean-context pattern the noisy previous token lives in another block and cannot be the context.
            starts_block = (positions % self.config.block_size == 0) & (positions > 0)  # [B, L]
            source = torch.where(starts_block, source + length, source)  # [B, L]
        return source

    # ------------------------------------------------------------------------------------------------------------
    # Generation (the public side lives in generation.py, the loop in decoding.py)
    # ------------------------------------------------------------------------------------------------------------

    def can_generate(self) -> bool:
        return True

    @torch.no_grad()
    def generate(
        self, input_ids: torch.LongTensor | None = None, *, speculative: bool = False, verifier=None, **kwargs
    ):
        """Parallel denoising; see `peft_diffusion.generation.generate` for the arguments. With `speculative=True`,
        the base model's own output, drafted by the adapter and verified by the base (or by `verifier`, a causal LM):
        see `peft_diffusion.speculation.speculative_generate`."""
        from .adapter_views import lean_inference
        from .conversion import token_rows_merged

        if verifier is not None and not speculative:
            raise ValueError("`verifier` is only used with `speculative=True`; pass both, or neither.")
        if kwargs.get("tree_size") is not None and not speculative:
            raise ValueError(
                "`tree_size` sizes the draft trees of speculative decoding; pass `speculative=True` with it, or drop it."
            )
        with token_rows_merged(self.model):
            if speculative:  # switches between its own views of the adapter model (`adapter_views.py`)
                from .speculation import speculative_generate

                return speculative_generate(self, input_ids, verifier=verifier, **kwargs)
            from .generation import generate

            with lean_inference(self.model):
                return generate(self, input_ids, **kwargs)

    @torch.no_grad()
    def infill(self, *args, **kwargs):
        """Fill gaps between fixed text (bidirectional attention); see `peft_diffusion.generation.infill`."""
        if kwargs.pop("speculative", False):
            raise ValueError(
                "`speculative=True` is for left-to-right generation (`generate`); `infill` fills gaps by denoising."
            )
        from .adapter_views import lean_inference
        from .conversion import token_rows_merged
        from .generation import infill

        with token_rows_merged(self.model), lean_inference(self.model):
            return infill(self, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Save / load
    # ------------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Save the model.

        Under PEFT: a standard PEFT adapter (loadable by stock `PeftModel.from_pretrained` on the base model) plus
        `diffusion_config.json`. Full finetuning: the weights and the `DiffusionConfig` as `config.json`, loadable
        with `AutoModelForCausalLM.from_pretrained` after `import peft_diffusion`.
        """
        if not self.is_peft:
            return super().save_pretrained(save_directory, **kwargs)
        os.makedirs(save_directory, exist_ok=True)
        peft_kwargs = {
            key: kwargs[key] for key in ("safe_serialization", "selected_adapters", "is_main_process") if key in kwargs
        }
        if kwargs.get("is_main_process", True):
            # The adapter alone (LoRA + mask-token row): PEFT's "auto" would add both full embedding matrices whenever
            # the base folder's vocabulary is smaller (the mask-token resize), and on a tied model a copy of the mask
            # row that PEFT cannot load back (`conversion.adapter_weight_names`).
            self.model.save_pretrained(save_directory, save_embedding_layers=False, **peft_kwargs)
            self.config.to_json_file(os.path.join(save_directory, DIFFUSION_CONFIG_NAME))
            if self.can_generate() and self.generation_config is not None:
                self.generation_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        base_model: PreTrainedModel | None = None,
        is_trainable: bool = False,
        allow_base_mismatch: bool = False,
        **kwargs,
    ) -> DiffusionLM:
        """Load a saved diffusion LM: a LoRA adapter folder (base + adapter + diffusion settings) or a full model.

        Args:
            pretrained_model_name_or_path (`str`): a local folder or a Hub id.
            base_model (`PreTrainedModel`, *optional*): the base causal LM of an adapter; loaded from
                `config.base_model_name_or_path` when omitted. It becomes part of the returned model, as with PEFT's
                `PeftModel.from_pretrained`: the adapter is injected into it and its embeddings gain the mask row in
                place, so a second adapter needs a fresh copy of the base (its fingerprint check refuses this one).
            is_trainable (`bool`, defaults to `False`): keep the adapter trainable (to continue training).
            allow_base_mismatch (`bool`, defaults to `False`): load an adapter onto a base whose fingerprint
                (config, vocabulary, embedding checksum) differs from the one it was trained on.
            kwargs: passed to the base model's `from_pretrained` (`dtype`, `attn_implementation`, `device_map`, ...).

        Loading is strict: missing or unexpected weights are errors, code shipped with a checkpoint is never run, and
        the model is returned in eval mode (as transformers models are).
        """
        if kwargs.get("trust_remote_code"):
            raise ValueError(
                "peft-diffusion never runs code shipped with a checkpoint: `trust_remote_code=True` is not supported."
            )
        kwargs.pop("trust_remote_code", None)
        hub_kwargs = {
            key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs
        }
        adapter_file = _compat.find_file(pretrained_model_name_or_path, ADAPTER_CONFIG_NAME, **hub_kwargs)
        from .conversion import load_adapter_model, restore_generation_config

        if adapter_file is None:
            model = _load_full_model(super().from_pretrained, pretrained_model_name_or_path, *model_args, **kwargs)
            return restore_generation_config(model, pretrained_model_name_or_path, hub_kwargs)

        return load_adapter_model(
            cls,
            pretrained_model_name_or_path,
            base_model=base_model,
            is_trainable=is_trainable,
            allow_base_mismatch=allow_base_mismatch,
            hub_kwargs=hub_kwargs,
            **kwargs,
        )


def _load_full_model(load, path, *model_args, **kwargs) -> DiffusionLM:
    """`PreTrainedModel.from_pretrained` of a full diffusion model, refusing missing, unexpected or mismatched
    weights (transformers would initialise missing ones randomly and only log it)."""
    model, info = load(path, *model_args, output_loading_info=True, trust_remote_code=False, **kwargs)
    problems = {key: value for key, value in info.items() if key != "error_msgs" and value}
    if problems or info.get("error_msgs"):
        details = "; ".join(f"{key}: {sorted(value)[:3]}" for key, value in problems.items())
        raise ValueError(
            f"The weights in {path} do not match the model ({details or info.get('error_msgs')}): the checkpoint is "
            "incomplete or belongs to another model."
        )
    return model.eval()


def _causal_lm(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _check_attention_backend(config: DiffusionConfig, implementation: str | None) -> None:
    """Flash kernels take only a 2D padding mask: causal or fully bidirectional, nothing in between."""
    if not (implementation or "").startswith("flash_attention"):
        return
    if not config.attention_pattern.supports_backend(implementation):
        supported = [
            name for name in selectable_patterns() if get_attention_pattern(name).supports_backend(implementation)
        ]
        raise ValueError(
            f"attn_implementation={implementation!r} supports only "
            + " or ".join(f"attention={name!r}" for name in supported)
            + f", got "
            f"attention={config.attention!r}; use attn_implementation='sdpa' (or 'flex_attention' on a GPU)."
        )
    if config.causal_first_token and config.attention != "causal":
        raise ValueError(
            f"attn_implementation={implementation!r} takes only a padding mask, and causal_first_token=True needs "
            "the first token to see only itself: use attn_implementation='sdpa' (or 'flex_attention' on a GPU), or "
            "causal_first_token=False."
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            f"attn_implementation={implementation!r} needs flash-attn (GPU only): "
            '`pip install "peft-diffusion[flash]"`, or use attn_implementation="sdpa".'
        )
