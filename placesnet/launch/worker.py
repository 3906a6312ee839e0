"""What runs inside each Ray Train worker: the DDP training loop (report every epoch, resume
from a checkpoint, fault injection for tests) and distributed evaluation.

Only the workers import this module (through :func:`trainer.train_loop_per_worker`), so the
modules Ray's Train controller imports (trainer.py, outputs.py) stay free of torchvision, pandas
and matplotlib: each run starts seconds sooner (tests/test_layout.py checks).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch

from placesnet.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_train_state,
    read_meta,
    save_checkpoint,
    verify_checkpoint,
)
from placesnet.config import SCORE, TrainConfig, UserError, checkpoint_score
from placesnet.data.loaders import LoaderPlan, make_loaders
from placesnet.data.places import BadImages, class_names, open_split, resolve_data_root
from placesnet.data.views import single_view
from placesnet.evaluation import evaluate_checkpoint
from placesnet.finetune import load_init
from placesnet.launch.logs import echo
from placesnet.launch.outputs import set_aside_lost_checkpoints
from placesnet.model import build_model, freeze_backbone
from placesnet.train import engine
from placesnet.train.step import StepSettings


def _maybe_crash(loop_config: dict, epoch: int, rank: int) -> None:
    """Fault injection for --fail-after-epoch: rank 0's process dies once, after ``epoch``.

    It first waits until Ray has committed the epoch's checkpoint; a real crash right after
    report() may instead resume from the epoch before, which is Ray's contract.
    """
    marker = loop_config.get("fail_marker")
    if rank != 0 or loop_config.get("fail_after_epoch") != epoch or not marker:
        return
    # In the run dir through Ray's own filesystem for it, so local, NFS and s3:// alike.
    storage = ray.train.get_context().get_storage()
    fs, path = storage.storage_filesystem, posixpath.join(storage.experiment_fs_path, marker)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return
    ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
    with fs.open_output_stream(path) as f:
        f.write(f"crashed after epoch {epoch}\n".encode())
    echo(f"[fault injection] worker exits after epoch {epoch}")
    os._exit(1)


def _maybe_diverge(loop_config: dict, epoch: int, model):
    """Fault injection for --diverge-at-epoch: NaN inputs, so a NaN loss, during ``epoch``.
    Returns the hook to remove after the epoch, or None."""
    if loop_config.get("diverge_at_epoch") != epoch:
        return None
    echo(f"[fault injection] the loss becomes NaN in epoch {epoch}")
    return model.register_forward_pre_hook(lambda module, args: (args[0] * float("nan"), *args[1:]))


def data_root_here(cfg: TrainConfig, data_root: str) -> Path:
    """The driver's resolved data root, as seen on this worker's node: a node that lacks the
    generated sample data generates the same (seeded) copy."""
    root = Path(data_root)
    if cfg.dataset == "sample" and not (root / "places365_val.txt").is_file():
        root = resolve_data_root(cfg)
    return root


def train_worker(loop_config: dict) -> dict | None:
    """Ray Train's per-worker function: DDP-train ``loop_config["config"]``, report every epoch.

    Returns ``{"diverged": message}`` if the loss became NaN or infinite (see :func:`diverged`).

    ``loop_config`` holds the TrainConfig as a dict, the absolute ``data_root`` resolved by the
    driver and ``cpus_per_worker``; all else comes from the config.
    """
    cfg = TrainConfig.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    ray_data = cfg.input == "ray-data"  # Ray Data tasks decode: no DataLoader processes here
    plan = LoaderPlan.for_worker(
        loop_config["cpus_per_worker"], device.type == "cuda", 0 if ray_data else cfg.loader_workers
    )
    if device.type == "cpu":
        torch.set_num_threads(plan.threads)
    log = echo if rank == 0 else None
    echo(f"rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()} ({device})")

    # --- data: each worker reads its shard; val is sharded without padding for exact metrics ---
    root = data_root_here(cfg, loop_config["data_root"])
    # The model's own view of an image (an imported model's resize and crop, placesnet/data/views.py)
    # for val and, without --augment, for training: val top-1 is then what evaluate.py reports.
    view = single_view(cfg)
    train_ds = open_split(cfg, "train", root, transform=None if cfg.augment else view)
    val_ds = open_split(cfg, "val", root, transform=view)
    classes = class_names(train_ds)

    def warn(message: str) -> None:
        echo(f"[rank {rank}] {message}")

    bad_train, bad_val = BadImages(cfg.bad_images, train_ds, warn), BadImages(cfg.bad_images, val_ds, warn)
    if ray_data:
        from placesnet.data.raydata import worker_inputs

        train_loader, val_loader = worker_inputs(cfg, world, len(train_ds), plan.pin_memory)
        set_epoch = train_loader.set_epoch
    else:
        train_loader, val_loader, set_epoch = _loaders(cfg, train_ds, val_ds, rank, world, plan, device, log)

    # --- model (from --init-from's weights, unless the run resumes), optimiser, precision ---
    settings = StepSettings.from_config(cfg, device)  # AMP, channels_last, label smoothing, clipping
    checkpoint = ray.train.get_checkpoint()
    net, source = build_model(cfg, len(classes)), None  # source: where the weights came from
    if cfg.init_from and not checkpoint:  # a resumed run goes on from its own checkpoint
        source, line = load_init(net, cfg.init_from, classes)
        if log:
            log(line)
    if cfg.freeze_backbone:  # before DDP, which syncs only what requires gradients
        freeze_backbone(net)
    model = ray.train.torch.prepare_model(settings.prepare_model(net))
    if cfg.compile:  # in place, so state_dict keys (and checkpoints) stay those of the plain model
        model.compile()
    optimizer, scheduler, scaler = engine.training_state(model, cfg, settings, len(train_loader), device)

    # --- resume: after a worker failure, or when the same run is started again ---
    start_epoch, history = 0, []
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            problem = verify_checkpoint(ckpt_dir)
            if problem:  # a UserError: Ray does not restart on it (see StopOnUserErrors)
                raise UserError(
                    f"cannot resume from {checkpoint.path}: {problem}; run the same "
                    "command again to resume from the newest intact checkpoint"
                )
            getattr(model, "module", model).load_state_dict(load_model_state(ckpt_dir, device))
            state = load_train_state(ckpt_dir, device)
            optimizer.load_state_dict(state["optimizer"])
            if state.get("schedule_unit") == "step":
                scheduler.load_state_dict(state["scheduler"])
            else:  # a checkpoint from before per-step schedules: continue at the epoch boundary
                _move_scheduler(scheduler, (read_meta(ckpt_dir)["epoch"] + 1) * len(train_loader))
            if scaler and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            meta = read_meta(ckpt_dir)
            start_epoch, history, source = meta["epoch"] + 1, meta["history"], meta.get("source")
        if log:
            log(f"resuming from {checkpoint.path} at epoch {start_epoch + 1}/{cfg.epochs}")
    if rank == 0:  # checkpoints newer than Ray's were written by an attempt lost before Ray recorded them
        storage = ctx.get_storage()
        for line in set_aside_lost_checkpoints(
            storage.storage_filesystem,
            storage.experiment_fs_path,
            keep=posixpath.basename(checkpoint.path) if checkpoint else None,
            epochs_done=start_epoch,
        ):
            echo(line)

    steps = len(train_loader)
    # Progress inside long epochs (a Places365 epoch is 1.8 M images); short ones need none.
    log_every = cfg.log_every or (steps // 10 if steps >= 100 else 0)
    for epoch in range(start_epoch, cfg.epochs):
        set_epoch(epoch)  # the same permutation on every rank, a new one each epoch
        t0 = time.perf_counter()
        injected = _maybe_diverge(loop_config, epoch + 1, model)
        try:
            train = engine.train_one_epoch(
                model,
                train_loader,
                optimizer,
                device,
                settings=settings,
                scaler=scaler,
                log_every=log_every,
                log=log,
                epoch=epoch + 1,
                scheduler=scheduler,
                rise_warning=engine.RISE_WARNING if epoch == 0 else 0.0,
                bad_images=bad_train,
            )
        except engine.TrainingDiverged as e:
            # Every rank stops at the same step. Returning instead of raising ends the run without
            # Ray's restarts, which would only diverge again from the same checkpoint.
            if log:
                log(str(e))
            return {"diverged": str(e)}
        finally:
            if injected is not None:
                injected.remove()
        for key in ("first_step_loss", "peak_step_loss"):  # for the rise warning, not metrics.csv
            train.pop(key)
        # The module inside DDP: DDP's forward may broadcast buffers, a collective that would hang
        # when ranks evaluate different numbers of batches (exact sharding, no padding). So the
        # checkpoint's buffers (rank 0's) are broadcast once, here.
        engine.broadcast_buffers(model)
        val = engine.evaluate(
            getattr(model, "module", model),
            val_loader,
            device,
            num_classes=len(classes),
            amp_dtype=settings.amp_dtype,
            channels_last=settings.channels_last,
            bad_images=bad_val,
        )
        train["skipped_images"] += val.pop("val_skipped")  # --bad-images skip; 0 otherwise
        metrics = {
            "epoch": epoch + 1,
            **train,
            **val,
            "epoch_time_s": time.perf_counter() - t0,
            "num_workers": world,
        }
        history = [*history, metrics]
        if log:
            log(
                f"epoch {epoch + 1}/{cfg.epochs} train_loss {train['train_loss']:.4f} "
                f"train_top1 {train['train_top1']:.4f} val_loss {val['val_loss']:.4f} "
                f"val_top1 {val['val_top1']:.4f} val_top5 {val['val_top5']:.4f} "
                f"{train['images_per_s']:.0f} img/s {metrics['epoch_time_s']:.1f}s"
            )
        # Every rank must call report (it is a barrier); only rank 0 writes a checkpoint.
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(
                    tmp,
                    model=model,
                    config=cfg,
                    classes=classes,
                    epoch=epoch,
                    metrics=metrics,
                    history=history,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    source=source,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, SCORE: checkpoint_score(metrics)}, checkpoint=ckpt)
        _maybe_crash(loop_config, epoch + 1, rank)


def decode_on_gpu(cfg: TrainConfig, device: torch.device, train_ds) -> bool:
    """--decode: gpu, or auto on a CUDA worker whose training files are JPEGs, unless the model
    has its own view of an image (``preprocess``), which only the CPU path applies."""
    if cfg.decode == "cpu" or device.type != "cuda" or cfg.preprocess is not None:
        return False
    if cfg.decode == "gpu":
        return True
    from placesnet.data.gpudecode import JPEG_MAGIC

    with open(train_ds.imgs[0][0], "rb") as f:
        return f.read(3) == JPEG_MAGIC


def _loaders(
    cfg: TrainConfig,
    train_ds,
    val_ds,
    rank: int,
    world: int,
    plan: LoaderPlan,
    device: torch.device,
    log=None,
):
    """--input loader: this worker's train and val batches, and the train sampler's set_epoch."""
    gpu = decode_on_gpu(cfg, device, train_ds)  # loader processes read bytes; nvJPEG decodes here
    if gpu and log:
        log("--decode gpu: loader processes read the files, nvJPEG decodes each batch on the GPU")
    train_loader, val_loader, sampler = make_loaders(
        cfg, train_ds, val_ds, rank, world, plan.kwargs(), device if gpu else None, log
    )
    if not gpu:  # batches to the device (DeviceDecode's are there already); sampler already set
        train_loader = ray.train.torch.prepare_data_loader(train_loader, add_dist_sampler=False)
        val_loader = ray.train.torch.prepare_data_loader(val_loader, add_dist_sampler=False)
    return train_loader, val_loader, sampler.set_epoch


def _move_scheduler(scheduler, step: int) -> None:
    """Set a per-step scheduler (and its optimizer's lr) to optimizer step ``step``."""
    scheduler.last_epoch = step
    for group, base, factor in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
    ):
        group["lr"] = base * factor(step)


def eval_worker(loop_config: dict) -> dict | None:
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    plan = LoaderPlan.for_worker(loop_config["cpus_per_worker"], device.type == "cuda")
    if device.type == "cpu":
        torch.set_num_threads(plan.threads)
    loaded = load_checkpoint(loop_config["checkpoint"], device)
    loaded.config = loaded.config.replace(skip_verify=loop_config["skip_verify"])
    result = evaluate_checkpoint(
        loaded,
        Path(loop_config["data_root"]),
        device,
        split=loop_config["split"],
        batch_size=loop_config["batch_size"],
        loader_workers=plan.workers,
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        mistakes=loop_config.get("mistakes", 0),
        ten_crop=loop_config.get("ten_crop", False),
    )
    if ctx.get_world_rank() != 0:
        return None
    result["confusion"] = result["confusion"].tolist()  # Ray refuses to return tensors
    return result
