"""`DiffusionTrainingConfig`: what only the optimisation loop reads.

Everything TRL's `SFTConfig` holds (batch sizes, `max_length`, packing, completion-only loss, logging, saving, hub)
is inherited unchanged. The fields added here are the knobs of the masked-diffusion objective that matter only while
training: they are not saved with the model (`DiffusionConfig` holds what the model *is*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from .budget import TIME_SCHEDULES
from .loss import NORMALIZATIONS, TEACHER_POSITIONS

# What happens to the padding after an answer (`trainer.eos_targets`).
EOS_POLICIES = ("none", "all")


@dataclass
class DiffusionTrainingConfig(SFTConfig):
    r"""Training arguments of `DiffusionTrainer`: TRL's `SFTConfig` plus the diffusion objective's training knobs.

    Args:
        anneal_steps (`int`, defaults to 0):
            Length, in optimizer steps, of DiffuLLaMA's attention-mask annealing (arXiv 2410.17891, Sec. 3.2): the
            fraction of the upper triangle opened grows linearly from 0 to 1 over `anneal_steps`, then attention stays
            bidirectional. Read only under `DiffusionConfig(attention="annealed")`; 0 is bidirectional from step 0.
        time_eps (`float`, defaults to 1e-3):
            The diffusion time is drawn from U(time_eps, 1): keeps the 1/t ELBO weight finite.
        antithetic_time (`bool`, defaults to `False`):
            Stratified (low-discrepancy) draws of t over the batch: lower gradient variance, same expectation.
        complementary_masking (`bool`, defaults to `False`):
            Also train on the complementary corruption of every row, so each target is masked exactly once per pair
            (Fast-dLLM v2). Doubles the tokens per forward.
        loss_normalization (`str`, defaults to `"targets"`):
            `"targets"`: divide the weighted masked CE by the number of target tokens (the unbiased per-token NELBO,
            MDLM/LLaDA). `"masked"`: divide by the number of masked tokens (lower variance, not an ELBO). Evaluation
            always uses `"targets"`, so `eval_loss` is the NLL bound per token.
        eos_policy (`str`, defaults to `"none"`):
            `"none"`: padding is never a target. `"all"` (LLaDA SFT): the padding after each answer becomes EOS
            targets, so the model learns to fill the tail of a fixed-length canvas with EOS. Needs padded batches
            (not packing / padding-free). See `peft_diffusion.trainer.eos_targets`.
        teacher_weight (`float`, defaults to 0.0):
            Weight of the AR-teacher term (LoRA only): the base model itself (the same weights with the adapter
            disabled, causal attention, one extra no-grad forward on the clean text) gives its next-token
            distribution at each masked target, and the loss adds `teacher_weight * KL(teacher || student)` per
            target, normalised as the ELBO. The teacher conditions on the whole clean left context, including the
            tokens the student sees masked; the student also sees the unmasked tokens to the right inside its block.
            0: off.
        teacher_positions (`str`, defaults to `"masked"`):
            Where the teacher is compared: `"masked"`, every masked target; `"first_masked"`, the first masked target
            of each attention block (where the student's left context inside the block is as complete as the
            teacher's: the token a left-to-right draft commits first).
        certainty_weight (`float`, defaults to 0.0):
            Weight of the certainty-forcing term (dParallel, arXiv 2509.26488): the entropy of the student's
            prediction at each masked target it already predicts right (argmax = target), normalised as the ELBO.
            It sharpens right predictions so that threshold decoding commits more tokens per forward; it is meant for
            data the model should reproduce exactly, such as the base's greedy answers (`self_distilled_dataset`).
            0: off.
        certainty_temperature (`float`, defaults to 1.0):
            The softmax temperature at which that entropy is taken.
        max_train_minutes (`float`, *optional*):
            A wall-clock budget for `train()`, in minutes: training stops after the optimizer step that spends it,
            and the learning-rate schedule (`linear`, `cosine`, `constant`, `constant_with_warmup`) runs on time, so
            it decays to its end when the budget does (see `peft_diffusion/budget.py`). `max_steps` /
            `num_train_epochs` still stop training earlier when they come first: set them high. None: no budget.
        gradient_checkpointing (`bool`, *optional*):
            Alias of `activation_checkpointing`. TRL turns it on by default; here it defaults to on only when a CUDA
            device is present (on CPU it only costs time).
        bf16 (`bool`, *optional*):
            TRL turns it on by default; here it defaults to on only when the CUDA device supports bfloat16 (and `fp16`
            is off), so the defaults also run on CPU.

    Example:
    ```python
    >>> from peft_diffusion import DiffusionTrainingConfig
    >>> args = DiffusionTrainingConfig(output_dir="out", anneal_steps=1000, report_to="none")
    >>> args.anneal_steps, args.loss_normalization
    (1000, 'targets')
    ```
    """

    anneal_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps over which the annealed attention opens from causal to bidirectional "
            "(DiffuLLaMA); used only with attention='annealed'; 0 means bidirectional from the start."
        },
    )
    time_eps: float = field(
        default=1e-3,
        metadata={"help": "The diffusion time t is drawn from U(time_eps, 1); keeps the 1/t weight finite."},
    )
    antithetic_time: bool = field(
        default=False,
        metadata={"help": "Stratified draws of t over the batch (lower gradient variance)."},
    )
    complementary_masking: bool = field(
        default=False,
        metadata={"help": "Also train on the complementary mask of every row (Fast-dLLM v2); doubles the tokens."},
    )
    loss_normalization: str = field(
        default="targets",
        metadata={
            "help": "Divide the weighted masked CE by the number of target tokens ('targets', the per-token ELBO) "
            "or of masked tokens ('masked')."
        },
    )
    eos_policy: str = field(
        default="none",
        metadata={
            "help": "'none': padding is never a target; 'all': padding after an answer becomes EOS targets (LLaDA "
            "SFT, needs padded batches)."
        },
    )
    teacher_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the AR-teacher KL term at masked targets (LoRA only: the base is the model with its "
            "adapter disabled); 0 turns it off."
        },
    )
    teacher_positions: str = field(
        default="masked",
        metadata={"help": "Where the AR teacher is compared: 'masked' (every masked target) or 'first_masked'."},
    )
    certainty_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the certainty-forcing term (dParallel): the entropy of the masked targets the model "
            "already predicts right, so threshold decoding commits more tokens per forward; 0 turns it off."
        },
    )
    certainty_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the certainty-forcing entropy (> 0)."}
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget of train() in minutes: training stops after the step that spends it and the "
            "learning-rate schedule decays over it instead of over max_steps. None: no budget."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Trade compute for memory; defaults to on with a CUDA device, off on CPU."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bfloat16 mixed precision; defaults to on when the CUDA device supports it and fp16 is off."
        },
    )

    def __post_init__(self):
        on_gpu = torch.cuda.is_available() and not self.use_cpu
        if self.activation_checkpointing is None:
            # `gradient_checkpointing` is transformers' deprecated alias: resolve it here, without its warning.
            self.activation_checkpointing = (
                on_gpu if self.gradient_checkpointing is None else self.gradient_checkpointing
            )
            self.gradient_checkpointing = None
        if self.bf16 is None:
            self.bf16 = on_gpu and not self.fp16 and torch.cuda.is_bf16_supported()
        super().__post_init__()
        self.validate_diffusion()

    def validate_diffusion(self) -> None:
        """Check the diffusion knobs and raise `ValueError` naming the field, the value and the fix."""
        if not isinstance(self.anneal_steps, int) or isinstance(self.anneal_steps, bool) or self.anneal_steps < 0:
            raise ValueError(
                f"`anneal_steps` must be an integer >= 0 (optimizer steps), got anneal_steps={self.anneal_steps!r}; "
                "use 0 for bidirectional attention from the start."
            )
        if not 0.0 < self.time_eps < 1.0:
            raise ValueError(
                f"`time_eps` must be in (0, 1), got time_eps={self.time_eps!r}; t is drawn from U(time_eps, 1), "
                "a typical value is 1e-3."
            )
        _check_number("teacher_weight", self.teacher_weight, positive=False)
        _check_number("certainty_weight", self.certainty_weight, positive=False)
        _check_number("certainty_temperature", self.certainty_temperature, positive=True)
        if self.teacher_positions not in TEACHER_POSITIONS:
            raise ValueError(
                f"`teacher_positions` must be one of {list(TEACHER_POSITIONS)}, got "
                f"teacher_positions={self.teacher_positions!r}."
            )
        if self.max_train_minutes is not None:
            minutes = self.max_train_minutes
            if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 < minutes < math.inf:
                raise ValueError(
                    f"`max_train_minutes` must be a positive number of minutes or None, got "
                    f"max_train_minutes={minutes!r}."
                )
            kind = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
            if kind not in TIME_SCHEDULES:
                raise ValueError(
                    f"`max_train_minutes` runs the learning-rate schedule on time, which supports lr_scheduler_type "
                    f"in {sorted(TIME_SCHEDULES)}, got lr_scheduler_type={kind!r}; pick one of those, or drop "
                    "max_train_minutes and set max_steps."
                )
        if self.loss_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`loss_normalization` must be one of {list(NORMALIZATIONS)}, got "
                f"loss_normalization={self.loss_normalization!r}."
            )
        if self.eos_policy not in EOS_POLICIES:
            raise ValueError(f"`eos_policy` must be one of {list(EOS_POLICIES)}, got eos_policy={self.eos_policy!r}.")
        if self.eos_policy == "all" and (self.packing or self.padding_free):
            raise ValueError(
                "`eos_policy='all'` turns the padding after each answer into EOS targets, but packing / padding-free "
                f"batches have no padding (packing={self.packing}, padding_free={self.padding_free}); use "
                "eos_policy='none' with packing, or packing=False."
            )


def _check_number(name: str, value, *, positive: bool) -> None:
    """Raise `ValueError` naming `name` unless `value` is a finite real number > 0 (`positive`) or >= 0 (0: off)."""
    low_ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 if positive else value >= 0)
    )
    if not (low_ok and value < math.inf):
        bound = "> 0" if positive else ">= 0 (0: off)"
        raise ValueError(f"`{name}` must be a number {bound}, got {name}={value!r}.")
