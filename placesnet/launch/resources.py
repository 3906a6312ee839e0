"""Resource planning: how many workers of how many CPUs/GPUs, checked against the live cluster
before Ray is asked to place them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
import ray.train
import ray.train.torch

from placesnet.cli import worker_range
from placesnet.config import UserError


@dataclass(frozen=True)
class Resources:
    """How the job is laid out on the cluster."""

    num_workers: int  # an elastic run's most
    use_gpu: bool
    cpus_per_worker: float
    placement_strategy: str = "PACK"  # SPREAD / STRICT_SPREAD put workers on different nodes
    autoscale: bool = False  # the cluster adds nodes on demand: wait for them instead of ending
    # An elastic run (--num-workers MIN-MAX): as many workers as fit, at least min_workers; it
    # looks for room to grow every grow_check_s (Ray's elastic_resize_monitor_interval_s).
    min_workers: int | None = None
    grow_check_s: float = 60.0

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None

    @property
    def fewest(self) -> int:
        """The fewest workers the run can go on with."""
        return self.min_workers if self.elastic else self.num_workers

    def workers_label(self) -> str:
        """``2`` or, elastic, ``1-4``: as --num-workers takes it."""
        return f"{self.min_workers}-{self.num_workers}" if self.elastic else str(self.num_workers)

    def scaling_config(self) -> ray.train.ScalingConfig:
        return ray.train.ScalingConfig(
            num_workers=(self.min_workers, self.num_workers) if self.elastic else self.num_workers,
            elastic_resize_monitor_interval_s=self.grow_check_s,
            use_gpu=self.use_gpu,
            resources_per_worker={"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})},
            placement_strategy=self.placement_strategy,
        )


def alive_nodes() -> list[dict]:
    """Resources of every live node of the connected cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def node_addresses() -> dict[str, str]:
    """{node id: address} of every live node, to name the ones lost later (:func:`lost_nodes`)."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}


def lost_nodes(started: dict[str, str]) -> list[str]:
    """The nodes of ``started`` (see :func:`node_addresses`) that are dead now, as
    ``address (id prefix)``."""
    dead = {n["NodeID"] for n in ray.nodes() if not n.get("Alive")}
    return [f"{address} ({node_id[:8]})" for node_id, address in started.items() if node_id in dead]


def placeable(per_node: list[int], placement_strategy: str) -> int:
    """Workers that fit given each node's slots (:func:`worker_slots`): one per node with
    STRICT_SPREAD."""
    return sum(1 for k in per_node if k) if placement_strategy == "STRICT_SPREAD" else sum(per_node)


def workers_that_fit(res: Resources) -> int:
    """How many of ``res``'s workers the live nodes can hold (their totals, not what is free)."""
    return placeable(worker_slots(alive_nodes(), res.cpus_per_worker, res.use_gpu), res.placement_strategy)


def describe_cluster(res: Resources) -> str:
    """``1 node, 2 CPUs, 0 GPUs, which fit 1 worker``: the live cluster, for error lines."""
    nodes = alive_nodes()
    fits = workers_that_fit(res)
    return (
        f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {sum(n.get('CPU', 0) for n in nodes):g} CPUs, "
        f"{sum(n.get('GPU', 0) for n in nodes):g} GPUs, which fit {fits} worker{'s' if fits != 1 else ''}"
    )


