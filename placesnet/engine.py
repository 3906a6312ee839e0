"""Ray-free epoch functions: the same code runs under Ray Train, plain torch, or torchrun.

When ``torch.distributed`` is initialised the per-rank sums (loss, correct, count) are
all-reduced, so every rank returns the global numbers. Evaluation is exact whatever the worker
count when the val loader shards without padding (``data.ShardSampler``).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import UserError
from .data import normalize


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: the run cannot recover at this learning rate."""


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 on GPUs that support it, fp16 on older GPUs, None (full fp32) on CPU or if disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler only where it is needed: fp16 autocast (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (float64 so large counts stay exact); no-op when single."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _finite_loss(loss: torch.Tensor, *, epoch: int, step: int, steps: int,
                 optimizer: torch.optim.Optimizer) -> float:
    """This rank's loss as a float; TrainingDiverged on every rank at once if any rank's is NaN/inf.

    The verdict is collective: the loss is summed over ranks (NaN or inf on one rank makes the sum
    non-finite on all), so no rank trains on, or waits in an all-reduce, after another stopped.
    It runs after the optimizer step, at the sync point the loss logging needs anyway, so it adds
    no GPU stall; the weights it leaves behind are not checkpointed.
    """
    value = total = loss.item()
    if dist.is_available() and dist.is_initialized():
        summed = loss.detach().float().reshape(1).clone()
        dist.all_reduce(summed)
        total = summed.item()
    if not math.isfinite(total):
        lr = optimizer.param_groups[0]["lr"]
        raise TrainingDiverged(
            f"training diverged: the loss is {total} at epoch {epoch}, step {step}/{steps} "
            f"(lr {lr:g}); lower --lr or warm it up with --warmup-epochs")
    return value


def _to_device(images, targets, device, channels_last):
    """Copy a batch to ``device``; uint8 images are normalised there (a quarter of the bytes cross
    PCIe, and the conversion runs on the GPU instead of in the loader processes)."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype == torch.uint8:
        images = normalize(images)
    return images, targets.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    label_smoothing: float = 0.0,
    log_every: int = 0,
    log: Callable[[str], None] | None = None,
    epoch: int = 0,
) -> dict:
    """One pass over ``loader``; returns global ``train_loss``, ``train_top1``, ``train_images``,
    ``train_time_s`` and ``images_per_s``.

    Raises :class:`TrainingDiverged` (on all ranks at once) when the loss becomes NaN or infinite,
    instead of training on with NaN weights.

    ``log`` (rank 0 only, typically) gets a progress line every ``log_every`` steps.
    """
    model.train()
    steps = len(loader)
    loss_sum = correct = seen = 0.0
    start = window_start = time.perf_counter()
    window_seen = 0
    for step, (images, targets) in enumerate(loader, start=1):
        images, targets = _to_device(images, targets, device, channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
            loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = targets.numel()
        # .item() syncs with the GPU; fine at this granularity and keeps the code readable.
        loss_sum += _finite_loss(loss, epoch=epoch, step=step, steps=steps, optimizer=optimizer) * n
        correct += (logits.argmax(1) == targets).sum().item()
        seen += n
        window_seen += n
        if log and log_every and (step % log_every == 0 or step == steps):
            now = time.perf_counter()
            log(f"epoch {epoch} step {step}/{steps} loss {loss_sum / seen:.4f} "
                f"top1 {correct / seen:.4f} {window_seen / (now - window_start):.0f} img/s per worker")
            window_start, window_seen = now, 0
    elapsed = time.perf_counter() - start
    loss_sum, correct, seen, elapsed_sum = _all_reduce([loss_sum, correct, seen, elapsed], device)
    # Ranks run in lockstep under DDP, so the mean of their times is the epoch's wall time.
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    wall = elapsed_sum / world
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_top1": correct / max(seen, 1),
        "train_images": int(seen),
        "train_time_s": wall,
        "images_per_s": seen / wall if wall > 0 else 0.0,
    }


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
) -> dict:
    """Loss, top-1 and top-5 over everything ``loader`` yields on all ranks together.

    Returns ``val_loss``, ``val_top1``, ``val_top5``, ``val_images`` and, with ``confusion=True``,
    ``confusion``: an (num_classes, num_classes) int64 tensor, rows = true class.
    """
    model.eval()
    k = min(5, num_classes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top1, topk, seen
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for images, targets in loader:
        images, targets = _to_device(images, targets, device, channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hits = topk == targets[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(targets.numel(),
                                                                                 device=device)])
        if confusion:
            matrix += torch.bincount(targets * num_classes + topk[:, 0],
                                     minlength=num_classes * num_classes)
    if dist.is_available() and dist.is_initialized():
        for t in (loss_sum, counts, matrix):
            dist.all_reduce(t)
    seen = max(int(counts[2]), 1)
    out = {
        "val_loss": float(loss_sum) / seen,
        "val_top1": int(counts[0]) / seen,
        "val_top5": int(counts[1]) / seen,
        "val_images": int(counts[2]),
    }
    if confusion:
        out["confusion"] = matrix.view(num_classes, num_classes).cpu()
    return out


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum; no weight decay on biases and BatchNorm (1-D parameters).

    The fused CUDA kernel is used on GPU (one launch for all parameters instead of one each).
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0,
                           fused=device.type == "cuda" or None)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int,
                    warmup_epochs: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch LR multiplier: linear warmup, then cosine to 0, step (/10 at 50% and 75%) or flat."""
    import math

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        if schedule == "cosine":
            progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "step":
            return 0.1 ** sum(epoch >= m * epochs for m in (0.5, 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
