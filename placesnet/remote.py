"""Checkpoints on object storage (``s3://``, ``gs://``, any URI pyarrow opens that is not this
machine's filesystem), read through ``pyarrow.fs`` as Ray Train writes them.

:func:`locate` finds the checkpoint a URI names, as :func:`placesnet.checkpoint.resolve_checkpoint`
does for a local path (a checkpoint directory; a run directory: its summary.json's best, else its
best intact checkpoint by the scores in meta.json; a JSON naming ``best_checkpoint``;
``latest:URI``), reading only small JSON files. :func:`fetch` copies that checkpoint into this
machine's cache (``CACHE_DIR/checkpoints``) and verifies the copy's sizes and sha256, so each
process that loads it (a Serve replica, an evaluation worker) has it on its own node.

Credentials and endpoints come from the environment, as for Ray (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3-compatible store), or from the URI's
query (``s3://bucket/path?endpoint_override=host:port&scheme=http``): a URI found inside a file
of the store (summary.json's ``best_checkpoint``) is opened with that store's filesystem, so the
query holds for it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import secrets
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from pyarrow import fs as pafs

from placesnet.config import UserError, checkpoint_score

CACHE_SUBDIR = "checkpoints"


def is_remote(spec: str) -> bool:
    """A URI of storage other than this machine's filesystem (``file://`` is local)."""
    return "://" in spec and urlsplit(spec).scheme not in ("", "file")


