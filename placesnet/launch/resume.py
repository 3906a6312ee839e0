"""Make a run directory resumable before Ray Train opens it.

Ray Train resumes from the newest checkpoint named in the run's
``checkpoint_manager_snapshot.json``. If that checkpoint is broken (a truncated ``model.pt``, a
garbage ``meta.json`` or ``config.json``) every restart and every rerun fails on it again, and a
deleted checkpoint directory stops Ray before any worker starts. :func:`prepare_resume` checks
every checkpoint of the run (:func:`checkpoint.verify_checkpoint`), moves the broken ones aside as
``broken-<name>`` (nothing is deleted), and when Ray's snapshot names a broken or missing one,
or lacks an intact one (a run stopped between writing a checkpoint and recording it), rewrites
the snapshot from the intact checkpoints, so the run resumes from the newest of them.

The snapshot format is Ray 2.60's (``ray.train.v2``'s ``_CheckpointManagerState``); the old one is
kept as ``checkpoint_manager_snapshot.json.broken``. Storage on this machine's filesystem only (a
local or shared path, or ``file://``; placesnet/launch/driver.py decides): runs on s3:// or gs://
are left to Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from placesnet.checkpoint import CONFIG_FILE, META_FILE, verify_checkpoint
from placesnet.config import UserError

SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class ResumePlan:
    """What :func:`prepare_resume` found: the checkpoint a rerun resumes from (None: a new run)."""

    checkpoint: Path | None = None
    epoch: int = 0  # epochs that checkpoint has completed
    config: dict | None = None
    notes: list[str] = field(default_factory=list)  # one line per broken or missing checkpoint


def _snapshot_names(path: Path) -> list[str] | None:
    """Checkpoint dir names in Ray's snapshot; None when it is unreadable."""
    try:
        state = json.loads(path.read_text())
        return [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None


def _write_snapshot(run_dir: Path, intact: list[tuple[int, Path, dict]]) -> None:
    """Ray's checkpoint-manager snapshot for the intact checkpoints (epoch, dir, meta), oldest first."""
    import ray

    from placesnet.config import SCORE, checkpoint_score

    results = [
        {
            "version": 0,
            "checkpoint_dir_name": d.name,
            "metrics": {**meta["metrics"], SCORE: checkpoint_score(meta["metrics"])},
        }
        for _, d, meta in intact
    ]
    state = {
        "ray_version": ray.__version__,
        "checkpoint_results": results,
        "checkpoint_report_indices": [epoch for epoch, _, _ in intact],  # one report per epoch
        "latest_checkpoint_result": results[-1],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": intact[-1][0] + 1,
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    path = run_dir / SNAPSHOT
    if path.exists():
        path.replace(run_dir / f"{SNAPSHOT}.broken")
    tmp = run_dir / f".{SNAPSHOT}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def prepare_resume(run_dir: Path) -> ResumePlan:
    """Check the checkpoints of ``run_dir`` and leave it in a state Ray Train can resume from.

    Returns the plan (checkpoint, epoch, its config.json; notes for what was skipped). Raises one
    UserError when the run has checkpoints but none is intact.
    """
    plan = ResumePlan()
    snapshot = run_dir / SNAPSHOT
    dirs = sorted(d for d in run_dir.glob("checkpoint_*") if d.is_dir()) if run_dir.is_dir() else []
    if not dirs and not snapshot.exists():
        return plan
    intact, broken = [], []
    for d in dirs:
        problem = verify_checkpoint(d)
        if problem:
            broken.append((d, problem))
        else:
            meta = json.loads((d / META_FILE).read_text())
            intact.append((int(meta["epoch"]), d, meta))
    intact.sort(key=lambda t: (t[0], t[1].name))
    listed = _snapshot_names(snapshot) if snapshot.exists() else []
    existing = {d.name for d in dirs}
    missing = [name for name in (listed or []) if name not in existing]
    for d, problem in broken:
        target = d.with_name(f"broken-{d.name}")
        d.rename(target)
        plan.notes.append(f"skipping checkpoint {d.name}: {problem} (moved to {target.name})")
    for name in missing:
        plan.notes.append(f"skipping checkpoint {name}: listed by Ray but its directory is gone")
    if snapshot.exists() and listed is None:
        plan.notes.append(f"Ray's {SNAPSHOT} is unreadable: rebuilt from the intact checkpoints")
    if not intact:
        if broken or missing or listed is None:
            raise UserError(
                f"no intact checkpoint to resume in {run_dir} "
                f"({'; '.join(plan.notes) or 'none written yet'}); start again with a "
                "new --name, or delete the directory"
            )
        return plan  # a snapshot without checkpoints: Ray starts from scratch
    unlisted = [d.name for _, d, _ in intact if d.name not in (listed or [])]
    if listed is None or missing or broken or unlisted:
        # Also when intact checkpoints are missing from Ray's list: a run stopped (Ctrl-C, a
        # killed driver) after a checkpoint was committed but before Ray recorded it, or before
        # Ray wrote its snapshot at all; without them Ray would start again from scratch.
        if listed is not None:  # (an unreadable snapshot has its own note above)
            plan.notes += [
                f"adding checkpoint {name}: complete, but not yet recorded by Ray" for name in unlisted
            ]
        _write_snapshot(run_dir, intact)
    epoch, newest, _ = intact[-1]
    plan.checkpoint, plan.epoch = newest, epoch + 1
    plan.config = json.loads((newest / CONFIG_FILE).read_text())
    return plan
