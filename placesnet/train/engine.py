"""Ray-free epoch functions: the same code runs under Ray Train, plain torch, or torchrun.

When ``torch.distributed`` is initialised the per-rank sums (loss, correct, count) are
all-reduced, so every rank returns the global numbers. Evaluation is exact whatever the worker
count when the val loader shards without padding (``data.ShardSampler``).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from placesnet.config import TrainConfig, UserError
from placesnet.model import freeze_backbone, split_parameters
from placesnet.train.optim import build_optimizer, scheduler_for
from placesnet.train.step import IGNORED, StepSettings, autocast, to_device, train_step

# A first-epoch step loss above this multiple of the first step's is warned about (see
# train_one_epoch): healthy runs stay well below it, a learning rate that is too high passes it
# steps before the loss becomes NaN.
RISE_WARNING = 3.0


# Steps between the host's reads of the training loss (see train_one_epoch), when no log_every.
CHECK_EVERY = 20

# The step of train_one_epoch when none is given: fp32, no label smoothing, no clipping.
PLAIN = StepSettings()


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: the run cannot recover at this learning rate."""


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (float64 so large counts stay exact); no-op when single."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class _StepStats:
    """Per-step sums kept on the training device: adding a step queues a few tiny kernels and
    never waits for the GPU. ``read`` (at the epoch's check points) copies them to the host in
    one transfer and, when ``torch.distributed`` is initialised, decides divergence collectively.

    Before, every step read its loss (``.item()``) and all-reduced it for the divergence verdict:
    two host syncs per step that leave the GPU idle while the CPU waits and then queues the next
    step. Now the host waits only at check points (every ``check_every`` steps and the last).
    """

    def __init__(self, device: torch.device):
        z = functools.partial(torch.zeros, (), device=device)
        self.loss_sum = z(dtype=torch.float64)
        self.correct = z(dtype=torch.int64)
        self.first = z(dtype=torch.float32)  # the epoch's first step loss
        self.peak = z(dtype=torch.float32)  # the largest finite step loss so far
        self.bad_step = z(dtype=torch.int64)  # the first step whose loss was NaN/inf (0: none)
        self.bad_loss = z(dtype=torch.float32)  # that step's loss

    def add(self, step: int, loss: torch.Tensor, n: int, correct: torch.Tensor) -> None:
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        first_bad = (~finite) & (self.bad_step == 0)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.bad_loss = torch.where(first_bad, loss, self.bad_loss)
        self.loss_sum += loss.double() * n
        self.correct += correct
        if step == 1:
            self.first = loss.clone()
            self.peak = loss.clone()
        else:
            self.peak = torch.where(finite, torch.maximum(self.peak, loss), self.peak)

    def read(self, steps: int) -> dict:
        """Host values; ``bad_step``/``bad_loss`` are global: the earliest step at which any rank's
        loss was NaN/inf (every rank gets the same answer, so every rank stops at once)."""
        bad_step, bad_loss = self.bad_step, self.bad_loss
        if dist.is_available() and dist.is_initialized():
            first_bad = torch.where(bad_step > 0, bad_step, steps + 1)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            if first_bad.item() <= steps:  # sum the ranks' losses at that step: NaN/inf if any is
                bad_loss = torch.where(bad_step == first_bad, bad_loss, 0.0)
                dist.all_reduce(bad_loss)
            bad_step = torch.where(first_bad <= steps, first_bad, 0)
        values = torch.stack(
            [
                self.loss_sum,
                self.correct.double(),
                self.first.double(),
                self.peak.double(),
                bad_step.double(),
                bad_loss.double(),
            ]
        ).tolist()
        return dict(zip(("loss_sum", "correct", "first", "peak", "bad_step", "bad_loss"), values))


