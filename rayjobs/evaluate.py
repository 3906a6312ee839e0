r"""Evaluate a checkpoint: exact top-1/top-5 on the val split, per-class accuracy, and a picture
of the most confused class pairs.

    python rayjobs/evaluate.py --checkpoint ~/ray_results/deepcnn-sample-20261127-120000
    python rayjobs/evaluate.py --checkpoint RUN_DIR/checkpoint_... --num-workers 4 --gpu
    python rayjobs/evaluate.py --checkpoint ~/ray_results/published/resnet18_places365 \
        --data-root /scratch/datasets/places365 --ten-crop
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python rayjobs/evaluate.py \
        --checkpoint /shared/ray_results/places-deepcnn --num-workers 4

--checkpoint takes a checkpoint directory, a training run directory (its best checkpoint) or a
summary.json/best.json, on this machine or on object storage (s3://bucket/runs/NAME: fetched and
verified first, with the AWS_* variables of the shell). The dataset comes from the checkpoint's
config (--data-root overrides). Each image goes through the eval transform the checkpoint records,
as one view, or with --ten-crop as the official protocol of the published Places365 models' accuracies:
the 4 corner and the centre crops and their mirror images, class probabilities averaged.
With --num-workers 1 (default) it runs in this process without Ray; more workers shard the split
over Ray Train workers, with identical results.

Writes to --out (default: RUN_DIR/eval_<checkpoint name>/):
- per_class.csv and per_class.png: accuracy of every class (the lowest and highest 40 when there
  are more), with correct/images on each bar;
- confused_pairs.png: the most confused pairs as image counts ("3 of 40"), and for up to 20
  classes the confusion matrix with the count in each cell;
- misclassified.png: the --gallery most confident mistakes, each image (as the model saw it)
  with its true and predicted class, beside where the model sees each of the two (their
  Grad-CAM class activation maps, computed here from the checkpoint) and their probabilities;
- evaluation.json: every number above, the protocol (single view or ten-crop, and the transform),
  the mistakes' paths, and the model's note (a model of the sample data says it knows only those
  classes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from placesnet.cli import add_field_arg, non_negative_int, positive_int, ray_init, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint dir, training run dir, summary.json / best.json, or 'latest' (the "
        "newest finished run under ~/ray_results; latest:STORAGE_PATH for another)",
    )
    p.add_argument("--split", default="val", help="val (default) or train")
    # These two override the checkpoint's config: TrainConfig's flags, with its defaults.
    add_field_arg(p, "data_root", default_help="the one the checkpoint was trained on")
    add_field_arg(p, "skip_verify")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="images per forward pass per worker; with --ten-crop, crops (default: %(default)s)",
    )
    p.add_argument(
        "--ten-crop",
        action="store_true",
        help="the official protocol: each image's 4 corner and centre crops and their mirror images, "
        "class probabilities averaged (for a checkpoint whose transform crops: an imported published "
        "model); default: one view",
    )
    p.add_argument(
        "--num-workers",
        type=positive_int,
        default=1,
        help="1: evaluate in this process; N > 1: on N Ray Train workers (default: %(default)s)",
    )
    dev = p.add_mutually_exclusive_group()
    dev.add_argument(
        "--gpu", dest="gpu", action="store_true", default=None, help="use GPUs (default: when available)"
    )
    dev.add_argument("--cpu", dest="gpu", action="store_false", help="CPU only")
    p.add_argument(
        "--out",
        help="output directory (default: RUN_DIR/eval_<checkpoint name>; for a checkpoint on "
        "object storage, eval_<checkpoint name> here)",
    )
    p.add_argument(
        "--top-pairs",
        type=positive_int,
        default=15,
        help="confused class pairs to draw (default: %(default)s)",
    )
    p.add_argument(
        "--gallery",
        type=non_negative_int,
        default=24,
        help="most confident mistakes shown in misclassified.png (0: none; default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument(
        "--storage-path",
        help="with --num-workers > 1 on a multi-node cluster: a shared "
        "path (NFS or s3://) for Ray Train's run state (default: a temporary directory)",
    )
    p.add_argument("--address", help="Ray cluster for --num-workers > 1 (default: RAY_ADDRESS or local)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from placesnet.checkpoint import load_checkpoint, locate_checkpoint
    from placesnet.config import UserError
    from placesnet.remote import is_remote

    # a wrong path is an error at once; on object storage (s3://...), its URI: fetched below,
    # and by each Ray worker onto its own node
    source = locate_checkpoint(args.checkpoint)
    import torch

    from placesnet.config import pretty
    from placesnet.data.places import SPLITS, resolve_data_root
    from placesnet.data.views import ten_crops
    from placesnet.evaluation import evaluate_checkpoint, explain_mistakes, per_class_table
    from placesnet.plots import (
        confused_pairs,
        confusion_figure,
        misclassified_figure,
        per_class_figure,
        save_png,
    )

    if args.split not in SPLITS:
        raise UserError(f"unknown split {args.split!r}; choose one of {', '.join(SPLITS)}")
    loaded = load_checkpoint(source)  # validates before any work
    if args.ten_crop:
        ten_crops(loaded.config)  # a checkpoint whose transform does not crop: refused now
    cfg = loaded.config.replace(download=False, skip_verify=args.skip_verify or loaded.config.skip_verify)
    if args.data_root:
        cfg = cfg.replace(data_root=args.data_root)
    root = resolve_data_root(cfg)
    loaded.config = cfg

    if args.num_workers == 1:
        use_gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
        if use_gpu and not torch.cuda.is_available():
            raise UserError("--gpu asked for a GPU but torch sees none")
        device = torch.device("cuda" if use_gpu else "cpu")
        result = evaluate_checkpoint(
            loaded,
            root,
            device,
            split=args.split,
            batch_size=args.batch_size,
            mistakes=args.gallery,
            ten_crop=args.ten_crop,
        )
    else:
        device = torch.device("cpu")  # for the gallery's maps, here: a handful of images
        ray_init(args.address)
        from placesnet.launch.resources import plan_resources
        from placesnet.launch.trainer import distributed_evaluate

        res = plan_resources(args.num_workers, args.gpu, None)
        result = distributed_evaluate(
            source,
            root,
            res,
            split=args.split,
            batch_size=args.batch_size,
            skip_verify=cfg.skip_verify,
            storage_path=args.storage_path,
            mistakes=args.gallery,
            ten_crop=args.ten_crop,
        )

    confusion = result.pop("confusion")
    if args.out:
        out = Path(args.out).expanduser()
    elif is_remote(source):  # not beside a copy in the cache: here
        out = Path(f"eval_{loaded.path.name}").resolve()
    else:
        out = loaded.path.parent / f"eval_{loaded.path.name}"
    out.mkdir(parents=True, exist_ok=True)
    table = per_class_table(confusion, loaded.classes)
    table.to_csv(out / "per_class.csv", index=False)
    save_png(per_class_figure(table), out / "per_class.png")
    save_png(confusion_figure(confusion, loaded.classes, args.top_pairs), out / "confused_pairs.png")
    # the gallery's maps on this process, from the checkpoint: its images are read here anyway
    mistakes = explain_mistakes(loaded, result.pop("mistakes", []), device)
    if args.gallery:
        save_png(misclassified_figure(mistakes, loaded.classes), out / "misclassified.png")
    report = {
        "checkpoint": source,
        "note": loaded.note,
        "split": args.split,
        "data_root": str(root),
        "num_workers": args.num_workers,
        **result,
        "confused_pairs": confused_pairs(confusion, loaded.classes, args.top_pairs),
        "mistakes": [
            {
                "index": m["index"],
                "image": m["image"],
                "true": pretty(loaded.classes[m["true"]]),
                "predicted": pretty(loaded.classes[m["predicted"]]),
                "probability": m["probability"],
                "true_probability": m["true_probability"],  # the view's, as the map's title
            }
            for m in mistakes
        ],
        "per_class_csv": str(out / "per_class.csv"),
        "per_class_png": str(out / "per_class.png"),
        "confused_pairs_png": str(out / "confused_pairs.png"),
        "misclassified_png": str(out / "misclassified.png") if args.gallery else None,
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if loaded.note:
        print(f"note: {loaded.note}")
    print(
        f"{args.split} ({result['protocol']}): {result['val_images']} images, top-1 "
        f"{result['val_top1']:.4f}, top-5 {result['val_top5']:.4f}, loss {result['val_loss']:.4f}"
    )
    print(f"  transform: {result['transform']}")
    worst = table.sort_values("accuracy").head(10)
    print(
        "\nlowest per-class accuracy:\n"
        + worst[["class", "images", "accuracy", "most_confused_with"]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"
        )
    )
    print(f"\nper-class accuracy: {out / 'per_class.csv'}, {out / 'per_class.png'}")
    print(f"confused pairs:     {out / 'confused_pairs.png'}")
    if args.gallery:
        print(f"mistakes:           {out / 'misclassified.png'}")
    print(f"report:             {out / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
