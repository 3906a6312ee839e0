"""Make a run directory resumable before Ray Train opens it, on any storage.

Ray Train resumes from the newest checkpoint named in the run's
``checkpoint_manager_snapshot.json``. If that checkpoint is broken (a truncated ``model.pt``, a
garbage ``meta.json`` or ``config.json``) every restart and every rerun fails on it again, and a
deleted checkpoint directory stops Ray before any worker starts. :func:`prepare_resume` checks
every checkpoint of the run (:func:`checkpoint.verify_checkpoint`), sets the broken ones aside as
``broken-<name>`` (nothing is deleted), and when Ray's snapshot names a broken or missing one,
or lacks an intact one (a run stopped between writing a checkpoint and recording it), rewrites
the snapshot from the intact checkpoints, so the run resumes from the newest of them.

An intact checkpoint Ray did not record is adopted only when it is newer than every recorded one
(a run stopped before Ray recorded its last epoch). One of an epoch Ray has recorded, or older,
was written by an attempt that was lost (a node gone before the other ranks reported that epoch;
Ray trained the epoch again): it is set aside as ``lost-<name>``. The snapshot never names two
checkpoints of one epoch.

The snapshot format is Ray 2.60's (``ray.train.v2``'s ``_CheckpointManagerState``); the old one is
kept as ``checkpoint_manager_snapshot.json.broken``. Storage is read and written through pyarrow
(``pyarrow.fs``, as Ray opens it): this machine's filesystem, NFS, or object storage (s3://,
gs://), where a directory is set aside by copy and delete (there is no rename) and only the
checkpoint to resume from is checked against its sha256 (the others by size: no download of
every checkpoint's weights; the workers check the sha256 again after Ray downloads it).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath

from pyarrow import fs as pafs

from placesnet.checkpoint import CONFIG_FILE, META_FILE, verify_checkpoint
from placesnet.config import UserError

SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class ResumePlan:
    """What :func:`prepare_resume` found: the checkpoint a rerun resumes from (None: a new run;
    a Path on this machine's filesystem, else the path on the store)."""

    checkpoint: PurePath | None = None
    epoch: int = 0  # epochs that checkpoint has completed
    config: dict | None = None
    notes: list[str] = field(default_factory=list)  # one line per checkpoint set aside or added


@dataclass(frozen=True)
class _Checkpoint:
    path: str
    epoch: int  # 0-based, from meta.json
    meta: dict

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


class _Run:
    """The run directory ``path`` on ``fs``."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.fs, self.path = fs, path.rstrip("/") or "/"
        self.local = fs.type_name == "local"

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except OSError:  # FileNotFoundError, or a store's own "not found"
            if not self.exists(path):
                return None
            raise

    def write(self, path: str, data: bytes) -> None:
        """Atomically: a rename into place here, one PUT on a store."""
        if not self.local:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def set_aside(self, path: str, prefix: str) -> str:
        """``<run>/<name>`` renamed ``<run>/<prefix>-<name>``; by copy then delete on object
        storage, which has no directory rename. Returns the new name."""
        name = f"{prefix}-{posixpath.basename(path)}"
        target = self.join(name)
        if self.local:
            self.fs.move(path, target)
        else:
            pafs.copy_files(path, target, source_filesystem=self.fs, destination_filesystem=self.fs)
            self.fs.delete_dir(path)
        return name

    def checkpoint_dirs(self) -> list[str]:
        entries = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(
            e.path
            for e in entries
            if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")
        )


def _snapshot_names(raw: bytes) -> list[str] | None:
    """Checkpoint dir names in Ray's snapshot; None when it is unreadable."""
    try:
        state = json.loads(raw)
        return [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None


def _write_snapshot(run: _Run, intact: list[_Checkpoint]) -> None:
    """Ray's checkpoint-manager snapshot for the intact checkpoints, oldest first."""
    import ray

    from placesnet.config import SCORE, checkpoint_score

    results = [
        {
            "version": 0,
            "checkpoint_dir_name": c.name,
            "metrics": {**c.meta["metrics"], SCORE: checkpoint_score(c.meta["metrics"])},
        }
        for c in intact
    ]
    state = {
        "ray_version": ray.__version__,
        "checkpoint_results": results,
        "checkpoint_report_indices": [c.epoch for c in intact],  # one report per epoch
        "latest_checkpoint_result": results[-1],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": intact[-1].epoch + 1,
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    path = run.join(SNAPSHOT)
    if run.exists(path):
        run.fs.copy_file(path, f"{path}.broken")
    run.write(path, json.dumps(state, indent=2).encode())


def prepare_resume(run_dir: str | Path, filesystem: pafs.FileSystem | None = None) -> ResumePlan:
    """Check the checkpoints of ``run_dir`` and leave it in a state Ray Train can resume from.

    ``filesystem``: the pyarrow filesystem ``run_dir`` is a path on (a driver.Storage's; default:
    this machine's). Returns the plan (checkpoint, epoch, its config.json; a note per checkpoint
    set aside or added). Raises one UserError when the run has checkpoints but none is intact.
    """
    run = _Run(filesystem or pafs.LocalFileSystem(), str(run_dir))
    as_path = Path if filesystem is None else PurePosixPath
    plan = ResumePlan()
    snapshot = run.join(SNAPSHOT)
    dirs = run.checkpoint_dirs()
    raw = run.read(snapshot)
    if not dirs and raw is None:
        return plan
    listed = _snapshot_names(raw) if raw is not None else []
    existing = {posixpath.basename(d) for d in dirs}
    missing = [name for name in (listed or []) if name not in existing]

    # Sizes (and on this machine, sha256) of every checkpoint; on a store, sha256 below.
    intact, broken = [], []
    for d in dirs:
        problem = verify_checkpoint(d, run.fs, checksums=run.local)
        if problem:
            broken.append((d, problem))
        else:
            meta = json.loads(run.read(posixpath.join(d, META_FILE)))
            intact.append(_Checkpoint(d, int(meta["epoch"]), meta))
    keep, lost = _one_per_epoch(intact, set(listed or []))
    while keep and not run.local:  # the newest must be intact to the byte: it is resumed from
        problem = verify_checkpoint(keep[-1].path, run.fs, checksums=True)
        if problem is None:
            break
        broken.append((keep.pop().path, problem))

    for d, problem in broken:
        target = run.set_aside(d, "broken")
        plan.notes.append(f"skipping checkpoint {posixpath.basename(d)}: {problem} (moved to {target})")
    for name in missing:
        plan.notes.append(f"skipping checkpoint {name}: listed by Ray but its directory is gone")
    if raw is not None and listed is None:
        plan.notes.append(f"Ray's {SNAPSHOT} is unreadable: rebuilt from the intact checkpoints")
    for c, why in lost:
        target = run.set_aside(c.path, "lost")
        plan.notes.append(
            f"setting aside checkpoint {c.name}: epoch {c.epoch + 1} of a lost attempt ({why}): "
            f"moved to {target}"
        )
    if not keep:
        if broken or missing or listed is None:
            raise UserError(
                f"no intact checkpoint to resume in {run_dir} "
                f"({'; '.join(plan.notes) or 'none written yet'}); start again with a "
                "new --name, or delete the directory"
            )
        return plan  # a snapshot without checkpoints: Ray starts from scratch
    if listed is not None:
        plan.notes += [
            f"adding checkpoint {c.name}: complete, but not yet recorded by Ray"
            for c in keep
            if c.name not in listed
        ]
    if listed is None or {c.name for c in keep} != set(listed):
        # Also when intact checkpoints are missing from Ray's list: a run stopped (Ctrl-C, a
        # killed driver) after a checkpoint was committed but before Ray recorded it, or before
        # Ray wrote its snapshot at all; without them Ray would start again from scratch.
        _write_snapshot(run, keep)
    newest = keep[-1]
    plan.checkpoint, plan.epoch = as_path(newest.path), newest.epoch + 1
    plan.config = json.loads(run.read(posixpath.join(newest.path, CONFIG_FILE)))
    return plan


def _one_per_epoch(intact: list[_Checkpoint], listed: set[str]) -> tuple[list[_Checkpoint], list[tuple]]:
    """The checkpoints to resume with, oldest first, one per epoch; and the lost attempts' ones,
    each with why (a few words).

    Ray's recorded checkpoints are the run's record. An unrecorded one is adopted only when its
    epoch is newer than every recorded one's (a run stopped before Ray recorded it); else a lost
    attempt wrote it. Of two unrecorded ones of one epoch (no snapshot to tell), the later one is
    kept: the retry that went on from it."""
    newest_recorded = max((c.epoch for c in intact if c.name in listed), default=-1)
    by_epoch: dict[int, _Checkpoint] = {}
    lost = []
    for c in sorted(intact, key=lambda c: (c.name in listed, c.name)):  # the preferred one last
        if c.name not in listed and c.epoch <= newest_recorded:
            lost.append((c, f"Ray recorded the run up to epoch {newest_recorded + 1}"))
            continue
        if c.epoch in by_epoch:
            lost.append((by_epoch[c.epoch], f"the run's epoch {c.epoch + 1} is {c.name}"))
        by_epoch[c.epoch] = c
    keep = sorted(by_epoch.values(), key=lambda c: (c.epoch, c.name))
    return keep, sorted(lost, key=lambda t: t[0].name)
