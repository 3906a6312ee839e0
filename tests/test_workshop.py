"""What a workshop student sees: honest notes about what a model knows, data and model
summaries, pictures of predictions and evaluations. No Ray."""

from __future__ import annotations

from placesnet.checkpoint import scope_note
from placesnet.config import TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"


def test_models_say_what_they_cannot_know():
    sample = scope_note(TrainConfig(dataset="sample"), list("abcdefgh"))
    assert sample.startswith(
        "this model was trained on the embedded sample data and knows only its 8 classes of drawn scenes"
    )
    assert "--dataset places365" in sample
    subset = scope_note(TrainConfig(dataset="places365"), [f"c{i}" for i in range(10)])
    assert subset == "this model knows only 10 of Places365's 365 scene classes"
    assert scope_note(TrainConfig(dataset="places365"), [f"c{i}" for i in range(365)]) is None


# --- load data: counts and a labelled grid ------------------------------------------------------


def test_class_counts_and_the_sample_grid(tiny_config, tiny_root):
    from placesnet.data.places import open_split
    from placesnet.data.transforms import eval_transform
    from placesnet.summaries import class_counts, samples_figure

    splits = {
        s: open_split(tiny_config, s, tiny_root, transform=eval_transform(32)) for s in ("train", "val")
    }
    table = class_counts(splits)
    assert list(table["class"]) == ["beach", "desert/sand", "field/wild", "forest/broadleaf", "total"]
    assert list(table["train"]) == [40, 40, 40, 40, 160] and list(table["val"]) == [12, 12, 12, 12, 48]
    fig = samples_figure(splits["train"], per_class=3, max_classes=4)
    shown = [ax.get_gid() for ax in fig.axes if ax.get_gid()]
    assert len(shown) == 12
    for gid in shown:  # every image sits in the row of its own label
        _, row, index = gid.split(":")
        assert splits["train"].targets[int(index)] == int(row)
    assert [fig.axes[r * 3].get_ylabel() for r in range(4)] == list(table["class"][:4])
    again = samples_figure(splits["train"], per_class=3, max_classes=4)
    assert [ax.get_gid() for ax in again.axes if ax.get_gid()] == shown  # same seed, same grid


