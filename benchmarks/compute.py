"""Compute: achieved FLOP/s of a DeepCNN training step vs this machine's measured matmul peak.

    python benchmarks/compute.py                             # GPU if there is one, else CPU
    python benchmarks/compute.py --device cpu --image-size 128 --batch-size 16

The step's FLOPs are counted by torch's FlopCounterMode (forward + backward, convolutions and
matmuls); the peak is the best rate of large square matmuls in the same precision, measured in
the same invocation. A second table gives forward-only images/s at batch 1 vs a Serve batch (what
dynamic batching can gain on the model itself). "% of peak" says how close to the hardware the
step runs; a CNN's early, thin convolutions are memory-bound, so well under 100% is expected.
Rows: fp32 and, where the device runs it fast (CUDA), bf16 autocast with channels_last.
"""

from __future__ import annotations

import argparse

import torch
from common import print_table, ratio, timed
from torch.utils.flop_counter import FlopCounterMode

from placesnet.config import TrainConfig
from placesnet.data.transforms import normalize
from placesnet.model import build_model
from placesnet.train import engine, optim
from placesnet.train.step import StepSettings


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of the best of ``repeats`` (n x n) @ (n x n) products."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up (cuBLAS handles, CPU thread pool)
    best = min(timed(lambda: a @ b, _sync(device)) for _ in range(repeats))
    return 2 * n**3 / best


def step_rate(
    cfg: TrainConfig,
    device: torch.device,
    batch_size: int,
    steps: int,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> tuple[float, float]:
    """(FLOPs per step, seconds per step) of DeepCNN training on synthetic uint8 images."""
    torch.manual_seed(0)
    model = build_model(cfg, 365).to(device)
    images = torch.randint(
        0, 256, (batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=device
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 365, (batch_size,), device=device)
    optimizer = optim.build_optimizer(model, 0.01, 0.9, 5e-4, device)
    settings = StepSettings(amp_dtype=amp_dtype, channels_last=channels_last)  # bf16: no GradScaler

    def run(n: int) -> None:  # the project's own epoch function, over n copies of the batch
        engine.train_one_epoch(
            model,
            [(images, targets)] * n,
            optimizer,
            device,
            settings=settings,
        )

    with FlopCounterMode(display=False) as counter:  # also the warm-up step
        run(1)
    run(1)
    seconds = timed(lambda: run(steps), _sync(device)) / steps
    return counter.get_total_flops(), seconds


@torch.inference_mode()
def inference_rate(cfg: TrainConfig, device: torch.device, batch_size: int, steps: int) -> float:
    """Forward-only images/s at ``batch_size`` (what one Serve replica does per batch)."""
    torch.manual_seed(0)
    model = build_model(cfg, 365).to(device).eval()
    images = torch.randint(
        0, 256, (batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=device
    )
    model(normalize(images))
    seconds = timed(lambda: [model(normalize(images)) for _ in range(steps)], _sync(device))
    return batch_size * steps / seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--image-size", type=int, default=256, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, help="default: 256 on GPU, 16 on CPU")
    p.add_argument("--widths", default="32,64,128,256", help="DeepCNN stages (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (default: %(default)s)")
    p.add_argument("--matmul-size", type=int, help="default: 8192 on GPU, 2048 on CPU")
    p.add_argument(
        "--serve-batch",
        type=int,
        default=16,
        help="inference table: batch size compared with batch 1 (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU: torch threads (default: torch's, one per core; a Serve replica with num_cpus=1 runs 1)",
    )
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch_size or (256 if cuda else 16)
    n = args.matmul_size or (8192 if cuda else 2048)
    cfg = TrainConfig(image_size=args.image_size, widths=tuple(int(w) for w in args.widths.split(",")))
    precisions = [("fp32", torch.float32, None, False)]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in both rows
        torch.backends.cudnn.allow_tf32 = False
        precisions.append(("bf16 + channels_last", torch.bfloat16, torch.bfloat16, True))
    rows = []
    for name, dtype, amp, cl in precisions:
        peak = matmul_peak(device, dtype, n, repeats=5)
        flops, seconds = step_rate(cfg, device, batch, args.steps, amp, cl)
        rows.append(
            {
                "precision": name,
                "matmul peak TFLOP/s": peak / 1e12,
                "step GFLOP": flops / 1e9,
                "step TFLOP/s": flops / seconds / 1e12,
                "% of peak": f"{100 * flops / seconds / peak:.1f}%",
                "images/s": batch / seconds,
            }
        )
    print_table(
        f"compute: DeepCNN training step, {args.image_size} px, batch {batch}, {device}",
        rows,
        note=f"peak: {n}x{n} matmul in the row's precision",
    )
    # What dynamic batching can gain in a Serve replica: the model's own speed-up from batching.
    single = inference_rate(cfg, device, 1, args.steps * 4)
    batched = inference_rate(cfg, device, args.serve_batch, max(args.steps, 2))
    where = f"{device}, {torch.get_num_threads()} thread(s)" if device.type == "cpu" else str(device)
    print_table(
        f"compute: DeepCNN inference (fp32), {args.image_size} px, {where}",
        [
            {"batch": 1, "images/s": single, "ms per image": 1000 / single, "vs batch 1": "1.00x"},
            {
                "batch": args.serve_batch,
                "images/s": batched,
                "ms per image": 1000 / batched,
                "vs batch 1": ratio(batched, single),
            },
        ],
        note="the most dynamic batching can gain on the model itself",
    )


if __name__ == "__main__":
    main()
