"""The files of a checkpoint directory and their check, and nothing else: what
:mod:`placesnet.checkpoint` writes and loads, and what :mod:`placesnet.remote` verifies after a
copy from object storage. checkpoint imports remote (to fetch); both import this module, so
remote never imports checkpoint back."""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING

from placesnet.config import UserError

if TYPE_CHECKING:
    from pyarrow import fs as pafs

FORMAT = "placesnet-checkpoint/1"
MODEL_FILE, STATE_FILE, CONFIG_FILE, META_FILE = "model.pt", "train_state.pt", "config.json", "meta.json"
SUMMARY_FILE = "summary.json"
LATEST = "latest"  # a checkpoint spec: the newest finished run (checkpoint.resolve_checkpoint)


def is_latest(spec: str) -> bool:
    """``latest`` or ``latest:STORAGE_PATH``: a checkpoint to resolve, not a path."""
    return spec == LATEST or spec.startswith(LATEST + ":")


def model_fingerprint(meta: dict) -> str | None:
    """The first 12 hex digits of model.pt's sha256 in a checkpoint's meta.json (None for a
    checkpoint older than checksums): tells checkpoints apart without naming their paths."""
    sha = meta.get("files", {}).get(MODEL_FILE, {}).get("sha256")
    return sha[:12] if sha else None


def _fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _sha256(filesystem: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(
    directory: str | Path, filesystem: pafs.FileSystem | None = None, checksums: bool = True
) -> str | None:
    """What is wrong with a checkpoint directory, or None when it is complete and intact.

    meta.json must parse and name this format; each file it lists must have its size and sha256
    (checkpoints from before 2026-11-28 list none: their files must load instead). ``filesystem``:
    a pyarrow filesystem the directory is on (default: this machine's), e.g. Ray's storage on
    s3://; ``checksums=False`` checks sizes only (no download of the weights).
    """
    from pyarrow import fs as pafs

    local = filesystem is None or filesystem.type_name == "local"
    fs = filesystem or pafs.LocalFileSystem()
    path = str(Path(directory).resolve()) if filesystem is None else str(directory)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return "the directory is missing"
    try:
        with fs.open_input_stream(posixpath.join(path, META_FILE)) as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        return f"no {META_FILE} (an unfinished write?)"
    except (ValueError, UnicodeDecodeError):
        return f"{META_FILE} is not valid JSON"
    except OSError:
        if fs.get_file_info(posixpath.join(path, META_FILE)).type == pafs.FileType.NotFound:
            return f"no {META_FILE} (an unfinished write?)"
        return f"{META_FILE} cannot be read"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"{META_FILE} does not describe a {FORMAT} checkpoint"
    files = meta.get("files")
    if files is None:  # an older checkpoint: no checksums, so load what it holds
        if not local:  # (on a store: loaded once fetched)
            return None
        try:
            json.loads((Path(path) / CONFIG_FILE).read_text())
            for name in (MODEL_FILE, STATE_FILE):
                _torch_load(Path(path) / name)
        except (OSError, ValueError, UnicodeDecodeError, UserError) as e:
            return str(e)
        return None
    infos = fs.get_file_info([posixpath.join(path, name) for name in files])
    for (name, expected), info in zip(files.items(), infos):
        if info.type != pafs.FileType.File:
            return f"{name} is missing"
        if info.size != expected.get("bytes"):
            return f"{name} has {info.size} bytes, {expected.get('bytes')} were written (truncated?)"
        if checksums and _sha256(fs, info.path) != expected.get("sha256"):
            return f"{name} does not match its sha256 (changed or corrupted since it was written)"
    return None


def _torch_load(path: Path, device="cpu"):
    import torch

    if not path.is_file():
        raise UserError(f"not a checkpoint: {path.parent} has no {path.name}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, ...
        raise UserError(
            f"corrupt checkpoint: cannot load {path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no details'})"
        ) from None
