"""SGD with the weight-decay exemptions, and the per-step warmup + decay schedules."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from placesnet.config import TrainConfig

# Warmup when --warmup-steps/--warmup-epochs are not given: 5 % of all steps, at least
# WARMUP_FLOOR steps (but never more than a fifth of the run) and at most WARMUP_CAP steps.
# A 6-step tiny epoch trained 8 epochs warms up over 9 steps; a 7,000-step Places365 epoch
# trained 30 epochs over 5,000 (0.7 epoch).
WARMUP_FRACTION, WARMUP_FLOOR, WARMUP_CAP = 0.05, 50, 5000


def build_optimizer(
    model: nn.Module, lr: float, momentum: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """SGD with momentum; no weight decay on biases and BatchNorm (1-D parameters).

    The fused CUDA kernel is used on GPU (one launch for all parameters instead of one each).
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(
        groups, lr=lr, momentum=momentum, nesterov=momentum > 0, fused=device.type == "cuda" or None
    )


def warmup_steps_for(
    total_steps: int, warmup_steps: int | None = None, warmup_epochs: int = 0, steps_per_epoch: int = 0
) -> int:
    """Linear-warmup length in optimizer steps: ``warmup_steps`` when given (>= 0),
    ``warmup_epochs`` x ``steps_per_epoch`` when ``warmup_epochs`` > 0, else the automatic
    5 % of ``total_steps`` with a floor and a cap (see WARMUP_FRACTION)."""
    if warmup_steps is not None and warmup_steps >= 0:
        return min(warmup_steps, max(total_steps - 1, 0))
    if warmup_epochs > 0:
        return min(warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))
    auto = max(round(WARMUP_FRACTION * total_steps), min(WARMUP_FLOOR, total_steps // 5))
    return min(auto, WARMUP_CAP)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from 1/(warmup+1) to 1 over the first ``warmup_steps`` steps, then "cosine"
    (half a cosine down to 0 at the last step), "step" (/10 at 50 % and 75 % of all steps) or
    "none" (flat).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":
        return 0.1 ** sum(step >= m * total_steps for m in (0.5, 0.75))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-STEP schedule (call ``scheduler.step()`` after every ``optimizer.step()``; the
    epoch loop does): see :func:`lr_factor`. Its state_dict holds the step count, so a resumed
    run continues the schedule exactly where it stopped."""
    # A partial, not an object with attributes: LambdaLR saves such an object's __dict__ and
    # load_state_dict would bring back the OLD total_steps when a run is extended to more epochs.
    factor = functools.partial(
        lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scheduler_for(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of ``config`` (schedule, warmup) for ``steps_per_epoch`` steps."""
    total = config.epochs * steps_per_epoch
    warmup = warmup_steps_for(
        total, None if config.warmup_steps < 0 else config.warmup_steps, config.warmup_epochs, steps_per_epoch
    )
    return build_scheduler(optimizer, config.schedule, total, warmup)
