"""The driver's setup shared by rayjobs/train.py and tuning/sweep.py, in the order it runs.

1. :func:`open_storage`: --storage-path, a local path or a URI (``file:///x``, ``s3://...``),
   normalised once into a :class:`Storage`: what Ray's ``RunConfig(storage_path=...)`` gets, the
   pyarrow filesystem Ray itself opens it with (everything the driver reads or writes there goes
   through it), labels for messages and paths that ``serve run`` can read.
2. :func:`check_name`: --name is one plain directory name under the storage.
3. :func:`check_writable`: the storage takes a file, before the data check and Ray start.
4. The data: resolved, fetched with --download and checked on the driver, before any worker starts.
5. :meth:`Driver.resume`: a rerun's run directory made resumable (placesnet/launch/resume.py).
6. :meth:`Driver.check_cluster`: once Ray is up, every node sees the storage and the data.

``setup_driver`` runs 1-4 and returns the :class:`Driver`; the scripts keep what is their own
(resource plans, the trainer or the tuner, what they print at the end).
"""

from __future__ import annotations

import posixpath
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from pyarrow import fs as pafs

from placesnet.config import TrainConfig, UserError

if TYPE_CHECKING:
    from placesnet.launch.resume import ResumePlan

SERVE = "serve run --name placesnet serving.app:build_app"  # the name and prefix of serving/config.yaml


def _join(root: str, *parts: str) -> str:
    """``root/parts`` for a local path or a URI (a URI's query, such as ``?region=...``, stays last)."""
    if "://" not in root:
        return posixpath.join(root, *parts)
    split = urlsplit(root)
    return urlunsplit(split._replace(path=posixpath.join(split.path or "/", *parts)))


@dataclass(frozen=True)
class Storage:
    """Where runs and sweeps are kept (see :func:`open_storage`).

    ``storage_path`` is what Ray's ``RunConfig(storage_path=...)`` gets: an absolute local path
    for storage on this machine (a local path or ``file://``), else the URI (``s3://...``).
    ``uri`` is how messages name it: the local path, or the URI as given (``file://`` kept).
    ``filesystem`` and ``base`` are how Ray opens it (``pyarrow.fs.FileSystem.from_uri``): a file
    of the storage is ``filesystem`` at :meth:`fs_path`.
    """

    storage_path: str
    uri: str
    filesystem: pafs.FileSystem
    base: str

    @property
    def is_local(self) -> bool:
        """On this machine's filesystem (a local path or ``file://``): plain paths work."""
        return self.filesystem.type_name == "local"

    def path(self, *parts: str) -> str:
        """``<storage>/<parts>`` as Ray and Tune take it (RunConfig, ``Tuner.restore``)."""
        return _join(self.storage_path, *parts)

    def label(self, *parts: str) -> str:
        """``<storage>/<parts>`` as messages name it (see :attr:`uri`)."""
        return _join(self.uri, *parts)

    def fs_path(self, *parts: str) -> str:
        """``<storage>/<parts>`` on :attr:`filesystem`."""
        return posixpath.join(self.base, *parts)

    def readable(self, fs_path: str) -> str:
        """A file of the storage named for tools outside Ray (``serve run``, TensorBoard, pandas):
        its absolute local path when the storage is on this machine, else its URI."""
        if self.is_local:
            return fs_path
        return self.label(posixpath.relpath(fs_path, self.base))

    def local_path(self, *parts: str) -> Path | None:
        """``<storage>/<parts>`` as a local path, or None for remote storage (s3://, gs://)."""
        return Path(self.fs_path(*parts)) if self.is_local else None

    def write(self, data: bytes, *parts: str) -> str:
        """Write ``data`` to ``<storage>/<parts>`` (its directory made first); returns its fs path."""
        path = self.fs_path(*parts)
        self.filesystem.create_dir(posixpath.dirname(path), recursive=True)
        with self.filesystem.open_output_stream(path) as f:
            f.write(data)
        return path


def open_storage(storage_path: str) -> Storage:
    """--storage-path normalised once: a local path becomes absolute (``~`` expanded, symlinks
    resolved), and so does the path of a ``file://`` URI; a remote URI (``s3://bucket/path``,
    ``gs://...``) is opened with the filesystem Ray opens it with. A URI pyarrow cannot open is
    one UserError line."""
    if "://" not in storage_path:
        local = str(Path(storage_path).expanduser().resolve())
        return Storage(local, local, pafs.LocalFileSystem(), local)
    try:
        filesystem, base = pafs.FileSystem.from_uri(storage_path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"--storage-path {storage_path} is not a path or URI Ray can open ({reason}); give a "
            "local path, file:///absolute/path, s3://bucket/path or gs://bucket/path"
        ) from None
    if filesystem.type_name == "local":
        # Ray gets the plain path: the same directory, and code that joins paths to it (a
        # worker's marker files, Serve's checkpoint=) sees a path rather than a URI.
        local = str(Path(base).resolve())
        return Storage(local, f"file://{local}", filesystem, local)
    uri = storage_path.rstrip("/")
    return Storage(uri, uri, filesystem, base.rstrip("/"))


