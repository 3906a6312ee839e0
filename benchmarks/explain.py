"""Explain: the time per image of a Grad-CAM heatmap (placesnet.cam.explain) against a plain forward
pass of the same model, measured in the same invocation.

    python benchmarks/explain.py                          # CPU, batch 1 and 8
    python benchmarks/explain.py --device cuda --batches 1,8,64
    python benchmarks/explain.py --threads 1 --repeats 10 # one core, as a Serve replica with num_cpus=1

Rows: DeepCNN (the default widths) at the sample data's size and at 224 px, and ResNet-18 at 224 px,
each with 365 classes (Places365) and random weights (the time does not depend on them). "forward"
is the model under ``torch.inference_mode`` in eval mode, as predict and serve run it; "explain" is
``explain(model, images)``: one forward pass that keeps the graph, the backward pass from each
image's top-1 logit to the last conv stage, the map upsampled to the image and scaled to [0, 1].
"overlay PNG" is ``plots.overlay_png`` for one image at the model's input size (what an endpoint
would add per image). Each time is the best of --repeats runs, forward and explain taking turns.
"""

from __future__ import annotations

import argparse

import torch
from common import print_table, ratio, timed

from placesnet.cam import explain
from placesnet.config import DATASET_DEFAULTS, TrainConfig
from placesnet.data.transforms import normalize
from placesnet.model import build_model
from placesnet.plots import overlay_png

CLASSES = 365
CASES = [  # (model, image size)
    ("deepcnn", DATASET_DEFAULTS["sample"]["image_size"]),
    ("deepcnn", 224),
    ("resnet18", 224),
]


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def best(fns: list, device: torch.device, repeats: int) -> list[float]:
    """Seconds of the fastest of ``repeats`` calls of each of ``fns``, after one warm-up call each.
    The calls take turns, so a shared machine's load drifting during the run weighs on all alike."""
    for fn in fns:
        fn()
    times = [[timed(fn, _sync(device)) for fn in fns] for _ in range(repeats)]
    return [min(column) for column in zip(*times)]


def measure(name: str, size: int, batch: int, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(TrainConfig(model=name, image_size=size), CLASSES).to(device).eval()
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    images = normalize(pixels)

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    forward_s, explain_s = (
        s / batch for s in best([forward, lambda: explain(model, images)], device, repeats)
    )
    heatmap = explain(model, images[:1]).heatmaps[0].cpu()
    (png_s,) = best([lambda: overlay_png(pixels[0].cpu(), heatmap)], device, repeats)
    return {
        "model, size, batch": f"{name} {size} px, batch {batch}",
        "forward ms/image": 1000 * forward_s,
        "explain ms/image": 1000 * explain_s,
        "explain vs forward": ratio(explain_s, forward_s),
        "overlay PNG ms/image": 1000 * png_s,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="default: %(default)s")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated (default: %(default)s)")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed runs per cell, best kept (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's, one per core)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches takes whole numbers separated by commas, got {args.batches!r}")
    if min(batches) < 1:
        p.error(f"--batches must be >= 1, got {args.batches}")
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = torch.device("cuda" if cuda else "cpu")
    rows = [measure(name, size, batch, device, args.repeats) for name, size in CASES for batch in batches]
    where = f"{device}, {torch.get_num_threads()} thread(s)" if device.type == "cpu" else str(device)
    print_table(
        f"explain: Grad-CAM vs a plain forward pass (fp32, {CLASSES} classes), {where}",
        rows,
        note=f"best of {args.repeats} runs per cell; the ratio is explain over forward in the same row",
    )


if __name__ == "__main__":
    main()
