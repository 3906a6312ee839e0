"""Top-k scene predictions for image files from a checkpoint (no Ray needed).

    python rayjobs/predict.py --checkpoint ~/ray_results/deepcnn-sample-20261127-120000 photo.jpg
    python rayjobs/predict.py --checkpoint RUN_DIR/summary.json --json --top-k 3 a.png b.jpg
    python rayjobs/predict.py --checkpoint RUN_DIR photo.jpg other.png --plot predictions.png
    python rayjobs/predict.py --checkpoint RUN_DIR photo.jpg --cam --plot where.png
    python rayjobs/predict.py --checkpoint RUN_DIR photo.jpg --cam --cam-class beach --plot beach.png
    python rayjobs/predict.py --checkpoint ~/ray_results/published/resnet18_places365 photo.jpg

Any JPEG/PNG/WebP/BMP/TIFF of any size and mode (grayscale, RGBA, palette, 16-bit, CMYK) is
converted to RGB and put through the eval transform the checkpoint records (a model trained here:
the one it was validated with; an imported published model: the official one). A model of
Places365's 365 classes also says whether each image is indoor or outdoor (the official rule,
from its 10 most probable classes). An unreadable image gets an error line (an "error" entry with
--json); the others are still predicted, and the exit code is 1.

--cam draws, into --plot, each image (as the model sees it: the eval transform's view) beside its
class activation map (Grad-CAM: where the evidence for the class is) for its top-1 class, or for
--cam-class NAME; the class and its probability are each picture's title (and "cam" in --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from placesnet.cli import positive_int, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint dir, training run dir, summary.json / best.json, or 'latest' (the "
        "newest finished run under ~/ray_results; latest:STORAGE_PATH for another)",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument(
        "--top-k",
        type=positive_int,
        help="classes per image (default: 5, or all classes if the model has fewer)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document for machines")
    p.add_argument("--gpu", action="store_true", help="run the model on the GPU")
    p.add_argument("--plot", metavar="OUT.png", help="also draw each image next to its top-k bars")
    p.add_argument(
        "--cam",
        action="store_true",
        help="with --plot: draw each image beside where the model looks for its top-1 class "
        "(a Grad-CAM heatmap) instead of the bars",
    )
    p.add_argument(
        "--cam-class",
        metavar="NAME",
        help="--cam for this class instead of the top-1, in every image: a name as the model's "
        "classes list it (/b/beach) or as printed (beach)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from placesnet.checkpoint import load_checkpoint, locate_checkpoint
    from placesnet.config import UserError, pretty

    args.cam = args.cam or args.cam_class is not None
    if args.cam and not args.plot:
        raise UserError("--cam draws into --plot OUT.png: add --plot OUT.png")
    # a wrong path is an error at once; on object storage, its URI (fetched and verified below)
    args.checkpoint = locate_checkpoint(args.checkpoint)
    import torch

    from placesnet.environment import environment, io_labels
    from placesnet.evaluation import class_index, explain_images, image_probabilities, ranked
    from placesnet.images import BadImage, load_image_file

    plot = Path(args.plot).expanduser().resolve() if args.plot else None
    if plot and (plot.suffix.lower() != ".png" or not plot.parent.is_dir()):
        raise UserError(f"--plot {args.plot}: give a .png path in an existing directory")
    if args.gpu and not torch.cuda.is_available():
        raise UserError("--gpu asked for a GPU but torch sees none")
    device = torch.device("cuda" if args.gpu else "cpu")
    loaded = load_checkpoint(args.checkpoint, device)
    if args.top_k is None:
        args.top_k = min(5, len(loaded.classes))
    elif args.top_k > len(loaded.classes):
        raise UserError(f"--top-k {args.top_k} is more than the model's {len(loaded.classes)} classes")
    try:
        target = None if args.cam_class is None else class_index(loaded.classes, args.cam_class)
    except ValueError as e:
        raise UserError(f"--cam-class: {e}") from None

    images, errors = {}, {}
    for path in args.images:
        try:
            images[path] = load_image_file(path)
        except BadImage as e:
            errors[path] = str(e)
    probs = dict(zip(images, image_probabilities(loaded, list(images.values()), device)))
    predictions = {path: ranked(p, loaded.classes, args.top_k) for path, p in probs.items()}
    labels = io_labels(loaded.classes)  # None: not Places365's classes, no environment
    environments = {path: environment(p, labels) for path, p in probs.items()} if labels is not None else {}
    cams = {}  # path -> the class its map explains: {label, class_index, probability}
    if args.plot and predictions:
        from placesnet.plots import cam_figure, predictions_figure, save_png

        if args.cam:
            items = explain_images(loaded, list(images.values()), target, device)
            for path, (_, _, name, probability) in zip(images, items):
                cams[path] = {
                    "label": pretty(name),
                    "class_index": loaded.classes.index(name),
                    "probability": probability,
                }
            named = [(*item, Path(path).name) for path, item in zip(images, items)]
            save_png(cam_figure(named, note=loaded.note), plot)
        else:
            save_png(
                predictions_figure(
                    [(Path(p).name, images[p], predictions[p]) for p in predictions], loaded.note
                ),
                plot,
            )

    if args.json:
        doc = {
            "checkpoint": args.checkpoint,
            "note": loaded.note,
            "results": [
                {
                    "image": p,
                    "predictions": predictions[p],
                    **({"environment": environments[p]} if p in environments else {}),
                    **({"cam": cams[p]} if p in cams else {}),
                }
                if p in predictions
                else {"image": p, "error": errors[p]}
                for p in args.images
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        if loaded.note:
            print(f"note: {loaded.note}")
        for path in args.images:
            if path in predictions:
                print(path)
                for rank, pred in enumerate(predictions[path], start=1):
                    print(f"  {rank}. {pred['label']:<28} {pred['probability']:7.2%}")
                if path in environments:
                    print(f"  environment: {environments[path]}")
                if path in cams:
                    print(f"  map of: {cams[path]['label']} {cams[path]['probability']:.2%}")
    if args.plot and predictions:
        print(f"plot: {plot}", file=sys.stderr if args.json else sys.stdout)
    for path in args.images:
        if path in errors:
            print(f"predict.py: error: {errors[path]}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    run_cli(main)