def test_inspect_data_cli(tmp_path, capsys):
    import importlib

    from conftest import TINY_ARGS

    inspect_data = importlib.import_module("rayjobs.inspect_data")  # in this process: no 10 s start
    data_args = [a for a in TINY_ARGS[:8]]  # the data flags: classes, per-class counts, image size
    assert inspect_data.main([*data_args, "--per-class", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "forest/broadleaf     40   12" in out and "total    160   48" in out
    assert (tmp_path / "samples.png").read_bytes().startswith(PNG)
    assert (tmp_path / "counts.csv").read_text().splitlines()[1] == "0,beach,40,12"


# --- define the model: shapes, parameters, FLOPs -------------------------------------------------


def test_model_summary_at_places365_size():
    from placesnet.model import build_model, count_parameters
    from placesnet.summaries import format_summary, model_summary

    model = build_model(TrainConfig(), 365)
    rows = {r.name: r for r in model_summary(model, 256)}
    assert rows["features.0"].output == (32, 256, 256)
    assert rows["features.0"].flops == 2 * 32 * 256 * 256 * 3 * 9  # 113 MFLOPs
    assert rows["features.15"].output == (256, 16, 16) and rows["pool"].output == (256, 4, 4)
    assert rows["fc1"].params == 256 * 16 * 1024 + 1024 and rows["fc1"].flops == 2 * 4096 * 1024
    assert rows["fc2"].output == (365,)
    assert sum(r.params for r in rows.values()) == count_parameters(model)
    text = format_summary(list(rows.values()))
    assert f"total: {count_parameters(model):,} parameters" in text and "1.934 GFLOPs per image" in text
    assert model.training  # left as it was


def test_model_summary_cli(capsys):
    import importlib

    import pytest

    from placesnet.config import UserError

    model_summary = importlib.import_module("rayjobs.model_summary")
    assert model_summary.main(["--model", "workshop", "--image-size", "256", "--num-classes", "365"]) == 0
    out = capsys.readouterr().out
    assert "workshop: input 3x256x256, 365 classes" in out
    assert "128x64x64" in out  # the workshop's second stage: 128 x 64 x 64, as its comment says
    with pytest.raises(UserError, match="--image-size must be >= 8"):
        model_summary.main(["--image-size", "4"])


# --- evaluate and predict: pictures with their numbers -------------------------------------------


def test_confused_pairs_are_drawn_as_counts_with_their_totals():
    import torch

    from placesnet.plots import confusion_figure

    confusion = torch.diag(torch.tensor([40, 40, 40, 40]))
    confusion[0, 0], confusion[0, 2] = 39, 1  # one beach image of 40 taken for a field
    fig = confusion_figure(confusion, ["/b/beach", "/d/desert/sand", "/f/field/wild", "/f/forest/broadleaf"])
    bars_ax, matrix = fig.axes[0], fig.axes[1]
    bars = bars_ax.containers[0]
    assert [b.get_width() for b in bars] == [1]  # a count, not a full-width rate bar
    assert [t.get_text() for t in bars_ax.texts] == ["1 of 40 (2.5%)"]
    assert bars_ax.get_xlim()[1] < 3  # the axis fits the count
    assert "1 of 160 wrong" in bars_ax.get_title()
    cells = {t.get_gid(): t.get_text() for t in matrix.texts}
    assert cells == {"cell:0:0": "39", "cell:0:2": "1", "cell:1:1": "40", "cell:2:2": "40", "cell:3:3": "40"}


def test_per_class_plot_at_365_classes_shows_lowest_and_highest():
    import torch

    from placesnet.evaluation import per_class_table
    from placesnet.plots import per_class_figure

    n = 365
    confusion = torch.zeros(n, n, dtype=torch.int64)
    for i in range(n):
        confusion[i, i] = i % 100
        confusion[i, (i + 1) % n] = 100 - i % 100
    fig = per_class_figure(per_class_table(confusion, [f"/c/class{i}" for i in range(n)]))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 40
    assert labels[0] == "class0" and labels[-1] == "class299"  # lowest on top; ties by index
    bars = fig.axes[0].containers[0]
    assert bars.datavalues[0] == 0.0 and bars.datavalues[-1] == 0.99
    assert [t.get_text() for t in fig.axes[0].texts][:2] == ["0/100", "0/100"]
    assert "lowest 26 and highest 14 of 365" in fig.axes[0].get_title()


def test_misclassified_gallery_and_prediction_plot(tiny_root):
    from PIL import Image

    from placesnet.plots import misclassified_figure, predictions_figure

    classes = ["/b/beach", "/d/desert/sand"]
    path = str(tiny_root / "val_256/Places365_val_00000001.jpg")
    fig = misclassified_figure(
        [{"index": 0, "image": path, "true": 0, "predicted": 1, "probability": 0.91}], classes
    )
    (ax,) = [a for a in fig.axes if a.get_gid()]
    assert ax.get_gid() == "mistake:0" and ax.get_title() == "true: beach\npred: desert/sand 91%"
    preds = [
        {"label": "beach", "class_index": 0, "probability": 0.8},
        {"label": "desert/sand", "class_index": 1, "probability": 0.2},
    ]
    fig = predictions_figure([("a.jpg", Image.open(path), preds)], note="knows only 2 classes")
    widths = [b.get_width() for b in fig.axes[1].containers[0]]
    assert widths == [0.2, 0.8]  # the most probable on top
    assert "note: knows only 2 classes" in fig._suptitle.get_text()


# --- TensorBoard ------------------------------------------------------------------------------------


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard itself reads from an event-file directory: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_every_epoch_once_and_extend_on_rewrite(tmp_path):
    from placesnet.tensorboard import TB_FILE, event_file_bytes

    history = [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "val_loss": 1.5 / e,
            "train_top1": 0.1 * e,
            "val_top1": 0.1 * e,
            "val_top5": 0.2 * e,
            "lr": 0.01 * e,
            "images_per_s": 100.0,
            "epoch_time_s": 2.0,
        }
        for e in (1, 2, 3)
    ]
    two, three = event_file_bytes(history[:2]), event_file_bytes(history)
    assert event_file_bytes(history) == three  # the same history, the same bytes
    assert three.startswith(two)  # a rewrite after the next epoch extends the file
    (tmp_path / TB_FILE).write_bytes(three)
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["top1/val"]] == [1, 2, 3]
    assert [round(v, 5) for _, v in scalars["loss/val"]] == [1.5, 0.75, 0.5]
    assert set(scalars) == {
        "loss/train",
        "loss/val",
        "top1/train",
        "top1/val",
        "top5/val",
        "optim/lr",
        "speed/images_per_s",
        "speed/epoch_time_s",
    }
