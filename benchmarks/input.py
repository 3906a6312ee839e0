"""Input pipeline: the project's uint8 pipeline vs the workshop's float32 pipeline.

    python benchmarks/input.py                     # 1 loader process, the sample data's 256x256 JPEGs
    python benchmarks/input.py --loader-workers 4 --repeats 5
    python benchmarks/input.py --data-root /scratch/datasets/places365 --images 5000
    python benchmarks/input.py --loader-workers 2 --ray-data   # + the --input ray-data path

Both read the same JPEGs through torchvision's Places365 class and a DataLoader with the same
batch size and loader processes:
  workshop: PIL decode -> Resize(256) -> ToTensor -> Normalize(0.5), float32 batches
  project:  decode_image to uint8 -> Resize/CenterCrop on uint8, uint8 batches; normalize() runs
            on the training device afterwards, so it is not part of the loader's work
  project + normalize on CPU: the same, plus normalize() in the main process, as when the
            training device is this CPU (on a GPU that step costs microseconds)
  ray data (--ray-data): train.py's --input ray-data pipeline (placesnet/data/raydata.py) on a
            local Ray with --loader-workers CPUs: the same decode + resize in Ray Data tasks of
            one CPU each, batches streamed to this process (as to a Train worker)
Prints images/s, images/s per loader process and bytes per batch, with ratios against the
workshop run in the same invocation (runs alternate; each one's best of --repeats counts).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from common import print_table, ratio, sample_root, timed
from torch.utils.data import DataLoader, Subset

from placesnet.config import TrainConfig
from placesnet.data.loaders import LoaderPlan
from placesnet.data.places import Places365Copy, open_split
from placesnet.data.transforms import normalize, workshop_transform


def datasets(root, image_size: int, images: int) -> dict:
    """The same files, as the workshop and as this project read them."""
    cfg = TrainConfig(dataset="places365", data_root=str(root), skip_verify=True, image_size=image_size)
    ours = open_split(cfg, "train", root)
    workshop = Places365Copy(
        str(root), split="train-standard", small=True, transform=workshop_transform(image_size)
    )  # torchvision's PIL loader
    n = min(images, len(ours))
    return {
        "workshop": (Subset(workshop, range(n)), False),
        "project": (Subset(ours, range(n)), False),
        "project + normalize on CPU": (Subset(ours, range(n)), True),
    }


def run_once(ds, batch_size: int, loader_workers: int, normalize_batches: bool) -> tuple[float, int]:
    """(images/s, bytes of one batch) for one pass over ``ds``, after an untimed pass that starts
    the (persistent) loader processes and warms the page cache."""
    loader = DataLoader(ds, batch_size=batch_size, **LoaderPlan(loader_workers, 1, False).kwargs())
    nbytes = 0

    def consume():
        nonlocal nbytes
        for images, _ in loader:
            nbytes = max(nbytes, images.nbytes)
            if normalize_batches:
                normalize(images)

    consume()
    seconds = timed(consume)
    return len(ds) / seconds, nbytes


class RayDataInput:
    """The --input ray-data pipeline over the first ``images`` train images, on a local Ray with
    ``cpus`` CPUs (its decode tasks take one each), consumed here in batches."""

    def __init__(self, root, image_size: int, images: int, cpus: int) -> None:
        import ray

        from placesnet.cli import PACKAGE_DIR
        from placesnet.data.raydata import build_datasets

        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            runtime_env={"py_modules": [str(PACKAGE_DIR)]},
        )
        cfg = TrainConfig(dataset="places365", data_root=str(root), skip_verify=True, image_size=image_size)
        self.ds, self.images = build_datasets(cfg, root, images=images)["train"], images

    def __len__(self) -> int:
        return self.images

    def run_once(self, batch_size: int) -> tuple[float, int]:
        nbytes = 0

        def consume():
            nonlocal nbytes
            for batch in self.ds.iter_torch_batches(batch_size=batch_size, device="cpu", prefetch_batches=2):
                nbytes = max(nbytes, batch["image"].nbytes)

        consume()  # starts the Ray workers (imports), as the DataLoader's untimed pass does
        return self.images / timed(consume), nbytes


def measure(
    root,
    *,
    image_size: int,
    images: int,
    batch_size: int,
    loader_workers: int,
    repeats: int,
    ray_data: bool = False,
) -> list[dict]:
    torch.set_num_threads(1)
    sets = datasets(root, image_size, images)
    if ray_data:
        sets["ray data"] = (
            RayDataInput(root, image_size, len(sets["project"][0]), max(loader_workers, 1)),
            False,
        )
    best: dict[str, tuple[float, int]] = {}
    for _, name in itertools.product(range(repeats), sets):  # alternate: drift hits both alike
        ds, normalize_batches = sets[name]
        if isinstance(ds, RayDataInput):
            rate, nbytes = ds.run_once(batch_size)
        else:
            rate, nbytes = run_once(ds, batch_size, loader_workers, normalize_batches)
        if rate > best.get(name, (0, 0))[0]:
            best[name] = (rate, nbytes)
    base_rate, base_bytes = best["workshop"]
    procs = max(loader_workers, 1)
    return [
        {
            "pipeline": name,
            "loader procs": loader_workers,
            "images/s": rate,
            "images/s per proc": rate / procs,
            "MiB per batch": nbytes / 2**20,
            "speed vs workshop": ratio(rate, base_rate),
            "bytes vs workshop": ratio(nbytes, base_bytes),
        }
        for name, (rate, nbytes) in best.items()
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="a Places365 copy (default: generated 256x256 sample JPEGs)")
    p.add_argument("--images", type=int, default=1024, help="images per run (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=256, help="default: %(default)s (the workshop's)")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    p.add_argument(
        "--loader-workers",
        type=int,
        default=1,
        help="DataLoader processes; 0 decodes in the main process (default: %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per pipeline (default: %(default)s)")
    p.add_argument(
        "--ray-data",
        action="store_true",
        help="add train.py's --input ray-data pipeline on a local Ray with --loader-workers CPUs",
    )
    args = p.parse_args(argv)
    root = args.data_root or sample_root(8, max(args.images // 8, 1))
    rows = measure(
        root,
        image_size=args.image_size,
        images=args.images,
        batch_size=args.batch_size,
        loader_workers=args.loader_workers,
        repeats=args.repeats,
        ray_data=args.ray_data,
    )
    print_table(
        f"input: {args.images} JPEGs at {args.image_size} px, batch {args.batch_size}",
        rows,
        note="goal: project >= 2x the workshop's images/s per loader process",
    )


if __name__ == "__main__":
    main()
