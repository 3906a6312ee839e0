"""The self-describing checkpoint format shared by training, evaluation, prediction and serving.

A checkpoint is a directory::

    model.pt        model state_dict (unwrapped from DDP), tensors only
    train_state.pt  optimizer, scheduler and GradScaler state, tensors and plain values only
    config.json     the TrainConfig that built the model
    meta.json       format version, epoch, class names, this epoch's metrics, metrics history,
                    the size and sha256 of each file above, and for a model trained elsewhere
                    its ``source`` (the imported file and its sha256, licence, citation: see
                    placesnet/published.py)

Everything loads with ``torch.load(weights_only=True)``: a checkpoint cannot run code. Each file
is written to a temporary name and renamed, meta.json last, so a checkpoint whose meta.json is
there is complete; :func:`verify_checkpoint` checks the files against their checksums.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from placesnet.checkpoint_files import (  # noqa: F401 (the format's names, importable from here too)
    CONFIG_FILE,
    FORMAT,
    LATEST,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    _fingerprint,
    _torch_load,
    is_latest,
    verify_checkpoint,
)
from placesnet.config import TrainConfig, UserError, checkpoint_score

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported where weights are read or written, not here: resolving a path (a wrong
# --checkpoint, `latest`, a run dir) answers in a fraction of a second instead of after torch's
# seconds of import.


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    config: TrainConfig,
    classes: list[str],
    epoch: int,
    metrics: dict,
    history: list[dict],
    optimizer=None,
    scheduler=None,
    scaler=None,
    source: dict | None = None,
) -> Path:
    """Write a checkpoint for the end of ``epoch`` (0-based) into ``directory``; ``source``: where
    the weights came from when they were not trained here (kept in meta.json)."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    _atomic(directory / MODEL_FILE, lambda f: torch.save(model.state_dict(), f))
    _atomic(
        directory / STATE_FILE,
        lambda f: torch.save(
            {
                "optimizer": optimizer.state_dict() if optimizer else None,
                "scheduler": scheduler.state_dict() if scheduler else None,
                "scaler": scaler.state_dict() if scaler else None,
                "schedule_unit": "step",  # the scheduler counts optimizer steps (before 2026-11-28: epochs)
            },
            f,
        ),
    )
    _atomic(directory / CONFIG_FILE, lambda f: f.write(json.dumps(config.to_dict(), indent=2).encode()))
    meta = {
        "format": FORMAT,
        "epoch": epoch,
        "classes": list(classes),
        "metrics": metrics,
        "history": history,
        "files": {name: _fingerprint(directory / name) for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE)},
        **({"source": source} if source else {}),
    }
    _atomic(directory / META_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return directory


def _atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary name next to ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Loaded:
    """What a checkpoint holds; ``model`` is built, loaded and in eval mode on ``device``."""

    path: Path
    config: TrainConfig
    classes: list[str]
    meta: dict
    model: nn.Module

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    @property
    def note(self) -> str | None:
        """What a user must know before trusting a prediction: see :func:`scope_note`."""
        return scope_note(self.config, self.classes)


PLACES365_CLASSES = 365


def scope_note(config: TrainConfig, classes: list[str]) -> str | None:
    """One line saying what a model cannot know, or None for a model of all 365 Places365 classes.

    A model trained on the embedded sample data knows only its few drawn scene kinds: it gives
    any real photo one of them, often with high confidence."""
    n = len(classes)
    if config.dataset == "sample":
        return (
            f"this model was trained on the embedded sample data and knows only its {n} classes "
            f"of drawn scenes; its answer for a real photo is one of them, however confident. "
            f"Train with --dataset places365 for real photos"
        )
    if n < PLACES365_CLASSES:
        return f"this model knows only {n} of Places365's {PLACES365_CLASSES} scene classes"
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"not a checkpoint: {path.parent} has no {path.name}") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"corrupt checkpoint: {path} is not valid JSON") from None


def read_meta(directory: str | Path) -> dict:
    return _read_json(Path(directory) / META_FILE)


def load_model_state(directory: str | Path, device="cpu") -> dict:
    """The model's state_dict, loaded with weights_only=True."""
    return _torch_load(Path(directory) / MODEL_FILE, device)


