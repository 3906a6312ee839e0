"""A run's outputs next to its checkpoints (metrics.csv, curves.png, tensorboard/, summary.json),
on any storage through the checkpoint's filesystem, and the record kept to the checkpoints Ray
recorded: a lost attempt's checkpoints are set aside as ``lost-<name>``."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import ray.train

from placesnet.config import SCORE, UserError

METRICS_FILE, CURVES_FILE, SUMMARY_FILE = "metrics.csv", "curves.png", "summary.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray's record of a run's checkpoints
LOST = "lost-"  # prefix of a set-aside checkpoint: Ray's, prepare_resume's and _best_in_run's globs skip it


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


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _checkpoint_dirs(fs, run_dir: str) -> list[str]:
    """Paths of the ``checkpoint_*`` directories of ``run_dir``, by name."""
    from pyarrow.fs import FileSelector, FileType

    infos = fs.get_file_info(FileSelector(run_dir, allow_not_found=True))
    return sorted(
        i.path for i in infos if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")
    )


def _set_aside(fs, path: str) -> str:
    """Rename checkpoint ``path`` to ``lost-<name>`` beside it; object stores have no directory
    rename, so there it is a copy and a delete. Returns the new name."""
    from pyarrow.fs import copy_files

    name = LOST + posixpath.basename(path)
    target = posixpath.join(posixpath.dirname(path), name)
    if fs.type_name == "local":
        fs.move(path, target)
    else:
        copy_files(path, target, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(path)
    return name


def _drop_stale_summary(fs, run_dir: str, set_aside: list[str]) -> None:
    """A summary.json that names a set-aside checkpoint is out of date (the driver writes a new one)."""
    path = posixpath.join(run_dir, SUMMARY_FILE)
    summary = _read_json(fs, path) or {}
    named = {
        posixpath.basename(str(summary.get(k, "")).rstrip("/"))
        for k in ("best_checkpoint", "latest_checkpoint")
    }
    if named & set(set_aside):
        fs.delete_file(path)


def set_aside_lost_checkpoints(fs, run_dir: str, keep: str | None, epochs_done: int) -> list[str]:
    """Before a (re)started worker group trains: set aside every checkpoint of ``run_dir`` newer than
    the one Ray resumes from (``keep``, which holds ``epochs_done`` epochs; None and 0 for none),
    or without a readable meta.json. Rank 0 writes a checkpoint before Ray records it, so an
    attempt that lost a node can leave one or two such directories; the epochs they hold are
    trained again, and the record (Ray's snapshot, metrics.csv, summary.json) must name each
    epoch once. Returns one line per directory set aside.

    ``fs``/``run_dir``: the run's storage filesystem and path on it (Ray's StorageContext), so it
    works on any storage."""
    lines, moved = [], []
    for path in _checkpoint_dirs(fs, run_dir):
        name = posixpath.basename(path)
        if name == keep:
            continue
        meta = _read_json(fs, posixpath.join(path, "meta.json"))
        epoch = meta.get("epoch") if meta else None
        if isinstance(epoch, int) and epoch + 1 <= epochs_done:
            continue  # an older checkpoint Ray recorded (and keeps)
        what = f"epoch {epoch + 1}" if isinstance(epoch, int) else "an unfinished checkpoint"
        target = _set_aside(fs, path)
        moved.append(name)
        lines.append(
            f"setting aside {name}: {what} of an attempt lost before Ray recorded it "
            f"(resuming after epoch {epochs_done}): moved to {target}"
        )
    if moved:
        _drop_stale_summary(fs, run_dir, moved)
    return lines


def set_aside_unrecorded(result: "ray.train.Result") -> list[str]:
    """After fit(): set aside every checkpoint of the run that Ray did not record (neither in the
    Result nor in its snapshot), e.g. written by a worker of a lost attempt after the last restart.
    Returns one line per directory set aside."""
    fs = result.checkpoint.filesystem
    run_dir = posixpath.dirname(result.checkpoint.path)
    recorded = {posixpath.basename(c.path) for c, _ in result.best_checkpoints or []}
    recorded.add(posixpath.basename(result.checkpoint.path))
    snapshot = _read_json(fs, posixpath.join(run_dir, SNAPSHOT))
    if snapshot is None:  # without Ray's record, nothing is set aside
        return []
    recorded |= {r.get("checkpoint_dir_name") for r in snapshot.get("checkpoint_results", [])}
    lines = []
    for path in _checkpoint_dirs(fs, run_dir):
        name = posixpath.basename(path)
        if name not in recorded:
            target = _set_aside(fs, path)
            lines.append(f"setting aside {name}: not recorded by Ray (a lost attempt's): moved to {target}")
    return lines


def _uri(checkpoint: "ray.train.Checkpoint") -> str:
    """An absolute local path, or the URI of a checkpoint on remote storage."""
    if checkpoint.filesystem.type_name == "local":
        return str(Path(checkpoint.path).resolve())
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"


def summarize(result: "ray.train.Result", storage_path: str, name: str) -> tuple[dict, list[dict]]:
    """summary.json content for a finished fit (written next to the checkpoints, on any storage),
    and the metrics history. Checkpoints Ray did not record are set aside first (one line each)."""
    run_dir = f"{storage_path.rstrip('/')}/{name}"
    best = result.get_best_checkpoint(SCORE, "max")
    if best is None or result.checkpoint is None:
        raise UserError(f"the run in {run_dir} produced no checkpoint")
    for line in set_aside_unrecorded(result):
        print(line)
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
        "summary_json": f"{run_dir}/{SUMMARY_FILE}",
        # where the weights came from when the run did not start from random ones (--init-from)
        **({"source": best_meta["source"]} if best_meta.get("source") else {}),
    }
    fs = result.checkpoint.filesystem
    with fs.open_output_stream(posixpath.join(posixpath.dirname(result.checkpoint.path), SUMMARY_FILE)) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary, latest_meta["history"]
