"""What the workshop's first two steps show: the data (class counts, a labelled grid of images)
and the model (per-stage output shapes, parameters, FLOPs per image). No Ray."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from placesnet.config import pretty
from placesnet.data.places import class_names

# --- the data --------------------------------------------------------------------------------


def class_counts(splits: dict) -> pd.DataFrame:
    """Images per class of each split (``{"train": ds, "val": ds}``, torchvision Places365
    datasets), one row per class in class-index order, plus a ``total`` row."""
    first = next(iter(splits.values()))
    names = class_names(first)
    table = pd.DataFrame({"index": range(len(names)), "class": [pretty(n) for n in names]})
    for split, ds in splits.items():
        counts = torch.bincount(torch.tensor(ds.targets, dtype=torch.long), minlength=len(names))
        table[split] = counts[: len(names)].tolist()
    total = {"index": "", "class": "total", **{s: int(table[s].sum()) for s in splits}}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def sample_indices(targets: list[int], per_class: int, classes: int, seed: int = 0) -> dict[int, list[int]]:
    """``per_class`` dataset indices of each of the first ``classes`` classes, drawn at random
    with ``seed`` (the same grid every time for the same data)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(targets), generator=g).tolist()
    picked: dict[int, list[int]] = {c: [] for c in range(classes)}
    for i in order:
        c = targets[i]
        if c in picked and len(picked[c]) < per_class:
            picked[c].append(i)
    return picked


def samples_figure(ds, per_class: int = 6, max_classes: int = 12, seed: int = 0):
    """A grid of images as the model sees them (after the eval resize), one row per class,
    each row labelled with its class name. ``ds`` yields (uint8 CHW tensor, label)."""
    from placesnet.plots import plt

    names = [pretty(n) for n in class_names(ds)]
    classes = min(max_classes, len(names))
    picked = sample_indices(ds.targets, per_class, classes, seed)
    fig, axes = plt.subplots(
        classes, per_class, figsize=(1.6 * per_class + 1.2, 1.6 * classes + 0.4), squeeze=False
    )
    for c in range(classes):
        for j in range(per_class):
            ax = axes[c][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(picked[c]):
                image, label = ds[picked[c][j]]
                assert label == c
                ax.imshow(image.permute(1, 2, 0).numpy())
                ax.set_gid(f"sample:{c}:{picked[c][j]}")
            else:
                ax.set_axis_off()
            if j == 0:
                ax.set_ylabel(names[c], rotation=0, ha="right", va="center", fontsize=9)
    more = f" (first {classes} of {len(names)} classes)" if classes < len(names) else ""
    fig.suptitle(f"{len(ds)} {ds.split} images{more}: {per_class} per class", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig


# --- the model -------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    kind: str
    output: tuple[int, ...]  # per image (no batch dimension)
    params: int
    flops: int  # per image: 2 x multiply-adds of its conv and linear layers


def _flops(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return 2 * output[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * module.out_features
    return 0


def _rows_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a summary lists: the model's children, Sequentials opened one level."""
    rows = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            rows += [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        else:
            rows.append((name, child))
    return rows


def model_summary(model: nn.Module, image_size: int) -> list[Row]:
    """Runs one ``image_size`` image through ``model`` (in eval mode, no grad) and records each
    listed module's output shape, parameters and FLOPs per image."""
    listed = _rows_of(model)
    rows = [Row(name, type(m).__name__, (), sum(p.numel() for p in m.parameters()), 0) for name, m in listed]
    hooks = []

    def record(row: Row):
        def on_output(module, inputs, output):
            row.output = tuple(output.shape[1:])

        return on_output

    def count(row: Row):
        def on_output(module, inputs, output):
            row.flops += _flops(module, output)

        return on_output

    for row, (_, module) in zip(rows, listed):
        hooks.append(module.register_forward_hook(record(row)))
        for leaf in module.modules():
            if isinstance(leaf, (nn.Conv2d, nn.Linear)):
                hooks.append(leaf.register_forward_hook(count(row)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def format_summary(rows: list[Row], title: str = "") -> str:
    """A text table of :func:`model_summary`'s rows with totals."""
    table = pd.DataFrame(
        [
            {
                "layer": r.name,
                "type": r.kind,
                "output (C, H, W)": "x".join(map(str, r.output)),
                "params": f"{r.params:,}",
                "MFLOPs": f"{r.flops / 1e6:,.2f}",
            }
            for r in rows
        ]
    )
    params, flops = sum(r.params for r in rows), sum(r.flops for r in rows)
    lines = [title] if title else []
    lines += [
        table.to_string(index=False),
        f"total: {params:,} parameters ({params * 4 / 2**20:.1f} MiB in fp32), "
        f"{flops / 1e9:.3f} GFLOPs per image (conv and linear, 2 x multiply-adds)",
    ]
    return "\n".join(lines)
