"""The learning-rate range test (Smith, 2015 / 2017), as fastai's and Lightning's ``lr_find``.

Train a fresh model for ``steps`` optimizer steps (the training step of a Ray Train worker,
:func:`step.train_step`, with the run's precision, label smoothing and clipping) while the
learning rate grows exponentially from ``min_lr`` to ``max_lr``; record the loss of every step,
smoothed with an exponential moving average (fastai's 0.98, bias-corrected); stop once the
smoothed loss exceeds ``diverge`` times its minimum (the lr is too high from there on).

The suggestion is the PEAK lr for the same optimizer, batch size and data: the run then warms up
to it and decays from it. Three rules (``SUGGESTIONS``), all on the smoothed loss:

- ``steepest`` (the default, Lightning's): where the loss falls fastest against log lr;
- ``valley`` (fastai's default): two thirds of the way down the longest stretch of falling loss;
- ``minimum`` (Smith's rule of thumb): the lr of the lowest loss, divided by 10.

On convex problems with a measured good range (tests/test_recipe.py) steepest and valley both land
in it. On the sample data with DeepCNN (docs/recipe.md, ``benchmarks/recipe.py --lr-find``) all
three suggest less than the best peak lr of a warmup + cosine run, steepest the least so: the
range test holds each lr for one step, and a schedule that warms up and anneals tolerates a
higher peak. The defaults table (config.MODEL_LR) comes from full runs and is the better start;
``--lr auto`` is for models and data it was not measured on.

No Ray here: ``rayjobs/lr_find.py`` runs it in its own process, ``train.py --lr auto`` on one Ray
worker with a training worker's resources.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from placesnet.config import TrainConfig, UserError
from placesnet.train import optim
from placesnet.train.step import StepSettings, train_step

CSV_FILE, PNG_FILE = "lr_find.csv", "lr_find.png"


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]  # raw per-step training losses
    smoothed: list[float]  # bias-corrected exponential moving average of ``losses``
    suggestion: float
    stopped_early: bool  # the loss diverged before max_lr (the usual, healthy case)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "lrs": self.lrs,
            "losses": self.losses,
            "smoothed": self.smoothed,
            "suggestion": self.suggestion,
            "stopped_early": self.stopped_early,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LRFinderResult":
        return cls(**d)


def lr_schedule(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """``steps`` learning rates spaced evenly on a log scale from ``min_lr`` to ``max_lr``."""
    if steps < 2:
        return [min_lr]
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's suggestion: the longest decreasing subsequence of ``losses``, 2/3 of the way along.

    Quadratic in the number of points (at most a few hundred here)."""
    n = len(losses)
    if n < 3:
        raise UserError(f"the LR range test needs at least 3 steps, it ran {n}")
    longest = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[i] > longest[end]:
            end, start = i, i - longest[i]
    sections = (end - start) / 3
    index = min(max(start + int(sections) + int(sections / 2), 0), n - 1)
    return lrs[index]


def minimum(lrs: list[float], losses: list[float], divisor: float = 10.0) -> float:
    """The lr of the lowest loss, divided by ``divisor``."""
    return lrs[min(range(len(losses)), key=losses.__getitem__)] / divisor