def _check_finite(stats: dict, *, epoch: int, steps: int, lrs: dict[int, float]) -> None:
    """TrainingDiverged (on every rank at once: ``stats`` is global) if a loss became NaN/inf."""
    if stats["bad_step"]:
        step = int(stats["bad_step"])
        raise TrainingDiverged(
            f"training diverged: the loss is {stats['bad_loss']} at epoch {epoch}, step {step}/{steps} "
            f"(lr {lrs.get(step, math.nan):g}); lower --lr (or find one with --lr auto), or add "
            "--clip-grad-norm 1"
        )


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    settings: StepSettings = PLAIN,
    scaler: torch.amp.GradScaler | None = None,
    log_every: int = 0,
    log: Callable[[str], None] | None = None,
    epoch: int = 0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    rise_warning: float = 0.0,
    bad_images=None,
    check_every: int = 0,
) -> dict:
    """One pass over ``loader``; returns global ``train_loss``, ``train_top1``, ``train_images``,
    ``train_time_s``, ``images_per_s``, the ``lr`` of the last step, and this rank's
    ``first_step_loss`` and ``peak_step_loss``.

    Every batch is one :func:`step.train_step` with ``settings`` (precision, channels_last, label
    smoothing, clipping; :meth:`StepSettings.from_config` derives them from a config) and
    ``scaler``, the run's GradScaler where the settings need one (``settings.make_scaler``; None:
    no loss scaling). ``scheduler`` steps after every optimizer step (a per-step schedule, see
    :func:`optim.build_scheduler`).

    Raises :class:`TrainingDiverged` (on all ranks at once, naming the first step whose loss was
    NaN or infinite) instead of training on with NaN weights. With ``rise_warning`` > 0, ``log``
    gets one warning line when a step's loss exceeds ``rise_warning`` times the epoch's first:
    the sign of a learning rate too high, seen before the loss becomes NaN.

    Losses and counts are summed on the device; the host reads them (and checks divergence and
    the rise) only at check points: every ``check_every`` steps (default CHECK_EVERY), at the
    progress lines and at the last step, so steps in between never wait for the GPU. A
    divergence is therefore stopped at the next check point, at most ``check_every`` - 1 steps
    late (the NaN weights of those steps are never checkpointed).

    ``log`` (rank 0 only, typically) gets a progress line every ``log_every`` steps.

    ``bad_images`` (a :class:`data.BadImages`, for a loader over :class:`data.MarkBadImages`)
    decides about samples that could not be decoded: raise at once, or leave them out of the loss
    and the counts; ``skipped_images`` is how many were left out on all ranks.
    """
    model.train()
    skipped = 0
    steps = len(loader)
    check_every = check_every or CHECK_EVERY
    sums = _StepStats(device)
    stats = {"loss_sum": 0.0, "correct": 0.0, "first": math.nan, "peak": math.nan}
    seen = 0.0
    lrs: dict[int, float] = {}  # the lr of each step since the last check point (host floats)
    warned = False
    lr = optimizer.param_groups[0]["lr"]
    start = window_start = time.perf_counter()
    window_seen = 0
    # a rank's uneven share of a global batch is weighted so DDP's mean is the batch's gradient
    weigh = getattr(getattr(loader, "batch_sampler", None), "loss_weight", None)
    for step, (images, targets) in enumerate(loader, start=1):
        bad = bad_images.check(targets) if bad_images is not None else 0  # on the CPU: no sync
        n = targets.numel() - bad
        skipped += bad
        if bad:  # ignored by the loss, never a correct prediction
            targets = targets.clamp(min=IGNORED)
        lr = lrs[step] = optimizer.param_groups[0]["lr"]
        out = train_step(
            model,
            optimizer,
            images,
            targets,
            device,
            settings,
            scaler=scaler,
            scheduler=scheduler,
            counted=n,
            loss_weight=weigh(step - 1, targets.numel()) if weigh else 1.0,
        )
        sums.add(step, out.loss, n, (out.logits.argmax(1) == out.targets).sum())  # no host sync
        seen += n
        window_seen += n
        # the same steps on every rank (log_every is), whether or not this rank prints: the
        # divergence verdict is a collective
        at_log_point = bool(log_every and step % log_every == 0)
        if step % check_every and step != steps and not at_log_point:
            continue
        # A check point: the one host sync of these steps (same steps on every rank).
        stats = sums.read(steps)
        _check_finite(stats, epoch=epoch, steps=steps, lrs=lrs)
        lrs.clear()
        if log and rise_warning and not warned and stats["peak"] > rise_warning * stats["first"]:
            warned = True
            log(
                f"warning: the training loss rose from {stats['first']:.4g} to {stats['peak']:.4g} by "
                f"epoch {epoch}, step {step}/{steps} (lr {lr:g}): the learning rate is probably too "
                "high; try --lr auto, a lower --lr, or --clip-grad-norm 1"
            )
        if log and log_every and (at_log_point or step == steps):
            now = time.perf_counter()
            log(
                f"epoch {epoch} step {step}/{steps} loss {stats['loss_sum'] / max(seen, 1):.4f} "
                f"top1 {stats['correct'] / max(seen, 1):.4f} {window_seen / (now - window_start):.0f} "
                "img/s per worker"
            )
            window_start, window_seen = now, 0
    loss_sum, correct = stats["loss_sum"], stats["correct"]
    first_loss, peak_loss = stats["first"], stats["peak"]
    elapsed = time.perf_counter() - start
    loss_sum, correct, seen, elapsed_sum, skipped = _all_reduce(
        [loss_sum, correct, seen, elapsed, skipped], device
    )
    # Ranks run in lockstep under DDP, so the mean of their times is the epoch's wall time.
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    wall = elapsed_sum / world
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_top1": correct / max(seen, 1),
        "train_images": int(seen),
        "train_time_s": wall,
        "images_per_s": seen / wall if wall > 0 else 0.0,
        "lr": lr,  # the last step's
        "skipped_images": int(skipped),
        "first_step_loss": first_loss,
        "peak_step_loss": peak_loss,
    }


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, when ``torch.distributed``
    is initialised. DDP broadcasts them at the start of each training forward, so after an
    epoch's last step every rank holds the statistics of its own last batch; rank 0's are the ones
    its checkpoint keeps. Called before validation, every rank evaluates the checkpoint's model,
    and the val numbers are those evaluate.py reports for it."""
    if dist.is_available() and dist.is_initialized():
        for buffer in getattr(model, "module", model).buffers():
            dist.broadcast(buffer, src=0)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    confusion: bool = False,
    bad_images=None,
    mistakes: int = 0,
) -> dict:
    """Loss, top-1 and top-5 over everything ``loader`` yields on all ranks together.

    Returns ``val_loss``, ``val_top1``, ``val_top5``, ``val_images`` and, with ``confusion=True``,
    ``confusion``: an (num_classes, num_classes) int64 tensor, rows = true class. With
    ``bad_images`` (see :func:`train_one_epoch`), samples that could not be decoded raise or are
    left out; ``val_skipped`` counts them. With ``mistakes`` = N > 0, ``mistakes`` lists this
    rank's N most confident wrong top-1 predictions, most confident first, as dicts with
    ``position`` (the sample's place in this rank's loader order), ``true``, ``predicted`` and
    ``probability`` (of the predicted class).
    """
    model.eval()
    wrong: list[tuple[float, int, int, int]] = []  # (probability, position, true, predicted)
    position = 0
    k = min(5, num_classes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(4, dtype=torch.int64, device=device)  # top1, topk, seen, skipped
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for images, targets in loader:
        positions = torch.arange(position, position + len(targets))
        position += len(targets)
        bad = bad_images.check(targets) if bad_images is not None else 0
        if bad:
            counts[3] += bad
            keep = targets >= 0
            images, targets, positions = images[keep], targets[keep], positions[keep]
            if not targets.numel():
                continue
        images, targets = to_device(images, targets, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hits = topk == targets[:, None]
        counts[:3] += torch.stack(
            [hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(targets.numel(), device=device)]
        )
        if confusion:
            matrix += torch.bincount(targets * num_classes + topk[:, 0], minlength=num_classes * num_classes)
        if mistakes:
            miss = ~hits[:, 0]
            if miss.any():  # a host sync, only when asked for (evaluate.py's gallery)
                probs = torch.softmax(logits[miss], dim=1).max(1)
                wrong += zip(
                    probs.values.tolist(),
                    positions[miss.cpu()].tolist(),
                    targets[miss].tolist(),
                    probs.indices.tolist(),
                )
                wrong = sorted(wrong, reverse=True)[:mistakes]
    if dist.is_available() and dist.is_initialized():
        for t in (loss_sum, counts, matrix):
            dist.all_reduce(t)
    seen = max(int(counts[2]), 1)
    out = {
        "val_loss": float(loss_sum) / seen,
        "val_top1": int(counts[0]) / seen,
        "val_top5": int(counts[1]) / seen,
        "val_images": int(counts[2]),
        "val_skipped": int(counts[3]),
    }
    if confusion:
        out["confusion"] = matrix.view(num_classes, num_classes).cpu()
    if mistakes:
        out["mistakes"] = [
            {"position": pos, "true": t, "predicted": p, "probability": prob} for prob, pos, t, p in wrong
        ]
    return out


def training_state(
    model: nn.Module, config: TrainConfig, settings: StepSettings, steps_per_epoch: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler | None]:
    """``config``'s recipe for ``model``: the optimizer, the per-step schedule over
    ``steps_per_epoch`` x epochs, and the GradScaler ``settings`` needs (None unless fp16). The one
    setup of a Ray Train worker and :func:`fit`.

    A fine-tuning run's groups (``--freeze-backbone``: the model's backbone frozen already, see
    model.freeze_backbone; ``--backbone-lr-mult``): see :func:`fine_tuning_groups`."""
    optimizer = build_optimizer(model, config.lr, config.momentum, config.weight_decay, device)
    if config.freeze_backbone or config.backbone_lr_mult != 1.0:
        groups = fine_tuning_groups(optimizer.param_groups, model, config.backbone_lr_mult)
        optimizer = type(optimizer)(groups, **optimizer.defaults)  # the same SGD, these groups
    scheduler = scheduler_for(optimizer, config, steps_per_epoch)
    return optimizer, scheduler, settings.make_scaler(device)


def fine_tuning_groups(groups: list[dict], model: nn.Module, backbone_lr_mult: float) -> list[dict]:
    """``groups`` (build_optimizer's: weight decay or none) each split in two, the head's
    parameters (model.head_names) at the group's lr, then the backbone's at ``backbone_lr_mult``
    times it; parameters that do not require gradients (a frozen backbone) left out, and groups
    left empty dropped. The head's groups come first: the lr metrics.csv records is the run's."""
    head, _ = split_parameters(model)
    ids = {id(p) for p in head}
    heads, backbones = [], []
    for group in groups:
        trained = [p for p in group["params"] if p.requires_grad]
        heads.append({**group, "params": [p for p in trained if id(p) in ids]})
        backbones.append(
            {
                **group,
                "params": [p for p in trained if id(p) not in ids],
                "lr": group["lr"] * backbone_lr_mult,
            }
        )
    return [g for g in heads + backbones if g["params"]]


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    config: TrainConfig,
    device: torch.device,
    *,
    num_classes: int,
    log: Callable[[str], None] | None = None,
) -> Iterator[dict]:
    """Train ``model`` with ``config``'s recipe in this process, without Ray (benchmarks, tests,
    notebooks): the optimizer, per-step schedule, training step (AMP, channels_last, label
    smoothing, clipping: :meth:`StepSettings.from_config`) and epoch functions of a Ray Train
    worker. ``model`` moves to ``device`` (in place). Yields one metrics dict per epoch, train and
    val, as it ends."""
    settings = StepSettings.from_config(config, device)
    if config.freeze_backbone:
        freeze_backbone(model)
    model = settings.prepare_model(model.to(device))
    optimizer, scheduler, scaler = training_state(model, config, settings, len(train_loader), device)
    for epoch in range(1, config.epochs + 1):
        row = train_one_epoch(
            model,
            train_loader,
            optimizer,
            device,
            settings=settings,
            scaler=scaler,
            scheduler=scheduler,
            log=log,
            epoch=epoch,
            rise_warning=RISE_WARNING if epoch == 1 else 0.0,
        )
        row.update(
            evaluate(
                model,
                val_loader,
                device,
                num_classes=num_classes,
                amp_dtype=settings.amp_dtype,
                channels_last=settings.channels_last,
            )
        )
        yield {"epoch": epoch, **row}
