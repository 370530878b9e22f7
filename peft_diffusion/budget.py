"""Training to a wall-clock budget (`DiffusionTrainingConfig.max_train_minutes`).

Where time, not data, is the limit (a CPU conversion in minutes), a step-based schedule is the wrong clock: with
`max_steps` set high the learning rate never decays before the budget stops training, and with `max_steps` set low
the budget is wasted. Under a budget the trainer therefore

1. stops after the first optimizer step that ends past `max_train_minutes` (counted from the start of `train()`;
   `max_steps` / `num_train_epochs` still stop it earlier when they come first);
2. runs the learning-rate schedule on time: after the warmup (in steps, as `warmup_steps` says), the schedule's
   progress is the fraction of the budget spent, so `cosine` and `linear` reach their end exactly when the budget
   does. A resumed run starts a new budget (the clock is not part of the checkpoint);
3. shows the budget, not the step cap, in the progress bar (`BudgetProgressCallback`): `max_steps` is only a cap
   under a budget, so HF's bar over it ("12/10000 [03:10<43:51:20]") would promise hours. The bar instead fills with
   the share of the budget spent (or of `max_steps` done, if larger), its remaining time is the budget's, and the
   step count and seconds per step are its postfix.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

__all__ = ["TIME_SCHEDULES", "BudgetProgressCallback", "TimeBudget", "TimeBudgetSchedule"]

logger = logging.getLogger(__name__)

# The schedule shapes that can run on time: the multiplier of the learning rate at budget fraction p in [0, 1].
TIME_SCHEDULES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "constant": lambda p: 1.0,
    "constant_with_warmup": lambda p: 1.0,
}


class TimeBudget(TrainerCallback):
    """Stops training once `minutes` of wall-clock time have passed since `train()` began; `fraction()` is the
    share of the budget spent (the clock of `TimeBudgetSchedule`)."""

    def __init__(self, minutes: float):
        self.minutes = float(minutes)
        self.started: float | None = None
        self.stopped_at: int | None = None  # the step after which the budget stopped training

    def seconds(self) -> float:
        """Seconds since `train()` began (0 before)."""
        return 0.0 if self.started is None else time.monotonic() - self.started

    def fraction(self) -> float:
        return min(1.0, self.seconds() / (60.0 * self.minutes))

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.stopped_at = time.monotonic(), None

    def on_step_end(self, args, state, control, **kwargs):
        if self.fraction() >= 1.0 and not control.should_training_stop:
            logger.warning(
                "Stopping: the %.3g-minute training budget (max_train_minutes) is spent after step %d.",
                self.minutes,
                state.global_step,
            )
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class BudgetProgressCallback(ProgressCallback):
    """HF's `ProgressCallback` with the training bar measured on the budget instead of `max_steps`: it fills as
    `budget` is spent (or as `max_steps` is reached, when that comes first), so its remaining time is the budget's;
    its postfix is the optimizer step and the seconds per step. Evaluation bars and logged lines are HF's."""

    def __init__(self, budget: TimeBudget, max_str_len: int = 100):
        super().__init__(max_str_len=max_str_len)
        self.budget = budget

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(
                total=1000,  # thousandths of the run: the budget spent, or the steps of max_steps if further
                desc=f"training ({self.budget.minutes:.1f}-minute budget)",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
                dynamic_ncols=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            bar, seconds_per_step = self.training_bar, self.budget.seconds() / max(state.global_step, 1)
            bar.set_postfix_str(f"step {state.global_step}, {seconds_per_step:.1f} s/step", refresh=False)
            # whichever stop comes first: the budget, or max_steps on a machine fast enough to reach it
            done = max(self.budget.fraction(), state.global_step / state.max_steps if state.max_steps > 0 else 0.0)
            bar.update(round(min(done, 1.0) * bar.total) - bar.n)


class TimeBudgetSchedule(torch.optim.lr_scheduler.LRScheduler):
    """A learning-rate schedule whose progress is the budget's clock: a linear warmup over `warmup_steps` optimizer
    steps, then `TIME_SCHEDULES[kind]` of the fraction of `budget` spent."""

    def __init__(self, optimizer, budget: TimeBudget, kind: str, warmup_steps: int = 0):
        self.budget, self.shape, self.warmup_steps = budget, TIME_SCHEDULES[kind], int(warmup_steps)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step = self.last_epoch  # optimizer steps taken (the LRScheduler counter)
        if step < self.warmup_steps:
            factor = step / max(1, self.warmup_steps)
        else:
            factor = max(0.0, self.shape(self.budget.fraction()))
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict:
        # the clock and the shape are rebuilt from the arguments, never restored from a checkpoint
        return {key: value for key, value in super().state_dict().items() if key not in ("budget", "shape")}
