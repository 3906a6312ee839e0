"""ServedModel: one checkpoint as a replica serves it. Built only from a checkpoint that passed
every check (its files' sizes and sha256 against meta.json, ``weights_only`` loading, weights that
fit the architecture in its config.json) and then answered a blank image on the replica's device,
so a model that is swapped in can run. Immutable: a request keeps the one it started with while
the replica moves on to the next (see :meth:`placesnet.serve.replica.Replica.use_checkpoint`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from placesnet.checkpoint import Loaded


@dataclass(frozen=True)
class ServedModel:
    """The model of ``checkpoint`` (a checkpoint directory) on ``device``, with what answering
    needs: the eval transform the checkpoint records (placesnet/data/views.py), its class names,
    the indoor/outdoor label of each class when they are Places365's (placesnet/environment.py;
    else None), a short id and its scope note."""

    checkpoint: Path
    loaded: Loaded
    transform: Callable
    labels: list[str]
    device: torch.device
    io_labels: torch.Tensor | None = None
    # cam.explain flips the parameters' requires_grad while it runs and sets them back after:
    # one map at a time, or two overlapping calls would put back each other's flags
    _explaining: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, checkpoint: str | Path, device: torch.device) -> ServedModel:
        """The checkpoint (a directory, a run directory or a summary/best JSON) verified, loaded and
        probed; :class:`placesnet.config.UserError` with one line that names the file and what is
        wrong when it cannot be served."""
        from placesnet.checkpoint import load_checkpoint
        from placesnet.config import pretty
        from placesnet.data.views import single_view
        from placesnet.environment import io_labels

        loaded = load_checkpoint(checkpoint, device)  # sizes and sha256 first, then the weights
        served = cls(
            checkpoint=loaded.path,
            loaded=loaded,
            transform=single_view(loaded.config),
            labels=[pretty(c) for c in loaded.classes],
            device=device,
            io_labels=io_labels(loaded.classes),
        )
        try:
            served.probe()
        except Exception as e:  # e.g. an image size the architecture cannot take, a device error
            from placesnet.config import UserError

            first = str(e).splitlines()[0][:200] if str(e) else "no details"
            raise UserError(
                f"checkpoint {loaded.path} cannot run on {device}: {type(e).__name__}: {first}"
            ) from None
        return served

    @property
    def model_id(self) -> str:
        """``<model>:<run dir>/<checkpoint dir>``, e.g. ``deepcnn:ddp/checkpoint_000003``."""
        return f"{self.loaded.config.model}:{self.checkpoint.parent.name}/{self.checkpoint.name}"

    @property
    def fingerprint(self) -> str | None:
        """What /healthz shows: :func:`placesnet.checkpoint_files.model_fingerprint`."""
        from placesnet.checkpoint_files import model_fingerprint

        return model_fingerprint(self.loaded.meta)

    @property
    def note(self) -> str | None:
        return self.loaded.note

    def probe(self) -> None:
        """One forward pass of a blank image: raises if the model cannot run on its device."""
        size = self.loaded.config.image_size
        self.run(torch.zeros(1, 3, size, size, dtype=torch.uint8))

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) images -> (B, classes) probabilities on the CPU."""
        from placesnet.data.transforms import normalize

        with torch.inference_mode():
            # uint8 until here: normalised on the replica's device, as in training
            logits = self.loaded.model(normalize(batch.to(self.device, non_blocking=True)))
            return torch.softmax(logits.float(), dim=1).cpu()

    def heatmaps(self, batch: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """uint8 (B, 3, S, S) images -> (B, S, S) Grad-CAM heatmaps in [0, 1] on the CPU, each
        for its class in ``classes``: of the normalised input :meth:`run` predicts from."""
        from placesnet.evaluation import batch_heatmaps

        with self._explaining:
            return batch_heatmaps(self.loaded, batch, classes, self.device, batch_size=len(batch) or 1)

    def top_k(self, probs: torch.Tensor, k: int) -> list[dict]:
        values, indices = probs.topk(min(k, len(self.labels)))
        return [
            {"label": self.labels[i], "class_index": i, "probability": p}
            for p, i in zip(values.tolist(), indices.tolist())
        ]

    def environment(self, probs: torch.Tensor) -> str | None:
        """'indoor' or 'outdoor' for one image's ``probs`` by the official rule; None for a model
        whose classes are not Places365's 365."""
        from placesnet.environment import environment

        return None if self.io_labels is None else environment(probs, self.io_labels)

    def info(self) -> dict[str, Any]:
        """The checkpoint, its training config and validation accuracy."""
        meta = self.loaded.meta
        return {
            "model": self.model_id,
            "checkpoint": str(self.checkpoint),
            "note": self.note,
            "epoch": meta["epoch"] + 1,
            "val_top1": meta["metrics"].get("val_top1"),
            "val_top5": meta["metrics"].get("val_top5"),
            "num_classes": len(self.labels),
            "image_size": self.loaded.config.image_size,
            "config": self.loaded.config.to_dict(),
        }
