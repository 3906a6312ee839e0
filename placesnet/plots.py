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
