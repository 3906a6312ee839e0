"""The self-describing checkpoint format shared by training, evaluation, prediction and serving.

A checkpoint is a directory::

    model.pt        model state_dict (unwrapped from DDP), tensors only
    train_state.pt  optimizer, scheduler and GradScaler state, tensors and plain values only
    config.json     the TrainConfig that built the model
    meta.json       format version, epoch, class names, this epoch's metrics, metrics history

Everything loads with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import METRIC, TrainConfig, UserError
from .model import build_model

FORMAT = "placesnet-checkpoint/1"
MODEL_FILE, STATE_FILE, CONFIG_FILE, META_FILE = "model.pt", "train_state.pt", "config.json", "meta.json"
SUMMARY_FILE = "summary.json"


def save_checkpoint(directory: str | Path, *, model: nn.Module, config: TrainConfig,
                    classes: list[str], epoch: int, metrics: dict, history: list[dict],
                    optimizer=None, scheduler=None, scaler=None) -> Path:
    """Write a checkpoint for the end of ``epoch`` (0-based) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    torch.save(model.state_dict(), directory / MODEL_FILE)
    torch.save({
        "optimizer": optimizer.state_dict() if optimizer else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict() if scaler else None,
        "schedule_unit": "step",  # the scheduler counts optimizer steps (before 2026-11-28: epochs)
    }, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    meta = {"format": FORMAT, "epoch": epoch, "classes": list(classes), "metrics": metrics,
            "history": history}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"not a checkpoint: {path.parent} has no {path.name}") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"corrupt checkpoint: {path} is not valid JSON") from None


def _torch_load(path: Path, device="cpu"):
    if not path.is_file():
        raise UserError(f"not a checkpoint: {path.parent} has no {path.name}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, ...
        raise UserError(f"corrupt checkpoint: cannot load {path} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'no details'})") from None


def read_meta(directory: str | Path) -> dict:
    return _read_json(Path(directory) / META_FILE)


def load_model_state(directory: str | Path, device="cpu") -> dict:
    """The model's state_dict, loaded with weights_only=True."""
    return _torch_load(Path(directory) / MODEL_FILE, device)


def load_train_state(directory: str | Path, device="cpu") -> dict:
    return _torch_load(Path(directory) / STATE_FILE, device)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Load a checkpoint (or a run dir / sweep best.json, see :func:`resolve_checkpoint`)."""
    directory = resolve_checkpoint(path)
    meta = read_meta(directory)
    if meta.get("format") != FORMAT:
        raise UserError(f"not a placesnet checkpoint: {directory} (format {meta.get('format')!r})")
    try:
        config = TrainConfig.from_dict(_read_json(directory / CONFIG_FILE)).validate()
    except (TypeError, ValueError) as e:
        raise UserError(f"corrupt checkpoint: bad config.json in {directory}: {e}") from None
    classes = meta["classes"]
    model = build_model(config, len(classes))
    state = load_model_state(directory, device)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"corrupt checkpoint: weights in {directory} do not fit a "
                        f"{config.model} with {len(classes)} classes "
                        f"({str(e).splitlines()[0][:200]})") from None
    model.to(device).eval()
    return Loaded(directory, config, classes, meta, model)


def _best_in_run(run_dir: Path) -> Path:
    """The best checkpoint of a training run dir: summary.json's, else the best by METRIC."""
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        best = _read_json(summary).get("best_checkpoint")
        if best and (Path(best) / MODEL_FILE).is_file():
            return Path(best)
    candidates = [d for d in run_dir.glob("checkpoint_*") if (d / META_FILE).is_file()]
    if not candidates:
        raise UserError(f"no checkpoint in {run_dir}: expected a checkpoint directory (with "
                        f"{MODEL_FILE}), a training run directory or a sweep's best.json")
    return max(candidates, key=lambda d: (read_meta(d)["metrics"].get(METRIC, -1), d.name))


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a run dir (its best checkpoint) or a JSON file naming one
    (``best_checkpoint`` in a run's summary.json or a sweep's best.json)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    p = p.resolve()
    if p.is_file():
        if p.suffix != ".json":
            raise UserError(f"not a checkpoint: {p} (give a checkpoint directory, a run directory "
                            "or a summary/best .json file)")
        best = _read_json(p).get("best_checkpoint")
        if not best:
            raise UserError(f"{p} names no best_checkpoint")
        return resolve_checkpoint(best)
    if (p / MODEL_FILE).exists() or (p / META_FILE).exists():
        return p
    return _best_in_run(p)
