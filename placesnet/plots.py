"""Pictures of training runs: learning curves and the most confused class pairs (PNG bytes)."""

from __future__ import annotations

import io
import sys

import matplotlib

if "ipykernel" not in sys.modules:  # in Jupyter, keep its inline backend: figures show in cells
    matplotlib.use("Agg")  # no screen on clusters
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from placesnet.config import best_epoch, pretty


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_png(fig, path) -> None:
    """Write ``fig`` to ``path`` as PNG and close it."""
    from pathlib import Path

    Path(path).write_bytes(_png(fig))


def curves_png(history: list[dict], title: str = "") -> bytes:
    """Loss and accuracy per epoch, train vs val (plus val top-5), the best epoch marked."""
    return _png(curves_figure(history, title))


def curves_figure(history: list[dict], title: str = ""):
    """The figure of :func:`curves_png`. The best epoch (highest val top-1, ties: lower val loss,
    as the best checkpoint) is a dotted line labelled ``best epoch N`` on both panels and a star."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "s-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.plot(epochs, [r["train_top1"] for r in history], "o-", label="train top-1")
    ax_acc.plot(epochs, [r["val_top1"] for r in history], "s-", label="val top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in history], "^--", label="val top-5", alpha=0.7)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.06))
    best = best_epoch(history)
    if best is not None:
        label = f"best epoch {best['epoch']} (val top-1 {best['val_top1']:.4f})"
        for ax in (ax_loss, ax_acc):
            ax.axvline(best["epoch"], color="crimson", linestyle=":", linewidth=1.5, label=label)
        ax_acc.plot(
            [best["epoch"]],
            [best["val_top1"]],
            "*",
            color="crimson",
            markersize=16,
            markeredgecolor="k",
            zorder=5,
        )
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return fig


def confused_pairs(confusion: torch.Tensor, classes: list[str], top: int = 15) -> list[dict]:
    """The ``top`` off-diagonal (true, predicted) cells, largest first, as rows with rates."""
    off = confusion.clone().double()
    off.fill_diagonal_(0)
    totals = confusion.sum(1).clamp(min=1).double()
    n = min(top, int((off > 0).sum()))
    values, flat = off.flatten().topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
    k = confusion.shape[0]
    return [
        {
            "true": classes[int(i) // k],
            "predicted": classes[int(i) % k],
            "count": int(v),
            "rate": float(v / totals[int(i) // k]),
        }
        for v, i in zip(values, flat)
    ]


def confusion_png(confusion: torch.Tensor, classes: list[str], top: int = 15) -> bytes:
    return _png(confusion_figure(confusion, classes, top))


def confusion_figure(confusion: torch.Tensor, classes: list[str], top: int = 15):
    """Left: the ``top`` most confused pairs as image counts, each bar labelled "n of N (rate)" on
    an axis that starts at 0 and fits the largest count (readable at 365 classes). Right, for up
    to 20 classes: the full confusion matrix with the count in every non-empty cell."""
    pairs = confused_pairs(confusion, classes, top)
    small = len(classes) <= 20
    fig, axes = plt.subplots(1, 2 if small else 1, figsize=(15 if small else 9, 5.5))
    ax = axes[0] if small else axes
    totals = confusion.sum(1)
    if pairs:
        labels = [f"{pretty(p['true'])} -> {pretty(p['predicted'])}" for p in pairs][::-1]
        counts = [p["count"] for p in pairs][::-1]
        bars = ax.barh(labels, counts, color="tab:red")
        index = {c: i for i, c in enumerate(classes)}
        texts = [f"{p['count']} of {int(totals[index[p['true']]])} ({p['rate']:.1%})" for p in pairs][::-1]
        ax.bar_label(bars, texts, padding=3, fontsize=8)
        ax.set_xlim(0, max(counts) * 1.35 + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        wrong = int(confusion.sum() - confusion.trace())
        ax.set(
            xlabel="images of the true class predicted as the other",
            title=f"most confused pairs (true -> predicted): {wrong} of {int(confusion.sum())} wrong",
        )
    else:
        ax.text(0.5, 0.5, "no confusions", ha="center", va="center")
        ax.set_axis_off()
    if small:
        m = axes[1]
        rates = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
        im = m.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                n = int(confusion[i, j])
                if n:
                    m.text(
                        j,
                        i,
                        str(n),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black",
                        gid=f"cell:{i}:{j}",
                    )
        names = [pretty(c) for c in classes]
        m.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        m.set_yticks(range(len(names)), names, fontsize=8)
        m.set(xlabel="predicted", ylabel="true", title="confusion matrix (counts; colour: row share)")
        fig.colorbar(im, ax=m, fraction=0.046)
    fig.tight_layout()
    return fig


def per_class_figure(table, most: int = 40):
    """Per-class accuracy as bars labelled "correct/images", lowest first. With more than
    ``most`` classes: the lowest ``most`` * 2/3 and the highest ``most`` / 3, with a gap line."""
    t = table.sort_values(["accuracy", "class_index"]).reset_index(drop=True)
    if len(t) > most:
        low, high = most * 2 // 3, most - most * 2 // 3
        t = t.iloc[list(range(low)) + list(range(len(t) - high, len(t)))].reset_index(drop=True)
        cut = low
    else:
        cut = None
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(t) + 1.5))
    y = list(range(len(t)))[::-1]
    colours = plt.cm.RdYlGn(t["accuracy"].fillna(0).to_numpy())
    bars = ax.barh(y, t["accuracy"].fillna(0), color=colours, edgecolor="k", linewidth=0.3)
    ax.bar_label(bars, [f"{c}/{n}" for c, n in zip(t["correct"], t["images"])], padding=3, fontsize=7)
    ax.set_yticks(y, t["class"], fontsize=7)
    if cut is not None:
        ax.axhline(y[cut - 1] - 0.5, color="k", linestyle="--", linewidth=1)
    mean = table["correct"].sum() / max(table["images"].sum(), 1)
    ax.axvline(mean, color="tab:blue", linestyle=":", label=f"overall top-1 {mean:.3f}")
    shown = f"lowest {cut} and highest {len(t) - cut} of {len(table)}" if cut else f"all {len(table)}"
    ax.set(
        xlim=(0, 1.15),
        xlabel="top-1 accuracy (correct/images)",
        title=f"per-class accuracy ({shown} classes)",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _thumbnail(path: str, size: int = 160):
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        return img


def misclassified_figure(mistakes: list[dict], classes: list[str], columns: int = 6):
    """A gallery of wrong predictions (evaluate's ``mistakes``: most confident first), each image
    titled with its true and predicted class and the predicted probability. Mistakes with maps
    (:func:`placesnet.evaluation.explain_mistakes`) take three panels side by side: the view the
    model saw, its Grad-CAM overlay for the true class and for the predicted class, each titled
    with the class and the view's probability of it; ``columns`` panels per row either way."""
    n = len(mistakes)
    if not n:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        ax.set_axis_off()
        return fig
    maps = all("true_map" in m for m in mistakes)
    panels = 3 if maps else 1
    per_row = max(1, columns // panels)  # mistakes per row
    rows, cols = -(-n // per_row), min(per_row, n) * panels
    height = 2.6 * rows if not maps else 2.9 * rows + 0.5  # two-line titles, a two-line heading
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, height), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for j, m in enumerate(mistakes):
        row, first = divmod(j, per_row)
        ax = axes[row, first * panels]
        true, predicted = pretty(classes[m["true"]]), pretty(classes[m["predicted"]])
        ax.imshow(_rgb(m["view"]) if maps else _thumbnail(m["image"]))
        ax.set_title(f"true: {true}\npred: {predicted} {m['probability']:.0%}", fontsize=8, color="tab:red")
        ax.set_gid(f"mistake:{m['index']}")
        if maps:
            for ax, which, label, colour in (
                (axes[row, first * panels + 1], "true", f"true: {true}", "tab:green"),
                (axes[row, first * panels + 2], "predicted", f"pred: {predicted}", "tab:red"),
            ):
                ax.imshow(overlay(m["view"], m[f"{which}_map"]))
                ax.set_title(f"{label}\n{m[f'{which}_probability']:.1%}", fontsize=8, color=colour)
                ax.set_gid(f"mistake:{m['index']}:{which}")
    heading = f"the {n} most confident mistakes"
    if maps:
        heading += (
            "\neach: the image, where the model sees the true class, where it sees the predicted "
            f"class (Grad-CAM, {CAM_COLORMAP}: blue none, red the most)"
        )
    fig.suptitle(heading, fontsize=11)
    fig.tight_layout()
    return fig


def predictions_figure(items: list[tuple[str, object, list[dict]]], note: str | None = None):
    """One row per image: the image, and its top-k classes as probability bars.
    ``items``: (title, PIL image, predictions as predict_images gives them)."""
    rows = len(items)
    fig, axes = plt.subplots(
        rows,
        2,
        figsize=(10, 2.6 * rows + (0.6 if note else 0)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 1.6]},
    )
    for (title, image, preds), (ax_img, ax_bar) in zip(items, axes):
        ax_img.imshow(image)
        ax_img.set_title(title, fontsize=8)
        ax_img.set_axis_off()
        labels = [p["label"] for p in preds][::-1]
        probs = [p["probability"] for p in preds][::-1]
        bars = ax_bar.barh(labels, probs, color=["tab:blue"] * (len(preds) - 1) + ["tab:orange"])
        ax_bar.bar_label(bars, [f"{v:.1%}" for v in probs], padding=3, fontsize=8)
        ax_bar.set(xlim=(0, 1.18), xlabel="probability")
        ax_bar.tick_params(axis="y", labelsize=8)
    if note:
        fig.suptitle(f"note: {note}", fontsize=8, wrap=True, color="tab:red")
    fig.tight_layout()
    return fig


BEST_COLOUR = "black"  # the best trial's own colour in sweep.png; no other trial gets it
_BATCH_MARKERS = "osD^vP<>hX"


def sweep_png(table) -> bytes:
    """The picture of a sweep: see :func:`sweep_figure`."""
    return _png(sweep_figure(table))


def _best_row(table):
    """The sweep's best trial, as best.json names it: the highest best val top-1 among the trials
    with a checkpoint (``table`` is collect_results' frame)."""
    ok = table[(table["best_checkpoint"] != "") & table["best_val_top1"].notna()]
    return None if ok.empty else ok.loc[ok["best_val_top1"].idxmax()]


def sweep_figure(table):
    """Left: best val top-1 against lr, one colour per trial, one marker shape per batch size; the
    best trial is a large star in BEST_COLOUR. Right: val top-1 per epoch of every trial in the same
    colours, the best one thick; trials ASHA stopped early end in an x (a one-epoch trial is an x
    alone), interrupted ones in a hollow circle. Axes leave room so nothing is clipped."""
    import json

    import numpy as np

    fig, (ax_lr, ax_curve) = plt.subplots(1, 2, figsize=(13, 4.8))
    best = _best_row(table)
    best_id = None if best is None else best["trial_id"]
    palette = [c for c in plt.cm.tab10.colors] + [c for c in plt.cm.Dark2.colors]
    colours, k = {}, 0
    for _, row in table.iterrows():
        if row["trial_id"] == best_id:
            colours[row["trial_id"]] = BEST_COLOUR
        else:
            colours[row["trial_id"]] = palette[k % len(palette)]
            k += 1
    sizes = sorted(table["batch_size"].dropna().unique())
    markers = {b: _BATCH_MARKERS[i % len(_BATCH_MARKERS)] for i, b in enumerate(sizes)}

    def name(row) -> str:
        bs = "?" if row["batch_size"] != row["batch_size"] else int(row["batch_size"])
        return f"bs {bs} lr {row['lr']:.2g}"

    for _, row in table.iterrows():
        if row["trial_id"] == best_id or row["best_val_top1"] != row["best_val_top1"]:
            continue  # the best is drawn last, on top; a trial without a result has no point
        ax_lr.scatter(
            [row["lr"]],
            [row["best_val_top1"]],
            s=70,
            color=colours[row["trial_id"]],
            marker=markers.get(row["batch_size"], "o"),
            edgecolor="k",
            zorder=3,
            label=f"{name(row)} ({row['status']})",
        )
    if best is not None:
        ax_lr.scatter(
            [best["lr"]],
            [best["best_val_top1"]],
            marker="*",
            s=480,
            color="gold",
            edgecolor=BEST_COLOUR,
            linewidth=1.5,
            zorder=5,
            clip_on=False,
            label=f"best: {name(best)}, val top-1 {best['best_val_top1']:.4f}",
        )
    lrs = table["lr"].dropna().astype(float)
    if len(lrs):
        ax_lr.set_xlim(lrs.min() / 2, lrs.max() * 2)  # a log axis: a factor of 2 each side
    ax_lr.set(
        xscale="log",
        xlabel="learning rate",
        ylabel="best val top-1",
        ylim=(0, 1.06),
        title="val top-1 vs learning rate (marker: batch size)",
    )
    ax_lr.grid(alpha=0.3)
    if ax_lr.get_legend_handles_labels()[0]:
        ax_lr.legend(fontsize=7, loc="lower left")

    for _, row in table.iterrows():
        curve = json.loads(row["curve"]) if isinstance(row["curve"], str) else []
        if not curve:
            continue
        is_best = row["trial_id"] == best_id
        early = row["status"] == "stopped early"
        x = np.arange(1, len(curve) + 1)
        ax_curve.plot(
            x,
            curve,
            "--" if early else "-",
            marker="o",
            ms=3,
            color=colours[row["trial_id"]],
            linewidth=3 if is_best else 1.3,
            zorder=4 if is_best else 2,
            label=f"{'best: ' if is_best else ''}{name(row)} ({row['status']})",
        )
        if early or row["status"] == "interrupted":
            ax_curve.plot(
                [x[-1]],
                [curve[-1]],
                "x" if early else "o",
                ms=10,
                mew=2.5,
                color=colours[row["trial_id"]],
                mfc="none" if not early else None,
                zorder=5,
                gid=f"end:{row['trial_id']}:{row['status']}",
            )
    ax_curve.set(
        xlabel="epoch",
        ylabel="val top-1",
        ylim=(0, 1.06),
        title="learning curves (x: stopped early by ASHA, o: interrupted)",
    )
    ax_curve.margins(x=0.08)
    ax_curve.grid(alpha=0.3)
    if ax_curve.get_legend_handles_labels()[0]:  # an interrupted sweep may have no curve yet
        ax_curve.legend(fontsize=7, loc="lower right")
    ax_curve.xaxis.get_major_locator().set_params(integer=True)
    return fig


def lr_find_png(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float) -> bytes:
    """The LR range test: training loss against learning rate (log axis), the suggestion marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, ".", color="tab:gray", alpha=0.5, label="loss per step")
    ax.plot(lrs, smoothed, "-", color="tab:blue", label="smoothed loss")
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.3g}")
    at = min(range(len(lrs)), key=lambda i: abs(lrs[i] - suggestion))
    ax.plot([lrs[at]], [smoothed[at]], "o", color="tab:red", markersize=9)
    top = max(smoothed[0], min(smoothed)) * 1.6  # keep the divergence from flattening the valley
    ax.set(
        xscale="log",
        xlabel="learning rate (log scale)",
        ylabel="training loss",
        title="LR range test",
        ylim=(min(smoothed) * 0.9, top),
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _png(fig)


CAM_COLORMAP, CAM_ALPHA = "jet", 0.5  # the usual Grad-CAM look: blue = no evidence, red = the most


def _rgb(image):
    """``image`` (a PIL image, a uint8 (3, H, W) tensor such as eval_transform's, or an
    (H, W, 3) uint8 array) as an (H, W, 3) uint8 array."""
    import numpy as np

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)


def overlay(image, heatmap, alpha: float = CAM_ALPHA):
    """``image`` blended with ``heatmap`` (H x W, values in [0, 1], as cam.explain gives) in the
    'jet' colormap at ``alpha``: an (H, W, 3) uint8 array of the image's size. The map is resized
    bilinearly when the image is larger (the same view at another resolution); ValueError when the
    two differ in aspect ratio, i.e. do not show the same view."""
    import numpy as np
    import torch.nn.functional as F

    rgb = _rgb(image)
    heat = torch.as_tensor(heatmap, dtype=torch.float32).detach().cpu()
    (h, w), (mh, mw) = rgb.shape[:2], heat.shape
    if abs(h / w - mh / mw) > 0.02 * h / w:
        raise ValueError(f"a {mh}x{mw} heatmap does not fit a {h}x{w} image (another view or aspect ratio)")
    if (mh, mw) != (h, w):
        heat = F.interpolate(heat[None, None], size=(h, w), mode="bilinear")[0, 0]
    colours = matplotlib.colormaps[CAM_COLORMAP](heat.clamp(0, 1).numpy())[..., :3]  # (H, W, 3) in [0, 1]
    return np.round((1 - alpha) * rgb + alpha * 255 * colours).astype(np.uint8)


def overlay_png(image, heatmap, alpha: float = CAM_ALPHA) -> bytes:
    """The :func:`overlay` of ``image`` and ``heatmap`` as PNG bytes of the image's own size (no
    axes or margins: what an endpoint returns)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(overlay(image, heatmap, alpha)).save(buf, format="PNG")
    return buf.getvalue()


