"""One training step, the same wherever a model trains: a Ray Train worker's epoch loop
(:func:`engine.train_one_epoch`), :func:`engine.fit` (benchmarks, notebooks) and the LR range test
(:func:`lr_find.lr_range_test`).

The step's settings (precision, memory format, label smoothing, clipping) come from the config
and the device once, in :meth:`StepSettings.from_config`, so every path trains the same step. No
Ray here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from placesnet.config import TrainConfig
from placesnet.data.transforms import normalize

# The target of a sample the loss leaves out (one that could not be decoded, see engine).
IGNORED = -1


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 on GPUs that support it, fp16 on older GPUs, None (full fp32) on CPU or if disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class StepSettings:
    """How a training step runs: autocast dtype (None: fp32), channels_last inputs and model,
    the loss's label smoothing, and the global gradient-norm clip (0: none)."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    label_smoothing: float = 0.0
    clip_grad_norm: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device) -> "StepSettings":
        """``cfg``'s step on ``device``: AMP and channels_last only on a GPU (--amp,
        --channels-last), --label-smoothing and --clip-grad-norm as given."""
        return cls(
            amp_dtype=amp_dtype_for(device, cfg.amp),
            channels_last=cfg.channels_last and device.type == "cuda",
            label_smoothing=cfg.label_smoothing,
            clip_grad_norm=cfg.clip_grad_norm,
        )

    @property
    def grad_scaler(self) -> bool:
        """Whether the step needs a GradScaler: fp16 autocast (bf16 has fp32's exponent range)."""
        return self.amp_dtype == torch.float16

    def make_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A GradScaler where the step needs one (see :attr:`grad_scaler`), else None. It keeps
        its scale from step to step: make one per run, and checkpoint it with the optimizer."""
        return torch.amp.GradScaler(device.type) if self.grad_scaler else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``model`` in the memory format the step feeds it (in place; returns it)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """The forward pass's autocast context for ``amp_dtype`` (a no-op for None: fp32)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def to_device(
    images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a batch to ``device``; uint8 images are normalised there (a quarter of the bytes cross
    PCIe, and the conversion runs on the GPU instead of in the loader processes)."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype == torch.uint8:
        images = normalize(images)
    return images, targets.to(device, non_blocking=True)


class StepOutput(NamedTuple):
    loss: torch.Tensor  # the step's (unscaled) mean loss, detached, on the device
    logits: torch.Tensor  # (B, classes), detached
    targets: torch.Tensor  # (B,) on the device; IGNORED for samples left out of the loss


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
    settings: StepSettings,
    *,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    counted: int | None = None,
    loss_weight: float = 1.0,
) -> StepOutput:
    """One optimizer step on a batch: forward under autocast, cross-entropy with label smoothing
    (targets of IGNORED left out), backward through ``scaler`` if any, gradient-norm clipping,
    ``optimizer.step()``, then ``scheduler.step()`` if any (a per-step schedule). Never waits for
    the device.

    ``images``/``targets`` may be on the CPU or already on ``device``. ``counted`` is how many
    targets are not IGNORED when the caller knows it (counted on the CPU, so no host sync): 0 gives
    a zero loss that still runs backward, so DDP's gradient all-reduce happens on every rank.
    ``loss_weight`` multiplies the loss that is backpropagated (not the one returned): a rank's
    share of a global batch that does not divide evenly (see data.loaders.GlobalBatches).
    """
    images, targets = to_device(images, targets, device, settings.channels_last)
    with autocast(device, settings.amp_dtype):
        logits = model(images)
        if counted != 0:
            loss = F.cross_entropy(
                logits, targets, label_smoothing=settings.label_smoothing, ignore_index=IGNORED
            )
        else:  # every sample of this rank's batch was left out: keep DDP in step
            loss = logits.sum() * 0.0
    optimizer.zero_grad(set_to_none=True)
    # A disabled GradScaler passes everything through: one code path with or without scaling.
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    scaler.scale(loss * loss_weight if loss_weight != 1.0 else loss).backward()
    if settings.clip_grad_norm:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    return StepOutput(loss.detach(), logits.detach(), targets)
