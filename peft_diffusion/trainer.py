"""`DiffusionTrainer`: TRL's `SFTTrainer` with the masked-diffusion objective.

Everything about data is TRL's: `SFTTrainer._prepare_dataset` tokenizes text / prompt-completion / chat `messages`,
builds `labels` with -100 on prompt, non-assistant and padding tokens, truncates and packs. The diffusion model noises
exactly the tokens with `labels != -100` (`DiffusionLM.forward(labels=...)`), so prompts stay clean in every format.
Under padding-free packing, TRL passes `position_ids` restarting at every document; `DiffusionLM` turns them into
document ids, and documents never attend to each other.

What this subclass adds:
1. conversion: a causal LM (object or path) plus `diffusion_config` (+ `peft_config`) becomes a `DiffusionLM`;
2. a collator step: the first token of each document is no target under the shift, and `eos_policy="all"` turns
   trailing padding into EOS targets, both *before* the Trainer counts `num_items_in_batch`;
3. `compute_loss`: the model's own diffusion loss (never TRL's shifted causal loss), the annealing ratio from the
   global step (restored on resume), detached metrics averaged between logging steps;
4. evaluation: `eval_loss` with `"targets"` normalization and a fixed noise seed, `eval_nll_bound` (the ELBO bound on
   the NLL per target token, token-weighted over the eval set) and `eval_ppl_bound = exp(eval_nll_bound)`;
5. checkpoints: a PEFT `DiffusionLM` saves a standard adapter + `diffusion_config.json`; resuming loads the adapter
   (mask-token row included) back into the wrapped `PeftModel`;
6. Ctrl-C: the optimizer step finishes, a resumable checkpoint is saved and `KeyboardInterrupt` names it
   (`SaveOnInterrupt`, `DiffusionTrainer.train`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import signal
import threading
from collections import defaultdict
from collections.abc import Callable

import torch
from peft import PeftConfig, set_peft_model_state_dict
from peft.utils import load_peft_weights
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from . import _compat
from .budget import BudgetProgressCallback, TimeBudget, TimeBudgetSchedule
from .config import DiffusionConfig
from .conversion import check_adapter_weights, get_diffusion_model
from .model import DiffusionLM
from .objective import reduce_metrics
from .training_config import DiffusionTrainingConfig
from .training_data import (  # noqa: F401 (eos_targets: part of the trainer's API)
    DiffusionDataCollator,
    _check_dataset,
    _check_packing,
    _check_prepared,
    eos_targets,
)

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer's state in every checkpoint folder


# ----------------------------------------------------------------------------------------------------------------
# Training schedule and label preparation
# ----------------------------------------------------------------------------------------------------------------


def annealing_ratio(step: int, anneal_steps: int) -> float:
    """DiffuLLaMA's attention-mask annealing: the opened fraction grows linearly from 0 to 1 over `anneal_steps`
    optimizer steps, then the attention stays bidirectional (`anneal_steps=0`: bidirectional from the start)."""
    if anneal_steps < 0:
        raise ValueError(f"`anneal_steps` must be >= 0, got anneal_steps={anneal_steps}.")
    if anneal_steps == 0:
        return 1.0
    return min(1.0, max(0, step) / anneal_steps)


class SaveOnInterrupt(TrainerCallback):
    """Ctrl-C during `DiffusionTrainer.train`: finish the optimizer step, save a resumable checkpoint, stop.

    `handle_interrupt` is the SIGINT handler `DiffusionTrainer.train` installs for its duration (main thread only):
    the first call sets a flag, a second one raises `KeyboardInterrupt` at once (nothing more is saved). At the end of
    the optimizer step the flag asks the Trainer for a normal checkpoint (`control.should_save`, model, optimizer,
    scheduler, RNG and trainer state) and to stop (`control.should_training_stop`). Under several processes the flag
    is OR-ed over ranks at each step end, so every rank saves and stops at the same step.
    """

    def __init__(self, trainer: DiffusionTrainer):
        self.trainer = trainer
        self.requested = False
        self.checkpoint: str | None = None

    def handle_interrupt(self, signum, frame) -> None:
        if self.requested:
            signal.default_int_handler(signum, frame)  # the second Ctrl-C: KeyboardInterrupt now
        self.requested = True
        logger.warning(
            "Ctrl-C: finishing the current optimizer step, then saving a checkpoint in %s and stopping (Ctrl-C again "
            "stops at once, without saving).",
            self.trainer.args.output_dir,
        )

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if self.trainer.accelerator.num_processes > 1:
            flag = torch.tensor([float(requested)], device=self.trainer.accelerator.device)  # [1]
            requested = bool(self.trainer.accelerator.gather(flag).amax())
        if requested:
            self.requested = True
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.requested:
            self.checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class DiffusionTrainer(_compat.CheckpointLoading, SFTTrainer):
    r"""Train a masked diffusion LM with TRL's dataset handling (conversion by continued pretraining, or SFT).

    Args:
        model (`DiffusionLM`, `PreTrainedModel` or `str`):
            A `DiffusionLM` (from `get_diffusion_model`), or a causal LM / a path to one together with
            `diffusion_config`: the trainer converts it with `get_diffusion_model`.
        args (`DiffusionTrainingConfig`, *optional*): training arguments; defaults to
            `DiffusionTrainingConfig("<model name>-diffusion")`.
        data_collator, train_dataset, eval_dataset, callbacks, optimizers, formatting_func, compute_metrics:
            as in `trl.SFTTrainer`. Datasets: `text` (continued pretraining, with packing), `prompt`/`completion`
            (the prompt stays clean) or chat `messages` (with `assistant_only_loss=True` only assistant turns are
            noised; needs a chat template with `{% generation %}`).
        processing_class (`PreTrainedTokenizerBase`, *optional*): the tokenizer; loaded from `model` when it is a
            path. Needed to find or add the mask token when the trainer converts the model.
        diffusion_config (`DiffusionConfig`, *optional*): the diffusion settings for conversion.
        peft_config (`PeftConfig`, *optional*): e.g. `LoraConfig(r=64, target_modules="all-linear")` for conversion;
            `None` is full finetuning.
        quantization_config (`BitsAndBytesConfig`, *optional*): load the base (a path) quantized, for QLoRA.

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from peft import LoraConfig
    >>> from peft_diffusion import DiffusionConfig, DiffusionTrainer, DiffusionTrainingConfig
    >>> trainer = DiffusionTrainer(
    ...     model="path/to/causal-lm",
    ...     args=DiffusionTrainingConfig("out", max_steps=10, max_length=256, packing=True),
    ...     train_dataset=Dataset.from_dict({"text": ["Once upon a time ..."] * 64}),
    ...     diffusion_config=DiffusionConfig(attention="block", block_size=32),
    ...     peft_config=LoraConfig(r=64, target_modules="all-linear"),
    ... )  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    _tag_names = ["trl", "sft", "peft-diffusion", "diffusion-lm"]
    _name = "Diffusion"

    def __init__(
        self,
        model: DiffusionLM | PreTrainedModel | str,
        args: DiffusionTrainingConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        *,
        diffusion_config: DiffusionConfig | None = None,
        peft_config: PeftConfig | None = None,
        quantization_config=None,
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path or "model"
            args = DiffusionTrainingConfig(f"{os.path.basename(str(name).rstrip('/')) or 'model'}-diffusion")
        elif not isinstance(args, DiffusionTrainingConfig):
            raise TypeError(
                f"`args` must be a `DiffusionTrainingConfig`, got {type(args).__name__}; build one with the same "
                "arguments: `DiffusionTrainingConfig(**sft_args)` (it subclasses `trl.SFTConfig`)."
            )
        _check_dataset(train_dataset, args, kwargs.get("formatting_func"), "train_dataset")
        if eval_dataset is not None:
            for name, dataset in eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]:
                _check_dataset(dataset, args, kwargs.get("formatting_func"), f"eval_dataset[{name!r}]")
        _check_packing(train_dataset, args)
        if processing_class is None and isinstance(model, (str, os.PathLike)):
            processing_class = AutoTokenizer.from_pretrained(model)
        if processing_class is None:
            raise ValueError(
                "`processing_class` is required: pass the model's tokenizer (the trainer tokenizes the data with it)."
            )

        # 1. conversion
        if isinstance(model, DiffusionLM):
            if diffusion_config is not None or peft_config is not None or quantization_config is not None:
                raise ValueError(
                    "`model` is already a DiffusionLM: `diffusion_config`, `peft_config` and `quantization_config` "
                    "are for converting a causal LM; drop them, or pass the plain causal LM."
                )
            if not any(parameter.requires_grad for parameter in model.parameters()):
                raise ValueError(
                    "`model` has no trainable parameters: `DiffusionLM.from_pretrained` loads an adapter frozen, for "
                    "inference. Load it with `DiffusionLM.from_pretrained(path, is_trainable=True)` to train it on."
                )
        else:
            if diffusion_config is None:
                raise ValueError(
                    f"`model` is a {type(model).__name__}, not a DiffusionLM: pass `diffusion_config=DiffusionConfig(...)`"
                    " so the trainer converts it, or convert it first with `get_diffusion_model`."
                )
            model_kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                if not isinstance(model, (str, os.PathLike)):
                    raise ValueError(
                        "`quantization_config` needs `model` as a path to load the base from; pass a path, or an "
                        "already-quantized model without `quantization_config`."
                    )
                if importlib.util.find_spec("bitsandbytes") is None:
                    raise ImportError(
                        '`quantization_config` (QLoRA) needs bitsandbytes: `pip install "peft-diffusion[qlora]"`.'
                    )
                model_kwargs["quantization_config"] = quantization_config
            elif not isinstance(model, (str, os.PathLike)) and model_kwargs:
                logger.warning("`model_init_kwargs` are ignored: `model` is already instantiated.")
                model_kwargs = {}
            # PEFT initialises the adapter randomly: seed first, like SFTTrainer, for reproducible runs.
            torch.manual_seed(args.seed)
            model = get_diffusion_model(
                model, diffusion_config, tokenizer=processing_class, peft_config=peft_config, **model_kwargs
            )
            args.model_init_kwargs = None  # consumed here; SFTTrainer would warn that they are ignored

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # 2. the data as TRL prepared it: tokens inside the vocabulary, no mask token, a target in every row
        if isinstance(eval_dataset, dict):
            evals = [(f"eval_dataset[{key!r}]", eval_dataset[key], self.eval_dataset[key]) for key in eval_dataset]
        else:
            evals = [("eval_dataset", eval_dataset, self.eval_dataset)] if eval_dataset is not None else []
        for name, given, prepared in [("train_dataset", train_dataset, self.train_dataset), *evals]:
            _check_prepared(
                prepared,
                given,
                name,
                args,
                num_rows=self.model.get_input_embeddings().weight.shape[0],
                mask_token_id=self.model.config.mask_token_id,
                mask_token=self.model.config.mask_token,
                shift=self.model.config.shift,
            )
        # 3. targets fixed before `num_items_in_batch` is counted; the diffusion labels are not shifted
        _compat.disable_label_shift_count(self)
        self.data_collator = DiffusionDataCollator(
            self.data_collator,
            shift=self.model.config.shift,
            eos_policy=args.eos_policy,
            eos_token_id=getattr(self.processing_class, "tokenizer", self.processing_class).eos_token_id,
        )
        self._diffusion_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._num_items_checked = False
        self._eval_generator: torch.Generator | None = None
        if args.teacher_weight > 0 and not self.model.is_peft:
            raise ValueError(
                f"`teacher_weight={args.teacher_weight}` needs a LoRA model: the AR teacher is the base, i.e. the same "
                "weights with the adapter disabled. Pass a `peft_config`, or set teacher_weight=0 for full finetuning."
            )
        self._interrupt = SaveOnInterrupt(self)
        self.add_callback(self._interrupt)
        # `max_train_minutes`: stop on the clock and run the learning-rate schedule on it (budget.py)
        self.time_budget = TimeBudget(args.max_train_minutes) if args.max_train_minutes is not None else None
        if self.time_budget is not None:
            self.add_callback(self.time_budget)
            shown = self.pop_callback(ProgressCallback)  # absent under disable_tqdm: then no bar at all
            if shown is not None:
                self.add_callback(BudgetProgressCallback(self.time_budget, max_str_len=shown.max_str_len))

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """`Trainer.create_scheduler`; under `max_train_minutes` a schedule whose progress is the budget spent."""
        created = self.lr_scheduler is None  # not a scheduler the user passed in `optimizers=`
        scheduler = super().create_scheduler(num_training_steps, optimizer)  # also marks it as the trainer's own
        if self.time_budget is None or not created:
            return scheduler
        kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        self.lr_scheduler = TimeBudgetSchedule(
            optimizer or self.optimizer,
            self.time_budget,
            kind,
            warmup_steps=self.args.get_warmup_steps(num_training_steps),
        )
        return self.lr_scheduler

    def train(self, *args, **kwargs):
        """`Trainer.train`, with nothing lost on Ctrl-C.

        The first Ctrl-C (SIGINT) lets the current optimizer step finish, saves a normal resumable checkpoint
        (`output_dir/checkpoint-<step>`: the adapter or model, optimizer, scheduler, RNG and trainer state, whatever
        `save_strategy` says) and then raises `KeyboardInterrupt`, whose message names the checkpoint and how to resume:
        `trainer.train(resume_from_checkpoint="<output_dir>/checkpoint-<step>")`. Raising, as an uncaught Ctrl-C
        does, stops a script where it was: the lines after `train()` (`save_model`, `push_to_hub`, evaluation) do not
        run on a half-trained model as if training had finished; catch `KeyboardInterrupt` to go on. A second Ctrl-C
        interrupts at once. The handler is installed only for the duration of `train()` and only in the main thread
        (signals reach no other); elsewhere, or when SIGINT is ignored, Ctrl-C behaves as without it.
        """
        checkpoint = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if isinstance(checkpoint, (str, os.PathLike)):
            _check_checkpoint(os.fspath(checkpoint))
        interrupt = self._interrupt
        interrupt.requested, interrupt.checkpoint = False, None
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is signal.SIG_IGN or previous is None:  # ignored, or not installed from Python: keep it
                previous = None
            else:
                signal.signal(signal.SIGINT, interrupt.handle_interrupt)
        try:
            output = super().train(*args, **kwargs)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if interrupt.requested:
            if interrupt.checkpoint is not None:
                message = (
                    f"Training interrupted (Ctrl-C) after step {self.state.global_step} of {self.state.max_steps}; "
                    f"saved a resumable checkpoint in {interrupt.checkpoint}. Resume with "
                    f"trainer.train(resume_from_checkpoint={interrupt.checkpoint!r}) (the CLI: "
                    f"--resume_from_checkpoint {interrupt.checkpoint})."
                )
            else:
                message = (
                    f"Training interrupted (Ctrl-C) after its last step ({self.state.global_step}): training had "
                    "finished, nothing was left to save."
                )
            raise KeyboardInterrupt(message)  # the message names the checkpoint (printed once, by whoever catches it)
        return output

    # ------------------------------------------------------------------------------------------------------------
    # Loss and metrics
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The diffusion loss of `DiffusionLM.forward(labels=...)` with the training knobs of `self.args`.

        1. the annealing ratio from the global step (optimizer steps; restored with the trainer state on resume);
        2. the forward with labels (training: the configured knobs; evaluation: the per-token ELBO, a fixed noise
           seed, no complementary copy);
        3. DDP averages gradients over ranks while `num_items_in_batch` counts every rank's tokens: scale back;
        4. detached metrics by name, gathered over ranks, reduced at the next log (`objective.reduce_metrics`).
        """
        args = self.args
        training = self.model.training
        mode = "train" if training else "eval"
        # 1. annealing
        if training:
            self.model.annealing_ratio = annealing_ratio(self.state.global_step, args.anneal_steps)
        if training and not self._num_items_checked:
            # The host's target count sets the loss scale: check it once where it can be checked exactly.
            if args.gradient_accumulation_steps == 1 and self.accelerator.num_processes == 1:
                _compat.check_num_items_in_batch(num_items_in_batch, inputs["labels"])
            self._num_items_checked = True
        # 2. forward: `num_items_in_batch` (the Trainer's target count over accumulated micro-batches) normalises the
        # per-target ELBO; the per-masked-token mean ("masked") has no such count
        per_target = args.loss_normalization == "targets"
        terms = {}  # the optional terms beside the ELBO, training only
        if training and args.teacher_weight > 0:
            terms = {
                "teacher_logits": self._teacher_logits(inputs),
                "teacher_weight": args.teacher_weight,
                "teacher_positions": args.teacher_positions,
            }
        if training and args.certainty_weight > 0:
            terms["certainty_weight"] = args.certainty_weight
            terms["certainty_temperature"] = args.certainty_temperature
        outputs = model(
            input_ids=inputs["input_ids"],
            labels=inputs["labels"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            time_eps=args.time_eps,
            antithetic_time=args.antithetic_time if training else False,
            complementary_masking=args.complementary_masking if training else False,
            normalization=args.loss_normalization if training else "targets",
            generator=None if training else self._eval_generator,
            num_items_in_batch=num_items_in_batch if training and per_target else None,
            **terms,
        )
        loss = outputs.loss
        # 3. token averaging across ranks; a per-masked-token mean is taken per micro-batch instead, and the Trainer,
        # which handed over `num_items_in_batch`, expects the loss already scaled for gradient accumulation
        if training and per_target and args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if training and not per_target and num_items_in_batch is not None:
            loss = loss / args.gradient_accumulation_steps
        # 4. metrics, by name
        metrics = dict(outputs.metrics)
        if not training:
            # the token-weighted ELBO over the eval set: sum of per-token bounds and number of targets
            metrics["nll_sum"] = outputs.loss.detach() * metrics["num_targets"]
        for name, value in self._gather_metrics(metrics).items():
            self._diffusion_metrics[mode][name].append(value)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _teacher_logits(self, inputs) -> torch.Tensor:
        """The AR teacher's next-token logits on the clean batch, aligned to positions (`[:, i]` predicts token i;
        `[:, 0]` is never read): the base model, i.e. the adapter disabled, with its own causal attention. The mask
        token gets no teacher mass."""
        diffusion_model = self.accelerator.unwrap_model(self.model)
        with diffusion_model.model.disable_adapter():
            logits = diffusion_model.causal_lm(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                position_ids=inputs.get("position_ids"),
            ).logits  # [B, L, V]
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # [B, L, V]: row i predicts token i
        logits[..., diffusion_model.config.mask_token_id] = float("-inf")
        return logits

    def evaluate(self, *args, **kwargs):
        # A fixed noise seed: evaluations are comparable across checkpoints, and the training RNG stream is untouched
        # (so resuming after an evaluation gives the uninterrupted result).
        self._eval_generator = torch.Generator(device=self.args.device).manual_seed(self.args.seed)
        return super().evaluate(*args, **kwargs)

    @torch.no_grad()
    def _gather_metrics(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gather the step's metrics over ranks in one collective: `[world]` per scalar, `[world, n]` per vector."""
        names = sorted(metrics)
        flat = [metrics[name].detach().float().reshape(-1) for name in names]
        sizes = [value.numel() for value in flat]
        gathered = self.accelerator.gather(torch.cat(flat)[None])  # [world, sum(sizes)]
        parts = gathered.split(sizes, dim=1)
        return {name: part[:, 0] if size == 1 else part for name, part, size in zip(names, parts, sizes)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        collected = self._diffusion_metrics[mode]
        if collected:
            prefix = "eval_" if mode == "eval" else ""
            logs.update(reduce_metrics(collected, prefix))
            if mode == "eval" and collected.get("nll_sum"):
                nll_sum = torch.cat(collected["nll_sum"]).sum().item()
                num_targets = torch.cat(collected["num_targets"]).sum().item()
                nll_bound = nll_sum / max(num_targets, 1.0)
                logs["eval_nll_bound"] = nll_bound
                logs["eval_ppl_bound"] = math.exp(min(nll_bound, 700.0))
            collected.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def _load_adapter(self, checkpoint: str | None) -> bool:
        """Load a saved adapter into the PEFT model inside `self.model`; False when there is nothing to load.

        Called by resume and best-model loading (`_compat.CheckpointLoading`): the stock Trainer looks for a top-level
        PeftModel or full weights; a PEFT DiffusionLM checkpoint holds a standard adapter (LoRA weights + mask-token
        row) beside `diffusion_config.json`.
        """
        if checkpoint is None or not self.model.is_peft:
            return False
        if not any(os.path.isfile(os.path.join(checkpoint, name)) for name in ADAPTER_FILES):
            return False
        peft_model = self.model.model
        weights = load_peft_weights(checkpoint, device="cpu")
        # Exactly the adapter's weights: a missing one would silently keep its fresh value; embedding layers PEFT
        # may have saved beside them are the base's frozen rows (and, tied, a copy of the mask row it cannot load).
        adapter = check_adapter_weights(peft_model, weights, checkpoint)
        result = set_peft_model_state_dict(
            peft_model, {name: weights[name] for name in adapter}, adapter_name=peft_model.active_adapter
        )
        assert not result.unexpected_keys, result.unexpected_keys
        logger.info("Loaded the adapter from %s.", checkpoint)
        return True


def _check_checkpoint(path: str) -> None:
    """`resume_from_checkpoint` must be a Trainer checkpoint whose `trainer_state.json` reads (the Trainer would fail
    with a bare `FileNotFoundError` or `JSONDecodeError`)."""
    state_file = os.path.join(path, TRAINER_STATE_FILE)
    if os.path.isdir(path) and not os.path.isfile(state_file):
        raise ValueError(
            f"`resume_from_checkpoint`={path!r} holds no {TRAINER_STATE_FILE}: it is not a Trainer checkpoint (a "
            "saved model?). Pass a `<output_dir>/checkpoint-<step>` folder, or True for the last one in `output_dir`; "
            "to go on from saved weights without their optimizer state, load them with "
            "`DiffusionLM.from_pretrained(path, is_trainable=True)` and train from step 0."
        )
    if os.path.isfile(state_file):
        try:
            with open(state_file, encoding="utf-8") as handle:
                json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{state_file} is not a valid {TRAINER_STATE_FILE} ({error}): the checkpoint is damaged; resume from "
                "another checkpoint."
            ) from error