def worker_slots(nodes: list[dict], cpus_per_worker: float, use_gpu: bool) -> list[int]:
    """How many workers of ``cpus_per_worker`` CPUs (+ 1 GPU each if ``use_gpu``) fit per node."""
    return [
        min(int(n.get("CPU", 0) // cpus_per_worker + 1e-9), int(n.get("GPU", 0)) if use_gpu else 10**9)
        for n in nodes
    ]


def plan_resources(
    num_workers: int | tuple[int, int] | None,
    gpu: bool | None,
    cpus_per_worker: float | None,
    placement_strategy: str = "PACK",
    autoscale: bool = False,
    ray_data: bool = False,
    grow_check_s: float = 60.0,
) -> Resources:
    """Pick GPU/CPU, the worker count (default: every GPU, or 2 on CPU) and CPUs per worker from
    what the connected cluster has, and refuse (with a UserError) a layout it can never place,
    instead of letting Ray wait for it forever. ``autoscale``: the cluster adds nodes on demand
    (cluster.yaml's GPU workers start at 0), so only the request itself is checked.

    ``num_workers`` as ``(min, max)``: an elastic run (see :class:`Resources`); CPUs are shared out
    as for ``max`` workers, and only ``min`` must fit now. Not with ``ray_data``, whose per-worker
    batches depend on the worker count.

    ``ray_data`` (--input ray-data): Ray Data tasks of one CPU each decode the images, on CPUs
    the workers do not hold. By default a GPU worker then holds one CPU (it only drives its GPU)
    and CPU workers share three quarters of the cluster's CPUs; a layout that leaves Ray Data no
    whole CPU is refused (it would wait forever)."""
    min_workers, num_workers = worker_range(num_workers, ray_data)
    nodes = alive_nodes()
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    total_cpus = sum(n.get("CPU", 0) for n in nodes)
    use_gpu = total_gpus > 0 if gpu is None else gpu
    if use_gpu and total_gpus == 0 and not autoscale:
        raise UserError(
            "--gpu asked for GPUs but the cluster has none; drop --gpu, use --cpu, or "
            "pass --autoscale if the cluster starts GPU nodes on demand"
        )
    if num_workers is None:
        if autoscale:
            raise UserError("--autoscale needs an explicit --num-workers")
        num_workers = int(total_gpus) if use_gpu else 2
    if cpus_per_worker is None and ray_data:
        decoders = max(1, total_cpus // 4)  # as the DataLoader path: one CPU in four decodes
        cpus_per_worker = (
            1.0 if use_gpu else max(0.5, math.floor((total_cpus - decoders) / num_workers * 2) / 2)
        )
    if cpus_per_worker is None:
        if use_gpu and total_gpus == 0:  # nodes yet to come: a modest data-loading share
            cpus_per_worker = 4.0
        elif use_gpu:  # a share of the CPUs next to each GPU, for data loading
            cpus_per_worker = float(max(1, min(8, int(total_cpus // max(total_gpus, 1)))))
        else:  # spread the cluster's CPUs over the workers
            cpus_per_worker = float(max(1, int(total_cpus // num_workers)))
    if cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    per_node = worker_slots(nodes, cpus_per_worker, use_gpu)
    fits = placeable(per_node, placement_strategy)
    fewest = num_workers if min_workers is None else min_workers
    if fits < fewest and not autoscale:
        what = f"{cpus_per_worker:g} CPU" + (" + 1 GPU" if use_gpu else "")
        least = "" if min_workers is None else f" (the least of {min_workers}-{num_workers})"
        raise UserError(
            f"cannot place {fewest} workers{least} of {what} each: the cluster ({len(nodes)} node(s), "
            f"{total_cpus:g} CPUs, {total_gpus:g} GPUs) fits only {fits}; lower --num-workers"
            + " (or pass --autoscale if the cluster adds nodes on demand)"
            + ("" if use_gpu else " or --cpus-per-worker")
            + (" (STRICT_SPREAD: one worker per node)" if placement_strategy == "STRICT_SPREAD" else "")
        )
    spare = total_cpus - num_workers * cpus_per_worker  # (never elastic: refused above)
    if ray_data and spare < 1 and not autoscale:
        raise UserError(
            f"--input ray-data decodes images in Ray Data tasks of 1 CPU each, but {num_workers} "
            f"workers of {cpus_per_worker:g} CPU leave {max(spare, 0):g} of the cluster's "
            f"{total_cpus:g} CPUs; lower --cpus-per-worker or --num-workers, add a (CPU-only) node, "
            "or use --input loader"
        )
    return Resources(
        num_workers, use_gpu, cpus_per_worker, placement_strategy, autoscale, min_workers, grow_check_s
    )