@dataclass(frozen=True)
class Remote:
    """A path on a store: ``fs`` at ``path``, named for people as :attr:`uri`."""

    fs: pafs.FileSystem
    path: str
    scheme: str
    query: str = ""

    @property
    def uri(self) -> str:
        """``scheme://bucket/key``, with the query the store was opened with (an endpoint)."""
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def at(self, path: str) -> Remote:
        return replace(self, path=path.rstrip("/"))

    def child(self, *parts: str) -> Remote:
        return self.at(posixpath.join(self.path, *parts))

    def read(self) -> bytes | None:
        """The file's bytes, or None when it is not there."""
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as e:  # pyarrow says "Path does not exist" as a plain OSError on some stores
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            raise UserError(f"cannot read {self.uri}: {_first_line(e)}") from None

    def json(self) -> dict:
        raw = self.read()
        if raw is None:
            raise UserError(f"not found: {self.uri}")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{self.uri} is not valid JSON") from None
        if not isinstance(data, dict):
            raise UserError(f"{self.uri} is not a JSON object")
        return data

    def same_store(self, named: str) -> Remote:
        """``named`` (a URI written into a file of this store, e.g. summary.json's best_checkpoint),
        opened with this store's filesystem when it is on the same store; else on its own."""
        split = urlsplit(named)
        if split.scheme in (self.scheme, self.fs.type_name):
            return self.at(f"{split.netloc}{split.path}")
        if not is_remote(named):
            raise UserError(f"{self.uri} names {named}, a path on another machine, not on its store")
        return open_uri(named)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def open_uri(uri: str) -> Remote:
    """The store of ``uri`` (``pyarrow.fs.FileSystem.from_uri``, as Ray opens its storage_path);
    a URI it cannot open is one UserError line."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise UserError(f"cannot open {uri}: {_first_line(e)}") from None
    split = urlsplit(uri)
    return Remote(fs, path.rstrip("/"), split.scheme, split.query)


def locate(spec: str) -> Remote:
    """The checkpoint directory ``spec`` names (a URI, or ``latest:URI``), found by reading small
    JSON files only; UserError when there is none."""
    from placesnet.checkpoint_files import LATEST

    if spec.startswith(LATEST + ":"):
        return _locate(latest_run(spec[len(LATEST) + 1 :]))
    return _locate(open_uri(spec))


def _locate(r: Remote, hops: int = 0) -> Remote:
    from placesnet.checkpoint_files import META_FILE, MODEL_FILE

    kind = r.fs.get_file_info(r.path).type
    if kind == pafs.FileType.NotFound:
        raise UserError(f"checkpoint not found: {r.uri}")
    if kind == pafs.FileType.File:
        if not r.path.endswith(".json"):
            raise UserError(
                f"not a checkpoint: {r.uri} (give a checkpoint directory, a run directory "
                "or a summary/best .json file)"
            )
        best = r.json().get("best_checkpoint")
        if not best:
            raise UserError(f"{r.uri} names no best_checkpoint")
        if hops > 3:
            raise UserError(f"{r.uri}: best_checkpoint files name each other in a loop")
        return _locate(r.same_store(best), hops + 1)
    found = r.fs.get_file_info([posixpath.join(r.path, n) for n in (MODEL_FILE, META_FILE)])
    if any(info.type == pafs.FileType.File for info in found):
        return r
    return best_in_run(r)


def best_in_run(run: Remote) -> Remote:
    """The best checkpoint of a training run directory on a store: summary.json's when it is
    intact (sizes), else the best intact ``checkpoint_*`` by val top-1 (ties: the lower val loss)."""
    from placesnet.checkpoint_files import META_FILE, SUMMARY_FILE, verify_checkpoint

    summary = run.child(SUMMARY_FILE)
    if summary.read() is not None:
        best = summary.json().get("best_checkpoint")
        if best:
            named = run.same_store(best)
            if verify_checkpoint(named.path, named.fs, checksums=False) is None:
                return named
    scored = []
    for d in checkpoint_dirs(run.fs, run.path):
        if verify_checkpoint(d, run.fs, checksums=False) is None:
            meta = json.loads(run.at(d).child(META_FILE).read())
            scored.append((checkpoint_score(meta["metrics"]), posixpath.basename(d), d))
    if not scored:
        raise UserError(
            f"no checkpoint in {run.uri}: expected a checkpoint directory, a training run "
            "directory or a sweep's best.json"
        )
    return run.at(max(scored)[2])


def checkpoint_dirs(fs: pafs.FileSystem, run_dir: str) -> list[str]:
    """The ``checkpoint_*`` directories of a run (fs paths, sorted by name)."""
    entries = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    return sorted(
        e.path for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")
    )


def latest_run(storage: str) -> Remote:
    """The newest ``<storage>/<name>/summary.json`` (train.py) or ``best.json`` (sweep.py)."""
    from placesnet.checkpoint_files import SUMMARY_FILE

    root = open_uri(storage)
    entries = root.fs.get_file_info(pafs.FileSelector(root.path, allow_not_found=True))
    dirs = [e.path for e in entries if e.type == pafs.FileType.Directory]
    candidates = [posixpath.join(d, f) for d in dirs for f in (SUMMARY_FILE, "best.json")]
    found = [i for i in root.fs.get_file_info(candidates) if i.type == pafs.FileType.File] if dirs else []
    if not found:
        raise UserError(
            f"--checkpoint latest: no finished run (*/{SUMMARY_FILE} or */best.json) "
            f"under {root.uri}; give latest:STORAGE_PATH or a path"
        )
    return root.at(max(found, key=lambda i: (i.mtime, i.path)).path)


def cache_dir_for(checkpoint: Remote) -> Path:
    """Where :func:`fetch` keeps ``checkpoint`` on this machine:
    ``CACHE_DIR/checkpoints/<hash of its URI>/<run name>/<checkpoint name>``."""
    from placesnet.config import CACHE_DIR

    key = hashlib.sha1(checkpoint.uri.encode()).hexdigest()[:16]
    run_name = posixpath.basename(posixpath.dirname(checkpoint.path)) or "run"
    return CACHE_DIR / CACHE_SUBDIR / key / run_name / checkpoint.name


def fetch(checkpoint: Remote) -> Path:
    """``checkpoint`` (a checkpoint directory on a store) as a verified local copy: the cached one
    when its meta.json is the store's and its files match their sizes and sha256, else a fresh
    download (into a temporary name, renamed into place once verified; tried twice). UserError
    naming the URI when no intact copy can be made."""
    from placesnet.checkpoint_files import META_FILE, verify_checkpoint

    target = cache_dir_for(checkpoint)
    meta = checkpoint.child(META_FILE).read()
    if meta is None:
        raise UserError(f"not a checkpoint: {checkpoint.uri} has no {META_FILE}")
    cached = target / META_FILE
    if cached.is_file() and cached.read_bytes() == meta and verify_checkpoint(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    problem = ""
    for _ in range(2):  # a second try for a download torn by the network
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            pafs.copy_files(
                checkpoint.path,
                str(tmp),
                source_filesystem=checkpoint.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot download checkpoint {checkpoint.uri}: {_first_line(e)}") from None
        problem = verify_checkpoint(tmp)
        if problem is None:
            _move_into_place(tmp, target)
            return target
        shutil.rmtree(tmp, ignore_errors=True)
    raise UserError(f"corrupt checkpoint: {checkpoint.uri}: {problem} (downloaded twice)")


def _move_into_place(tmp: Path, target: Path) -> None:
    """``tmp`` renamed to ``target``; an old copy there is moved out of the way first. When another
    process (a second replica on this node) got there first with an intact copy, its copy stays."""
    from placesnet.checkpoint_files import verify_checkpoint

    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        try:
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    try:
        os.rename(tmp, target)
    except OSError:  # another process's copy arrived in between
        shutil.rmtree(tmp, ignore_errors=True)
        if verify_checkpoint(target) is not None:
            raise UserError(f"cannot place the checkpoint copy in {target}") from None
