"""Checks on the driver once Ray is up, before any worker starts: on a multi-node cluster every
node sees the storage path and the data. (That the storage is writable at all is checked before
Ray starts: placesnet/launch/driver.py.)"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import ray
import ray.train
import ray.train.torch

from placesnet.config import UserError


def _sees(path: str, token: str | None) -> bool:
    """On one node: is ``path`` there (and, with ``token``, does it hold it)?"""
    if token is None:
        return os.path.exists(path)
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def _blind_nodes(nodes: list[dict], path: str, token: str | None = None) -> list[str]:
    """The nodes on which :func:`_sees` is false, as "ip (node id)"."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            path, token
        )
        for n in nodes
    ]
    seen = ray.get(refs, timeout=120)
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]


def check_cluster_paths(storage_path: str, data_root: Path | None = None) -> None:
    """On a multi-node cluster, refuse paths that some nodes do not see, before any worker starts.

    A local ``storage_path`` (or ``file://``) must be one shared filesystem: the driver writes a
    marker there and every live node must read it back. Ray's own marker check does not catch this
    reliably (each worker creates its own marker, and only rank 0 writes checkpoints), so without
    this a run may write checkpoints to one node's disk and fail later with a missing file.
    ``data_root`` (a Places365 copy) must exist on every node. s3:// and gs:// are shared by
    definition and are not probed.

    (Seen with Ray 2.60 on a two-node cluster and a head-local path: Ray's check fires only when
    rank 0 lands on the other node, after an epoch, with a traceback; Ray then restarts the group,
    and if rank 0 lands on the head the run "succeeds" with files on one disk only.)
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    hint = (
        "on a multi-node cluster use s3://bucket/path, gs://bucket/path, or a shared filesystem "
        "(NFS, Lustre) mounted at the same path on every node"
    )
    if "://" not in storage_path or storage_path.startswith("file://"):
        local = Path(storage_path.removeprefix("file://"))
        token = secrets.token_hex(16)
        try:
            local.mkdir(parents=True, exist_ok=True)
            marker = local / f".placesnet-shared-check-{token[:8]}"
            marker.write_text(token)
        except OSError as e:
            raise UserError(f"cannot write to --storage-path {storage_path}: {e.strerror or e}") from None
        try:
            blind = _blind_nodes(nodes, str(marker), token)
        finally:
            marker.unlink(missing_ok=True)
        if blind:
            raise UserError(
                f"--storage-path {storage_path} is not shared: {len(blind)} of {len(nodes)} "
                f"nodes ({', '.join(blind)}) do not see files the driver writes there; {hint}"
            )
    if data_root is not None:
        blind = _blind_nodes(nodes, str(data_root))
        if blind:
            raise UserError(
                f"--data-root {data_root} is missing on {len(blind)} of {len(nodes)} nodes "
                f"({', '.join(blind)}): put Places365 on storage mounted at the same "
                "path on every node (docs/clusters.md, 'Shared storage')"
            )