def cam_png(items: list[tuple], columns: int = 2, note: str | None = None) -> bytes:
    """The picture of :func:`cam_figure` as PNG bytes."""
    return _png(cam_figure(items, columns, note))


def cam_figure(items: list[tuple], columns: int = 2, note: str | None = None):
    """Where the model looks: for each item, the image beside its heatmap overlay, titled with the
    class the map explains and its probability, ``columns`` items per row. ``items``: (image,
    heatmap, class name, probability[, the image's name, shown over it]), the image as
    :func:`overlay` takes it and the heatmap one of cam.explain's (as
    :func:`placesnet.evaluation.explain_images` gives them); ``note``: what the model cannot
    know, under the title."""
    n = len(items)
    cols = max(min(columns, n), 1)
    rows = max(-(-n // cols), 1)
    fig = plt.figure(figsize=(5.0 * cols, 2.9 * rows + 0.5), layout="constrained")
    panels = fig.subfigures(rows, cols, squeeze=False)
    for panel, (image, heatmap, label, probability, *name) in zip(panels.flat, items):
        ax_img, ax_cam = panel.subplots(1, 2)
        ax_img.imshow(_rgb(image))
        ax_img.set_title(name[0] if name else "image", fontsize=8)
        ax_cam.imshow(overlay(image, heatmap))
        ax_cam.set_title("where the model looks", fontsize=8)
        for ax in (ax_img, ax_cam):
            ax.set_axis_off()
        panel.suptitle(f"{pretty(label)}  {probability:.1%}", fontsize=10)
    if not n:
        panels[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    title = f"Grad-CAM: evidence for the class named ({CAM_COLORMAP}: blue none, red the most)"
    fig.suptitle(title + (f"\nnote: {note}" if note else ""), fontsize=9, wrap=True)
    return fig
