"""Training to a wall-clock budget (`DiffusionTrainingConfig.max_train_minutes`).

Where time, not data, is the limit (a CPU conversion in minutes), a step-based schedule is the wrong clock: with
`max_steps` set high the learning rate never decays before the budget stops training, and with `max_steps` set low
the budget is wasted. Under a budget the trainer therefore

1. stops after the first optimizer step that ends past `max_train_minutes` (counted from the start of `train()`;
   `max_steps` / `num_train_epochs` still stop it earlier when they come first);
2. runs the learning-rate schedule on time: after the warmup (in steps, as `warmup_steps` says), the schedule's
   progress is the fraction of the budget spent, so `cosine` and `linear` reach their end exactly when the budget
   does. A resumed run starts a new budget (the clock is not part of the checkpoint).
"""

from __future__ import annotations

import logging
import math
import time

import torch
from transformers import TrainerCallback

__all__ = ["TIME_SCHEDULES", "TimeBudget", "TimeBudgetSchedule"]

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

    def fraction(self) -> float:
        if self.started is None:
            return 0.0
        return min(1.0, (time.monotonic() - self.started) / (60.0 * self.minutes))

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.stopped_at = time.monotonic(), None

    def on_step_end(self, args, state, control, **kwargs):
        if self.fraction() >= 1.0 and not control.should_training_stop:
            logger.warning(
                "Stopping: the %g-minute training budget (max_train_minutes) is spent after step %d.",
                self.minutes,
                state.global_step,
            )
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


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
