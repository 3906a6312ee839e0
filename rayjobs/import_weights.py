"""Import a published Places365 model (CSAILVision/places365) as a checkpoint of this project, which
predict.py, evaluate.py and serve then load like one trained here. No Ray, no GPU.

    wget http://places2.csail.mit.edu/models_places365/resnet18_places365.pth.tar
    python rayjobs/import_weights.py resnet18_places365.pth.tar --arch resnet18
    python rayjobs/predict.py --checkpoint ~/ray_results/published/resnet18_places365 photo.jpg

--arch: resnet18, resnet50, alexnet, densenet161 (torchvision's architectures) or wideresnet18
(Places365's ResNet-18 without its max-pool; its weights have resnet18's names, so its file
fits both: give the one it was trained as). The file is read without running any code in it
(torch.load weights_only), its keys renamed to torchvision's and loaded strictly, with the 365
official categories and the official eval transform: resize to 256x256, centre crop 224, ImageNet
mean and std. The checkpoint records the file's name and sha256, the licence of the weights (CC BY)
and the paper to cite: see docs/published-models.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from placesnet.cli import run_cli
from placesnet.config import DEFAULT_STORAGE
from placesnet.published import ARCHS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="a published model file, e.g. resnet18_places365.pth.tar")
    p.add_argument("--arch", required=True, choices=ARCHS, help="the architecture the file holds")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="the checkpoint directory to write, new or empty (default: "
        f"{DEFAULT_STORAGE}/published/<FILE without .pth.tar>)",
    )
    return p.parse_args(argv)


def default_out(file: str) -> Path:
    """~/ray_results/published/resnet18_places365 for resnet18_places365.pth.tar."""
    name = Path(file).name
    for suffix in (".tar", ".pth"):
        name = name.removesuffix(suffix)
    return Path(DEFAULT_STORAGE) / "published" / name


def main(argv=None) -> int:
    args = parse_args(argv)
    from placesnet.checkpoint import read_meta
    from placesnet.published import import_published

    out = import_published(args.file, args.arch, args.out or default_out(args.file))
    source = read_meta(out)["source"]
    print(f"imported {args.arch} (365 Places365 classes) from {source['file']} (sha256 {source['sha256']})")
    if source["file_arch"] not in (None, args.arch):
        print(
            f"note: the file names its arch {source['file_arch']!r}; its weights fit --arch {args.arch}, "
            "but predictions are right only for the architecture they were trained as"
        )
    print(f"checkpoint: {out}")
    print(f"licence:    {source['licence']}")
    print(f"cite:       {source['citation']}")
    print(f"predict:    python rayjobs/predict.py --checkpoint {out} photo.jpg")
    print(f"evaluate:   python rayjobs/evaluate.py --checkpoint {out} --data-root DIR --ten-crop")
    print(f"serve:      serve run --name placesnet serving.app:build_app checkpoint={out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