def check_name(name: str) -> str:
    """--name is a run (or sweep) directory directly under the storage: one plain name, so nothing
    is written outside --storage-path."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise UserError(f"--name must be a plain directory name, got {name!r}")
    return name


def check_writable(storage: Storage) -> None:
    """Write and delete a probe file under the storage from the driver, so an unwritable place
    fails in one line before anything starts, on any cluster size. (On clusters of 2+ nodes
    ``preflight.check_cluster_paths`` also checks that every node sees it.)"""
    try:
        storage.filesystem.create_dir(storage.base, recursive=True)
        probe = storage.write(b"ok", f".placesnet-write-check-{secrets.token_hex(4)}")
        storage.filesystem.delete_file(probe)
    except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot write to --storage-path {storage.uri}: {reason}") from None


def serve_command(storage: Storage, target: str, checkpoint: str) -> str:
    """The command that serves a result: ``target`` (a run dir or a best.json, as a fs path), a
    local path on local storage, else its URI: the app builder and every replica fetch the
    checkpoint from there (placesnet/remote.py), with the AWS_* variables of the shell and the
    nodes. (``checkpoint``: the best checkpoint, kept for callers.)"""
    return f"{SERVE} checkpoint={storage.readable(target)}"


def tensorboard_command(storage: Storage, name: str) -> str:
    """TensorBoard on the run's ``tensorboard/``: on remote storage, which TensorBoard cannot read
    without an S3 plugin, after copying it to this machine."""
    logdir = storage.fs_path(name, "tensorboard")
    if storage.is_local:
        return f"tensorboard --logdir {logdir}"
    local = f"{name}-tensorboard"
    return (
        f"mkdir -p {local} && "
        f"python -c \"import pyarrow.fs as f; f.copy_files('{storage.readable(logdir)}', '{local}')\" "
        f"&& tensorboard --logdir {local}"
    )


@dataclass(frozen=True)
class Driver:
    """A checked setup: the config (data root resolved, --download done), where outputs go, and
    the opened splits."""

    cfg: TrainConfig
    storage: Storage
    name: str
    root: Path
    train_ds: object
    val_ds: object

    @property
    def label(self) -> str:
        """The run's (or sweep's) directory, for messages."""
        return self.storage.label(self.name)

    def resume(self) -> ResumePlan:
        """A rerun: the run's checkpoints checked and Ray's snapshot repaired, on any storage
        (see placesnet/launch/resume.py), its notes printed."""
        from placesnet.launch.resume import prepare_resume

        run_dir = self.storage.local_path(self.name)
        if run_dir is None:  # object storage: through the filesystem Ray opens it with
            plan = prepare_resume(self.storage.fs_path(self.name), self.storage.filesystem)
        else:
            plan = prepare_resume(run_dir)
        for note in plan.notes:
            print(note)
        return plan

    def check_cluster(self) -> None:
        """Once Ray is up (``placesnet.cli.ray_init``): refuse a storage path or Places365 copy
        that some node of the cluster does not see, before any worker starts."""
        from placesnet.launch.preflight import check_cluster_paths

        check_cluster_paths(self.storage.uri, self.root if self.cfg.dataset == "places365" else None)


def setup_driver(cfg: TrainConfig, *, storage_path: str, name: str, check_files: bool = True) -> Driver:
    """Everything train.py and sweep.py check before Ray starts, cheapest first: the storage path
    and --name (nothing written yet), the storage writable, then the data resolved and checked
    (layout errors, bad list lines, missing or empty images surface here, not on a worker).
    Prints the data check and a ``data: ...`` line."""
    from placesnet.data.places import describe, open_split, resolve_data_root
    from placesnet.data.validate import fetch_and_check

    storage = open_storage(storage_path)
    name = check_name(name)
    check_writable(storage)
    root = resolve_data_root(cfg)
    if cfg.dataset == "places365":
        cfg = cfg.replace(data_root=str(root))
    cfg = fetch_and_check(cfg, root, files=check_files)
    train_ds, val_ds = open_split(cfg, "train", root), open_split(cfg, "val", root)
    print(f"data: train {describe(train_ds)}; val {len(val_ds)} images")
    return Driver(cfg, storage, name, root, train_ds, val_ds)
