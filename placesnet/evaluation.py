"""Ray-free evaluation of a checkpoint and top-k prediction for images.

``evaluate_checkpoint`` runs the same exact, shard-without-padding evaluation as training, on one
process or (with torch.distributed initialised, e.g. under Ray Train) on several.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

from placesnet.checkpoint import Loaded
from placesnet.config import UserError, pretty
from placesnet.data.loaders import ShardSampler, loader_kwargs
from placesnet.data.places import class_names, open_split
from placesnet.data.transforms import eval_transform, normalize
from placesnet.train.engine import evaluate
from placesnet.train.step import amp_dtype_for


def evaluate_checkpoint(
    loaded: Loaded,
    root: Path,
    device: torch.device,
    *,
    split: str = "val",
    batch_size: int = 256,
    loader_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    mistakes: int = 0,
) -> dict:
    """Loss, top-1, top-5 and the confusion matrix of ``loaded.model`` on ``split``.

    Each rank evaluates its shard; the result is the exact total over the split on every rank.
    With ``mistakes`` = N, ``mistakes`` holds the N most confident wrong predictions over all
    ranks (``index`` in the split, ``image`` path, ``true``, ``predicted``, ``probability``).
    """
    cfg = loaded.config
    ds = open_split(cfg, split, root, transform=eval_transform(cfg.image_size))
    if class_names(ds) != loaded.classes:
        raise UserError(
            f"the dataset under {root} has other classes than the checkpoint "
            f"({len(class_names(ds))} vs {len(loaded.classes)})"
        )
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=ShardSampler(ds, rank, world_size),
        **loader_kwargs(loader_workers, pin_memory=device.type == "cuda"),
    )
    channels_last = cfg.channels_last and device.type == "cuda"
    model = loaded.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate(
        model,
        loader,
        device,
        num_classes=len(loaded.classes),
        amp_dtype=amp_dtype_for(device, cfg.amp),
        channels_last=channels_last,
        confusion=True,
        mistakes=mistakes,
    )
    if mistakes:
        found = [{"index": loader.sampler.indices[m.pop("position")], **m} for m in result["mistakes"]]
        if world_size > 1:
            import torch.distributed as dist

            everyone = [None] * world_size
            dist.all_gather_object(everyone, found)
            found = [m for part in everyone for m in part]
        found = sorted(found, key=lambda m: (-m["probability"], m["index"]))[:mistakes]
        result["mistakes"] = [{**m, "image": ds.imgs[m["index"]][0]} for m in found]
    return result


def per_class_table(confusion: torch.Tensor, classes: list[str]) -> pd.DataFrame:
    """One row per class: images, correct, accuracy, and the class it is most often taken for."""
    rows = []
    for i, name in enumerate(classes):
        row = confusion[i].clone()
        total, correct = int(row.sum()), int(row[i])
        row[i] = -1
        j = int(row.argmax())
        rows.append(
            {
                "class_index": i,
                "class": pretty(name),
                "images": total,
                "correct": correct,
                "accuracy": correct / total if total else float("nan"),
                "most_confused_with": pretty(classes[j]) if row[j] > 0 else "",
                "confused_count": max(int(row[j]), 0),
            }
        )
    return pd.DataFrame(rows)


@torch.inference_mode()
def predict_images(
    loaded: Loaded,
    images: list[Image.Image],
    top_k: int = 5,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> list[list[dict]]:
    """Top-k ``{label, class_index, probability}`` per RGB image, most probable first."""
    transform = eval_transform(loaded.config.image_size)
    k = max(1, min(top_k, len(loaded.classes)))
    model = loaded.model.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(img) for img in images[start : start + batch_size]])
        probs = torch.softmax(model(normalize(batch.to(device))).float(), dim=1)
        values, indices = probs.topk(k, dim=1)
        for vals, idxs in zip(values.tolist(), indices.tolist()):
            out.append(
                [
                    {"label": pretty(loaded.classes[i]), "class_index": i, "probability": p}
                    for p, i in zip(vals, idxs)
                ]
            )
    return out
