"""GPU fast path: DeepCNN training images/s at 256 px for fp32 vs AMP vs AMP + channels_last
(+ torch.compile), the epoch loop's device-side loss sums against reading the loss on the host
after every step (as it did before), the input pipeline's images/s with all of this machine's
CPUs, and end to end: the same training step fed real JPEGs by each input mode of train.py
(--decode cpu, --decode gpu, and with --ray-data --input ray-data), as a ratio of the synthetic
row (issue #11's goal on an H100/H200 with compile: >= 0.9x).

    python benchmarks/gpu_train.py                    # on a CUDA machine; needs torch + torchvision, not Ray
    python benchmarks/gpu_train.py --batch-size 512 --steps 50
    python benchmarks/gpu_train.py --ray-data         # + the Ray Data end-to-end row (needs Ray)
    python benchmarks/gpu_train.py --device cpu --image-size 32 --batch-size 8 --steps 2 --no-input
                                                      # a smoke run of the same code without a GPU

Plain torch and the project's own model and epoch code (``engine.train_one_epoch``, the same
function Ray Train workers run). Training rows use synthetic uint8 batches already on the device,
so they measure the GPU alone; the input rows say whether the CPUs can feed it. Ratios are against
the fp32 row (training) and the workshop pipeline (input), measured in the same invocation.
Without CUDA (and without --device cpu) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from common import print_table, ratio, sample_root

from placesnet.config import TrainConfig
from placesnet.model import build_model
from placesnet.train import engine, optim
from placesnet.train.step import StepSettings, amp_dtype_for

SYNCED = "amp + channels_last, host sync every step"
MODES = [  # name, amp, channels_last, compile, check_every (0: the epoch loop's default)
    ("fp32", False, False, False, 0),
    ("amp", True, False, False, 0),
    ("amp + channels_last", True, True, False, 0),
    # the epoch loop before 2026-11-28: the host read (and all-reduced) the loss after every step
    (SYNCED, True, True, False, 1),
    ("amp + channels_last + compile", True, True, True, 0),
]


def train_rate(
    cfg: TrainConfig,
    device: torch.device,
    batch_size: int,
    steps: int,
    amp: bool,
    channels_last: bool,
    compile: bool,
    check_every: int = 0,
    loader=None,
) -> float:
    """Steady-state training images/s: one untimed epoch of ``steps`` (compiles, warms cuDNN),
    then one timed epoch. ``loader``: real batches instead of synthetic ones on the device (its
    untimed epoch also starts its processes and warms the page cache)."""
    torch.manual_seed(0)
    # a CPU smoke run autocasts to bf16 where a GPU would (amp_dtype_for is None on the CPU)
    amp_dtype = amp_dtype_for(device, amp) if device.type == "cuda" else (torch.bfloat16 if amp else None)
    settings = StepSettings(amp_dtype=amp_dtype, channels_last=channels_last)
    model = settings.prepare_model(build_model(cfg, 365).to(device))
    if compile:
        model.compile()
    batches = [
        (
            torch.randint(
                0, 256, (batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=device
            ),
            torch.randint(0, 365, (batch_size,), device=device),
        )
        for _ in range(4)
    ]
    loader = loader if loader is not None else [batches[i % len(batches)] for i in range(steps)]
    optimizer = optim.build_optimizer(model, 0.01, 0.9, 5e-4, device)
    kwargs = dict(settings=settings, scaler=settings.make_scaler(device), check_every=check_every)
    engine.train_one_epoch(model, loader, optimizer, device, **kwargs)
    return engine.train_one_epoch(model, loader, optimizer, device, **kwargs)["images_per_s"]


def real_loaders(
    root, cfg: TrainConfig, device: torch.device, batch_size: int, cpus: int, ray_data: bool
) -> dict:
    """train.py's input modes for one worker with all ``cpus``, over the JPEGs under ``root``:
    the DataLoader with CPU decoding, the DataLoader of packed bytes decoded on ``device``
    (nvJPEG on a GPU; the same code decodes on the CPU in a smoke run), Ray Data."""
    from placesnet.data.loaders import LoaderPlan, make_loaders
    from placesnet.data.places import open_split

    cfg = cfg.replace(dataset="places365", data_root=str(root), skip_verify=True, batch_size=batch_size)
    ds = open_split(cfg, "train", root)
    kw = LoaderPlan(cpus, 1, device.type == "cuda").kwargs()
    loaders = {
        f"real JPEGs: loader, --decode {mode}": make_loaders(cfg, ds, ds, 0, 1, kw, decode)[0]
        for mode, decode in (("cpu", None), ("gpu", device))
    }
    if ray_data:
        from input import RayDataInput

        from placesnet.data.raydata import ShardBatches

        pipeline = RayDataInput(root, cfg.image_size, len(ds), cpus)
        loaders["real JPEGs: --input ray-data"] = ShardBatches(
            pipeline.ds, batch_size, len(ds), shuffle=True, pin_memory=device.type == "cuda"
        )
    return loaders


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: a smoke run of the same code (default: %(default)s)",
    )
    p.add_argument("--image-size", type=int, default=256, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode (default: %(default)s)")
    p.add_argument("--widths", default="32,64,128,256", help="DeepCNN stages (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--no-input", action="store_true", help="skip the input pipeline rows")
    p.add_argument(
        "--input-images",
        type=int,
        default=2048,
        help="JPEGs for the input and end-to-end rows (default: %(default)s)",
    )
    p.add_argument(
        "--ray-data",
        action="store_true",
        help="add the --input ray-data end-to-end row (a local Ray with all CPUs)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_train: skipped: no CUDA device here (run it on a GPU machine; --device cpu "
            "runs the same code on the CPU as a smoke test)"
        )
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels
    cfg = TrainConfig(image_size=args.image_size, widths=tuple(int(w) for w in args.widths.split(",")))
    rows = []
    for name, amp, cl, comp, check_every in MODES:
        if comp and args.no_compile:
            continue
        rate = train_rate(cfg, device, args.batch_size, args.steps, amp, cl, comp, check_every)
        rows.append({"mode": name, "images/s": rate})
        print(f"  {name}: {rate:,.0f} images/s", file=sys.stderr, flush=True)
    for row in rows:
        row["vs fp32"] = ratio(row["images/s"], rows[0]["images/s"])
    amp_name = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    rate = {r["mode"]: r["images/s"] for r in rows}
    print_table(
        f"gpu_train: DeepCNN training, {args.image_size} px, batch {args.batch_size}, {device}",
        rows,
        note=f"amp = {amp_name} autocast; synthetic uint8 batches on the device\n"
        f"losses summed on the device, read at check points / host sync every step: "
        f"{ratio(rate['amp + channels_last'], rate[SYNCED])}",
    )
    if not args.no_input:
        from input import measure

        cpus = os.cpu_count() or 1
        root = sample_root(8, max(args.input_images // 8, 1))
        best = "amp + channels_last" + ("" if args.no_compile else " + compile")
        e2e = [{"input": f"synthetic batches on the device ({best})", "images/s": rate[best]}]
        for name, loader in real_loaders(root, cfg, device, args.batch_size, cpus, args.ray_data).items():
            e2e.append(
                {
                    "input": name,
                    "images/s": train_rate(
                        cfg, device, args.batch_size, 0, True, True, not args.no_compile, loader=loader
                    ),
                }
            )
            print(f"  {name}: {e2e[-1]['images/s']:,.0f} images/s", file=sys.stderr, flush=True)
        for row in e2e:
            row["vs synthetic"] = ratio(row["images/s"], e2e[0]["images/s"])
        print_table(
            f"gpu_train: end to end, {best}, {args.image_size} px, batch {args.batch_size}, "
            f"{device}, {cpus} CPUs",
            e2e,
            note=f"{len(loader)} steps of real 256 px JPEGs per epoch, the second epoch timed; goal "
            "on an H100/H200 with compile: >= 0.9x of synthetic",
        )
        input_rows = measure(
            root,
            image_size=args.image_size,
            images=args.input_images,
            batch_size=min(args.batch_size, 256),
            loader_workers=cpus,
            repeats=2,
        )
        print_table(
            f"gpu_train: input pipeline with all {cpus} CPUs as loader processes",
            input_rows,
            note=f"the GPU consumes {max(r['images/s'] for r in rows):,.0f} images/s at best",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
