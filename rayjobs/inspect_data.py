"""Look at the data before training: images per class of each split, and a grid of labelled
images as the model sees them (the workshop's "load data" step). No Ray, no GPU.

    python rayjobs/inspect_data.py                                  # the embedded sample data
    python rayjobs/inspect_data.py --sample-difficulty hard --per-class 4
    python rayjobs/inspect_data.py --dataset places365 --data-root /scratch/datasets/places365 \\
        --max-classes 20 --out ~/places-look

Prints the class table (index, class, train and val images) and writes counts.csv and
samples.png (one row per class, --per-class images each, after the eval resize to
--image-size) to --out (default: ./data_look).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from placesnet.cli import add_data_args, positive_int, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    g = p.add_argument_group("what to show")
    g.add_argument(
        "--per-class",
        type=positive_int,
        default=6,
        help="images per class in samples.png (default: %(default)s)",
    )
    g.add_argument(
        "--max-classes",
        type=positive_int,
        default=12,
        help="classes in samples.png, the first N by index (default: %(default)s)",
    )
    g.add_argument(
        "--split",
        choices=["train", "val"],
        default="train",
        help="split shown in samples.png (default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=0, help="which images the grid shows (default: %(default)s)")
    g.add_argument("--out", default="data_look", help="output directory (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from placesnet.cli import data_config_from_args
    from placesnet.data.places import open_split, resolve_data_root
    from placesnet.data.transforms import eval_transform
    from placesnet.plots import save_png
    from placesnet.summaries import class_counts, samples_figure

    cfg = data_config_from_args(args)
    root = resolve_data_root(cfg)
    splits = {s: open_split(cfg, s, root, transform=eval_transform(cfg.image_size)) for s in ("train", "val")}
    table = class_counts(splits)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "counts.csv", index=False)
    save_png(
        samples_figure(splits[args.split], args.per_class, args.max_classes, args.seed), out / "samples.png"
    )
    print(
        f"{cfg.dataset} data in {root}: {len(table) - 1} classes, "
        + ", ".join(f"{s} {len(ds):,} images" for s, ds in splits.items())
    )
    print(table.to_string(index=False))
    print(f"\ncounts:  {out / 'counts.csv'}")
    print(f"samples: {out / 'samples.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