def steepest(lrs: list[float], losses: list[float], skip: int = 10) -> float:
    """Lightning's suggestion: the lr where the loss falls fastest against log lr, ignoring the
    first ``skip`` points (fewer for short runs) and the last one."""
    skip = min(skip, max(len(losses) // 10, 1))
    slopes = [
        (losses[i + 1] - losses[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1])
        for i in range(skip, len(losses) - 1)
    ]
    if not slopes:
        raise UserError(f"the LR range test needs at least 3 steps, it ran {len(losses)}")
    return lrs[skip + min(range(len(slopes)), key=slopes.__getitem__)]


SUGGESTIONS = {"steepest": steepest, "valley": valley, "minimum": minimum}


def lr_range_test(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    min_lr: float = 1e-5,
    max_lr: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.98,
    diverge: float = 4.0,
    settings: StepSettings = StepSettings(),
    suggest: str = "steepest",
) -> LRFinderResult:
    """Run the range test on ``model`` (its weights change: pass a fresh one and discard it).

    Each step is the training step with ``settings`` (:meth:`StepSettings.from_config`: the step
    the run will train with), a GradScaler of its own where they need one. ``loader`` is cycled if
    it has fewer than ``steps`` batches. Returns every lr and loss seen and the ``suggest`` rule's
    suggestion (see SUGGESTIONS) from the smoothed loss.
    """
    if not 0 < min_lr < max_lr:
        raise UserError(f"need 0 < --min-lr < --max-lr, got [{min_lr}, {max_lr}]")
    if suggest not in SUGGESTIONS:
        raise UserError(f"unknown suggestion rule {suggest!r}; choose one of {', '.join(SUGGESTIONS)}")
    schedule = lr_schedule(min_lr, max_lr, steps)
    lrs, losses, smoothed = [], [], []
    average, best, stopped = 0.0, math.inf, False
    model.train()
    scaler = settings.make_scaler(device)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for i, (lr, (images, targets)) in enumerate(zip(schedule, batches)):
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = train_step(model, optimizer, images, targets, device, settings, scaler=scaler)
        value = out.loss.item()
        if not math.isfinite(value):
            stopped = True
            break
        average = smoothing * average + (1 - smoothing) * value
        smooth = average / (1 - smoothing ** (i + 1))  # bias-corrected
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        best = min(best, smooth)
        if i > 0 and smooth > diverge * best:
            stopped = True
            break
    if len(lrs) < 3:
        raise UserError(
            f"the LR range test diverged after {len(lrs)} step(s): lower --min-lr (now {min_lr:g})"
        )
    return LRFinderResult(
        lrs,
        losses,
        smoothed,
        SUGGESTIONS[suggest](lrs, smoothed),
        stopped,
        {
            "min_lr": min_lr,
            "max_lr": max_lr,
            "steps": steps,
            "smoothing": smoothing,
            "diverge": diverge,
            "suggest": suggest,
        },
    )


def find_lr(
    config: TrainConfig,
    root: Path,
    device: torch.device,
    *,
    loader_workers: int = 0,
    min_lr: float = 1e-5,
    max_lr: float = 10.0,
    steps: int = 100,
    suggest: str = "steepest",
) -> LRFinderResult:
    """The range test for ``config``'s model, data, batch size and optimizer settings: what
    ``rayjobs/train.py`` would train, on one worker with the GLOBAL batch."""
    from torch.utils.data import DataLoader

    from placesnet.data.loaders import LoaderPlan
    from placesnet.data.places import class_names, open_split
    from placesnet.model import build_model

    torch.manual_seed(config.seed)
    train = open_split(config, "train", root)
    plan = LoaderPlan(loader_workers, 1, device.type == "cuda")
    loader = DataLoader(
        train,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(train) >= config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
        **plan.kwargs(),
    )
    settings = StepSettings.from_config(config, device)
    model = settings.prepare_model(build_model(config, len(class_names(train))).to(device))
    optimizer = optim.build_optimizer(model, min_lr, config.momentum, config.weight_decay, device)
    result = lr_range_test(
        model,
        loader,
        optimizer,
        device,
        min_lr=min_lr,
        max_lr=max_lr,
        steps=steps,
        settings=settings,
        suggest=suggest,
    )
    result.settings.update(
        model=config.model,
        batch_size=config.batch_size,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        clip_grad_norm=config.clip_grad_norm,
        amp=str(settings.amp_dtype or torch.float32).removeprefix("torch."),
    )
    return result


def write_outputs(result: LRFinderResult, write: "callable") -> list[str]:
    """Write lr_find.csv and lr_find.png through ``write(name, bytes)``; returns the names."""
    import io

    import pandas as pd

    from placesnet.plots import lr_find_png

    buf = io.StringIO()
    pd.DataFrame({"lr": result.lrs, "loss": result.losses, "smoothed_loss": result.smoothed}).to_csv(
        buf, index=False
    )
    write(CSV_FILE, buf.getvalue().encode())
    write(PNG_FILE, lr_find_png(result.lrs, result.losses, result.smoothed, result.suggestion))
    return [CSV_FILE, PNG_FILE]
