"""Show a model before training it (the workshop's "define the model" step): each stage's output
shape for one image, its parameters and FLOPs per image, and the totals. No Ray, no data.

    python rayjobs/model_summary.py                               # DeepCNN at the sample's 64 px, 8 classes
    python rayjobs/model_summary.py --image-size 256 --num-classes 365   # as trained on Places365
    python rayjobs/model_summary.py --model workshop --image-size 256 --num-classes 365
    python rayjobs/model_summary.py --checkpoint ~/ray_results/deepcnn-sample-20261128-090637

FLOPs count the conv and linear layers (2 x multiply-adds), the usual convention; BatchNorm, ReLU
and pooling add a few percent more.
"""

from __future__ import annotations

import argparse

from placesnet.cli import int_list, positive_int, run_cli
from placesnet.config import MODELS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="deepcnn", help="default: %(default)s")
    p.add_argument(
        "--widths",
        type=int_list,
        default=(32, 64, 128, 256),
        help="deepcnn: channels of each conv stage (default: 32,64,128,256)",
    )
    p.add_argument("--image-size", type=positive_int, default=64, help="default: %(default)s")
    p.add_argument("--num-classes", type=positive_int, default=8, help="default: %(default)s")
    p.add_argument(
        "--checkpoint",
        help="summarise a trained model instead (checkpoint dir, run dir "
        "summary.json or latest): its model, widths, image size and classes",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from placesnet.config import TrainConfig
    from placesnet.model import build_model
    from placesnet.summaries import format_summary, model_summary

    if args.checkpoint:
        from placesnet.checkpoint import load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
        model, cfg, classes = loaded.model, loaded.config, len(loaded.classes)
        where = f" from {loaded.path}"
    else:
        if args.image_size < 8:
            from placesnet.config import UserError

            raise UserError(f"--image-size must be >= 8 pixels, got {args.image_size}")
        cfg = TrainConfig(model=args.model, widths=args.widths, image_size=args.image_size)
        classes, where = args.num_classes, ""
        model = build_model(cfg, classes)
    rows = model_summary(model, cfg.image_size)
    print(
        format_summary(
            rows, f"{cfg.model}{where}: input 3x{cfg.image_size}x{cfg.image_size}, {classes} classes"
        )
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
