"""Pictures of training runs: learning curves and the most confused class pairs (PNG bytes)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no screen on clusters
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .data import pretty  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_png(history: list[dict], title: str = "") -> bytes:
    """Loss and accuracy per epoch, train vs val (plus val top-5), from metrics rows."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "s-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.plot(epochs, [r["train_top1"] for r in history], "o-", label="train top-1")
    ax_acc.plot(epochs, [r["val_top1"] for r in history], "s-", label="val top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in history], "^--", label="val top-5", alpha=0.7)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return _png(fig)


def confused_pairs(confusion: torch.Tensor, classes: list[str], top: int = 15) -> list[dict]:
    """The ``top`` off-diagonal (true, predicted) cells, largest first, as rows with rates."""
    off = confusion.clone().double()
    off.fill_diagonal_(0)
    totals = confusion.sum(1).clamp(min=1).double()
    n = min(top, int((off > 0).sum()))
    values, flat = off.flatten().topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
    k = confusion.shape[0]
    return [{"true": classes[int(i) // k], "predicted": classes[int(i) % k], "count": int(v),
             "rate": float(v / totals[int(i) // k])} for v, i in zip(values, flat)]


def confusion_png(confusion: torch.Tensor, classes: list[str], top: int = 15) -> bytes:
    """A bar chart of the most confused pairs; a full matrix too when there are few classes."""
    pairs = confused_pairs(confusion, classes, top)
    small = len(classes) <= 20
    fig, axes = plt.subplots(1, 2 if small else 1, figsize=(14 if small else 8, 5))
    ax = axes[0] if small else axes
    if pairs:
        labels = [f"{pretty(p['true'])} -> {pretty(p['predicted'])}" for p in pairs][::-1]
        ax.barh(labels, [p["rate"] for p in pairs][::-1], color="tab:red")
        ax.set(xlabel="fraction of the true class predicted as the other",
               title="most confused class pairs (true -> predicted)")
    else:
        ax.text(0.5, 0.5, "no confusions", ha="center", va="center")
        ax.set_axis_off()
    if small:
        rates = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
        im = axes[1].imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
        names = [pretty(c) for c in classes]
        axes[1].set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        axes[1].set_yticks(range(len(names)), names, fontsize=8)
        axes[1].set(xlabel="predicted", ylabel="true", title="confusion matrix (row-normalised)")
        fig.colorbar(im, ax=axes[1], fraction=0.046)
    return _png(fig)


def sweep_png(table) -> bytes:
    """Left: best val top-1 against lr, one colour per batch size, the best trial starred.
    Right: val top-1 per epoch of every trial; early-stopped ones are dashed (and shorter)."""
    import json

    import numpy as np

    fig, (ax_lr, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = sorted(table["batch_size"].dropna().unique())
    colours = {b: plt.cm.viridis(i / max(len(sizes) - 1, 1)) for i, b in enumerate(sizes)}
    for b in sizes:
        rows = table[table["batch_size"] == b]
        ax_lr.scatter(rows["lr"], rows["best_val_top1"].fillna(0), s=60, color=colours[b],
                      label=f"batch {int(b)}", edgecolor="k", zorder=3)
    ok = table.dropna(subset=["best_val_top1"])
    if len(ok):
        best = ok.iloc[int(np.argmax(ok["best_val_top1"].values))]
        ax_lr.scatter([best["lr"]], [best["best_val_top1"]], marker="*", s=400, color="gold",
                      edgecolor="k", zorder=4, label="best")
    ax_lr.set(xscale="log", xlabel="learning rate", ylabel="best val top-1", ylim=(0, 1.02),
              title="val top-1 vs learning rate")
    ax_lr.grid(alpha=0.3)
    ax_lr.legend(fontsize=8)
    for _, row in table.iterrows():
        curve = json.loads(row["curve"]) if isinstance(row["curve"], str) else []
        if not curve:
            continue
        style = "--" if row["status"] == "stopped early" else "-"
        ax_curve.plot(range(1, len(curve) + 1), curve, style, marker="o", ms=3,
                      color=colours.get(row["batch_size"], "grey"),
                      label=f"bs {int(row['batch_size'])} lr {row['lr']:.2g} ({row['status']})")
    ax_curve.set(xlabel="epoch", ylabel="val top-1", ylim=(0, 1.02),
                 title="learning curves (dashed: stopped early by ASHA)")
    ax_curve.grid(alpha=0.3)
    if ax_curve.get_legend_handles_labels()[0]:  # an interrupted sweep may have no curve yet
        ax_curve.legend(fontsize=7)
    ax_curve.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def lr_find_png(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float) -> bytes:
    """The LR range test: training loss against learning rate (log axis), the suggestion marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, ".", color="tab:gray", alpha=0.5, label="loss per step")
    ax.plot(lrs, smoothed, "-", color="tab:blue", label="smoothed loss")
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.3g}")
    at = min(range(len(lrs)), key=lambda i: abs(lrs[i] - suggestion))
    ax.plot([lrs[at]], [smoothed[at]], "o", color="tab:red", markersize=9)
    top = max(smoothed[0], min(smoothed)) * 1.6  # keep the divergence from flattening the valley
    ax.set(xscale="log", xlabel="learning rate (log scale)", ylabel="training loss",
           title="LR range test", ylim=(min(smoothed) * 0.9, top))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _png(fig)
