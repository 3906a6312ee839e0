"""A run's outputs next to its checkpoints (metrics.csv, curves.png, tensorboard/, summary.json),
on any storage through the checkpoint's filesystem."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import ray.train

from placesnet.config import SCORE, UserError

METRICS_FILE, CURVES_FILE = "metrics.csv", "curves.png"


class RunOutputs(ray.train.UserCallback):
    """Keeps ``metrics.csv``, ``curves.png`` and ``tensorboard/`` in the run dir up to date after
    every epoch.

    Runs on the Train controller. The rows come from the history saved inside each checkpoint,
    so a restarted or resumed run rewrites a consistent file. Writes through the checkpoint's
    own filesystem, so it works for local, NFS and s3:// storage alike.
    """

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is None:
            return
        run_dir = posixpath.dirname(checkpoint.path)
        write_run_outputs(
            checkpoint.filesystem,
            run_dir,
            _checkpoint_meta(checkpoint)["history"],
            title=posixpath.basename(run_dir),
        )


def write_run_outputs(fs, run_dir: str, history: list[dict], title: str = "") -> None:
    """metrics.csv, curves.png and tensorboard/ (see placesnet/tensorboard.py) from ``history``."""
    import pandas as pd

    from placesnet.plots import curves_png
    from placesnet.tensorboard import TB_DIR, TB_FILE, event_file_bytes

    csv = pd.DataFrame(history).to_csv(index=False).encode()
    fs.create_dir(posixpath.join(run_dir, TB_DIR), recursive=True)
    for name, payload in (
        (METRICS_FILE, csv),
        (CURVES_FILE, curves_png(history, title)),
        (f"{TB_DIR}/{TB_FILE}", event_file_bytes(history)),
    ):
        with fs.open_output_stream(posixpath.join(run_dir, name)) as f:
            f.write(payload)


def _checkpoint_meta(checkpoint: "ray.train.Checkpoint") -> dict:
    """meta.json of a checkpoint on any storage (local, NFS, s3://) through its filesystem."""
    with checkpoint.filesystem.open_input_stream(posixpath.join(checkpoint.path, "meta.json")) as f:
        return json.loads(f.read())


def _uri(checkpoint: "ray.train.Checkpoint") -> str:
    """An absolute local path, or the URI of a checkpoint on remote storage."""
    if checkpoint.filesystem.type_name == "local":
        return str(Path(checkpoint.path).resolve())
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"


def summarize(result: "ray.train.Result", storage_path: str, name: str) -> tuple[dict, list[dict]]:
    """summary.json content for a finished fit (written next to the checkpoints, on any storage),
    and the metrics history."""
    run_dir = f"{storage_path.rstrip('/')}/{name}"
    best = result.get_best_checkpoint(SCORE, "max")
    if best is None or result.checkpoint is None:
        raise UserError(f"the run in {run_dir} produced no checkpoint")
    best_meta, latest_meta = _checkpoint_meta(best), _checkpoint_meta(result.checkpoint)
    summary = {
        "run_dir": run_dir,
        "best_checkpoint": _uri(best),
        "best_epoch": best_meta["metrics"]["epoch"],
        "val_top1": best_meta["metrics"]["val_top1"],
        "val_top5": best_meta["metrics"]["val_top5"],
        "val_loss": best_meta["metrics"]["val_loss"],
        "latest_checkpoint": _uri(result.checkpoint),
        "epochs_completed": latest_meta["metrics"]["epoch"],
        "classes": best_meta["classes"],
        "metrics_csv": f"{run_dir}/{METRICS_FILE}",
        "curves_png": f"{run_dir}/{CURVES_FILE}",
        "tensorboard_dir": f"{run_dir}/tensorboard",
        "summary_json": f"{run_dir}/summary.json",
    }
    fs = result.checkpoint.filesystem
    with fs.open_output_stream(
        posixpath.join(posixpath.dirname(result.checkpoint.path), "summary.json")
    ) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary, latest_meta["history"]