def load_train_state(directory: str | Path, device="cpu") -> dict:
    return _torch_load(Path(directory) / STATE_FILE, device)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Load a checkpoint (or a run dir / sweep best.json, see :func:`resolve_checkpoint`), after
    :func:`verify_checkpoint`: a file changed since it was written (flipped bytes of the same size,
    a truncated copy) is a UserError that names it, before any of it is loaded."""
    directory = resolve_checkpoint(path)
    meta = read_meta(directory)
    if meta.get("format") != FORMAT:
        raise UserError(f"not a placesnet checkpoint: {directory} (format {meta.get('format')!r})")
    problem = verify_checkpoint(directory)
    if problem:
        raise UserError(f"corrupt checkpoint: {directory}: {problem}")
    try:
        config = TrainConfig.from_dict(_read_json(directory / CONFIG_FILE)).validate()
    except (TypeError, ValueError) as e:
        raise UserError(f"corrupt checkpoint: bad config.json in {directory}: {e}") from None
    from placesnet.model import build_model

    classes = meta["classes"]
    model = build_model(config, len(classes))
    state = load_model_state(directory, device)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(
            f"corrupt checkpoint: weights in {directory} do not fit a "
            f"{config.model} with {len(classes)} classes "
            f"({str(e).splitlines()[0][:200]})"
        ) from None
    model.to(device).eval()
    return Loaded(directory, config, classes, meta, model)


def _best_in_run(run_dir: Path) -> Path:
    """The best checkpoint of a training run dir: summary.json's, else the best by val top-1
    (ties: the lower val loss)."""
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        best = _read_json(summary).get("best_checkpoint")
        if best and verify_checkpoint(best) is None:
            return Path(best)
    candidates = [d for d in run_dir.glob("checkpoint_*") if verify_checkpoint(d) is None]
    if not candidates:
        raise UserError(
            f"no checkpoint in {run_dir}: expected a checkpoint directory (with "
            f"{MODEL_FILE}), a training run directory or a sweep's best.json"
        )
    return max(candidates, key=lambda d: (checkpoint_score(read_meta(d)["metrics"]), d.name))


def latest_run(storage: str | Path) -> Path:
    """The newest finished run or sweep directly under ``storage``: the newest
    ``<storage>/<name>/summary.json`` (train.py) or ``best.json`` (sweep.py)."""
    storage = Path(storage).expanduser()
    found = (
        [p for pattern in ("*/" + SUMMARY_FILE, "*/best.json") for p in storage.glob(pattern) if p.is_file()]
        if storage.is_dir()
        else []
    )
    if not found:
        raise UserError(
            f"--checkpoint latest: no finished run (*/{SUMMARY_FILE} or */best.json) "
            f"under {storage}; give latest:STORAGE_PATH or a path"
        )
    return max(found, key=lambda p: (p.stat().st_mtime, str(p)))


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a run dir (its best checkpoint), a JSON file naming one
    (``best_checkpoint`` in a run's summary.json or a sweep's best.json), or ``latest``
    (``latest:STORAGE_PATH``): the best checkpoint of the newest finished run or sweep under
    ~/ray_results (or STORAGE_PATH). Any of these on object storage (``s3://bucket/run``,
    ``latest:s3://bucket/runs``) is found there and fetched into this machine's cache, verified
    after the download (placesnet/remote.py): the local copy is returned."""
    from placesnet import remote

    source = locate_checkpoint(path)
    return remote.fetch(remote.open_uri(source)) if remote.is_remote(source) else Path(source)


def locate_checkpoint(path: str | Path) -> str:
    """The checkpoint directory ``path`` names (see :func:`resolve_checkpoint`), without fetching
    it: an absolute local path, or the URI of a checkpoint on object storage."""
    from placesnet import remote

    spec = str(path)
    if is_latest(spec):
        from placesnet.config import DEFAULT_STORAGE

        storage = spec[len(LATEST) + 1 :] or DEFAULT_STORAGE
        if remote.is_remote(storage):
            return remote.locate(f"{LATEST}:{storage}").uri
        return locate_checkpoint(latest_run(_local(storage)))
    if remote.is_remote(spec):
        return remote.locate(spec).uri
    p = Path(_local(spec)).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    p = p.resolve()
    if p.is_file():
        if p.suffix != ".json":
            raise UserError(
                f"not a checkpoint: {p} (give a checkpoint directory, a run directory "
                "or a summary/best .json file)"
            )
        best = _read_json(p).get("best_checkpoint")
        if not best:
            raise UserError(f"{p} names no best_checkpoint")
        return locate_checkpoint(best)
    if (p / MODEL_FILE).exists() or (p / META_FILE).exists():
        return str(p)
    return str(_best_in_run(p))


def _local(spec: str) -> str:
    """A ``file://`` URI as the plain path it names."""
    return urlsplit(spec).path if spec.startswith("file://") else spec
