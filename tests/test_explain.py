"""Class activation maps where people look at predictions (#29): predict.py --cam draws each image
beside the map of its top-1 class, or of --cam-class, with predict's own probability; evaluate.py's
gallery puts the maps of the true and of the predicted class beside each mistake; class names are
taken as the checkpoint lists them or as answers print them. No Ray. (/explain: test_serve_core.py
and test_serve.py; batch_predict.py --cam: test_batch_predict.py.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_script
from PIL import Image

from placesnet.checkpoint import load_checkpoint
from placesnet.evaluation import batch_heatmaps, class_index

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ["/b/beach", "/d/desert/sand", "/f/field/wild", "/f/forest/broadleaf"]


def one_epoch_checkpoint(directory: Path, cfg) -> Path:
    """A checkpoint of ``cfg``'s model trained one epoch on the tiny sample data with the Ray-free
    engine (about a second): half of the val split right, so mistakes to show, and a map with
    evidence for every class (a model of random weights often has none for its top-1 class)."""
    from torch.utils.data import DataLoader, TensorDataset

    from placesnet.checkpoint import save_checkpoint
    from placesnet.data.places import class_names, open_split, resolve_data_root
    from placesnet.model import build_model
    from placesnet.train import engine

    root = resolve_data_root(cfg)
    cfg = replace(cfg, epochs=1)

    def loader(split: str, shuffle: bool) -> DataLoader:
        ds = open_split(cfg, split, root)
        images, targets = zip(*(ds[i] for i in range(len(ds))))
        return DataLoader(TensorDataset(torch.stack(images), torch.tensor(targets)), 32, shuffle=shuffle)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster on a busy machine
    try:
        torch.manual_seed(0)
        model = build_model(cfg, 4)
        history = list(
            engine.fit(
                model, loader("train", True), loader("val", False), cfg, torch.device("cpu"), num_classes=4
            )
        )
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(
        directory,
        model=model,
        config=cfg,
        classes=class_names(open_split(cfg, "val", root)),
        epoch=0,
        metrics={"epoch": 1, "val_top1": history[-1]["val_top1"]},
        history=history,
    )
    return Path(directory)


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tmp_path_factory):
    return one_epoch_checkpoint(tmp_path_factory.mktemp("explain") / "ckpt", tiny_config)


def test_a_class_is_found_by_either_name_and_an_unknown_one_names_the_closest():
    assert [class_index(CLASSES, n) for n in ("beach", "/b/beach", "desert/sand", "/f/forest/broadleaf")] == [
        0,
        0,
        1,
        3,
    ]
    with pytest.raises(ValueError) as unknown:
        class_index(CLASSES, "forest")
    message = str(unknown.value)
    assert message.startswith("unknown class 'forest': the model's 4 classes include forest/broadleaf, ")
    assert "\n" not in message and all(c in message for c in ("beach", "desert/sand", "field/wild"))
    many = [f"/c/class{i:03d}" for i in range(365)]
    with pytest.raises(ValueError, match=r"include class007, .*, \.\.\.$"):  # a few, not 365
        class_index(many, "class007x")


def test_maps_are_of_the_normalised_input_the_prediction_sees(checkpoint, tiny_root):
    """batch_heatmaps and explain_images hand cam.explain what the model predicts from: the view,
    normalised as batch_probabilities normalises it (the raw uint8 view gives other maps)."""
    from placesnet.cam import explain
    from placesnet.data.transforms import normalize
    from placesnet.data.views import single_view
    from placesnet.evaluation import batch_probabilities, explain_images
    from placesnet.images import load_image_file

    loaded = load_checkpoint(checkpoint)
    pictures = [load_image_file(tiny_root / f"val_256/Places365_val_{i:08d}.jpg") for i in (1, 2, 3)]
    views = torch.stack([single_view(loaded.config)(p) for p in pictures])
    probs = batch_probabilities(loaded, views)
    expected = explain(loaded.model, normalize(views))
    assert expected.classes.tolist() == probs.argmax(1).tolist()
    torch.testing.assert_close(batch_heatmaps(loaded, views, expected.classes.tolist()), expected.heatmaps)
    unnormalised = explain(loaded.model, views.float(), expected.classes).heatmaps
    assert not torch.allclose(unnormalised, expected.heatmaps, atol=0.05)
    items = explain_images(loaded, pictures, target=2)
    for (view, heatmap, name, probability), v, p in zip(items, views, probs):
        assert torch.equal(view, v) and name == loaded.classes[2] and probability == float(p[2])
    torch.testing.assert_close(
        torch.stack([h for _, h, _, _ in items]), explain(loaded.model, normalize(views), [2] * 3).heatmaps
    )


def test_predict_cam_draws_the_top1_map_or_the_class_asked_for(checkpoint, tiny_root, tmp_path):
    images = [tiny_root / f"val_256/Places365_val_{i:08d}.jpg" for i in (1, 2)]
    proc = run_script(
        "rayjobs/predict.py", "--checkpoint", checkpoint, "--json", "--top-k", 4, "--cam",
        "--plot", tmp_path / "top1.png", *images,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    for r in results:  # the map of the top-1 class, with predict's probability of it
        assert r["cam"]["label"] == r["predictions"][0]["label"]
        assert r["cam"]["class_index"] == r["predictions"][0]["class_index"]
        assert r["cam"]["probability"] == pytest.approx(r["predictions"][0]["probability"], abs=1e-6)
    with Image.open(tmp_path / "top1.png") as picture:  # two images, each beside its overlay
        assert picture.format == "PNG" and picture.width > 2 * picture.height * 0.8
    asked = results[0]["predictions"][-1]  # the first image's least probable class
    proc = run_script(
        "rayjobs/predict.py", "--checkpoint", checkpoint, "--json", "--top-k", 4,
        "--cam-class", asked["label"], "--plot", tmp_path / "asked.png", *images,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for r in json.loads(proc.stdout)["results"]:
        (theirs,) = [p for p in r["predictions"] if p["label"] == asked["label"]]
        assert r["cam"]["label"] == asked["label"] and r["cam"]["class_index"] == asked["class_index"]
        assert r["cam"]["probability"] == pytest.approx(theirs["probability"], abs=1e-6)
    assert (tmp_path / "asked.png").read_bytes().startswith(PNG)


def test_predict_cam_refuses_what_it_cannot_draw(checkpoint, tiny_root, tmp_path):
    image = tiny_root / "val_256/Places365_val_00000001.jpg"
    proc = run_script("rayjobs/predict.py", "--checkpoint", checkpoint, "--cam", image)
    assert_user_error(proc, "--cam draws into --plot OUT.png")
    proc = run_script(
        "rayjobs/predict.py", "--checkpoint", checkpoint, "--cam-class", "lighthouse",
        "--plot", tmp_path / "x.png", image,
    )  # fmt: skip
    assert_user_error(proc, "--cam-class: unknown class 'lighthouse'", "beach, desert/sand")
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def mistakes(checkpoint, tiny_root):
    """(the checkpoint loaded, evaluate_checkpoint's 4 most confident mistakes with their maps)."""
    from placesnet.evaluation import evaluate_checkpoint, explain_mistakes

    loaded = load_checkpoint(checkpoint)
    found = evaluate_checkpoint(loaded, tiny_root, torch.device("cpu"), mistakes=4)["mistakes"]
    assert len(found) == 4
    return loaded, explain_mistakes(loaded, found)


def test_each_mistake_gets_the_maps_of_its_true_and_predicted_class(mistakes):
    from placesnet.data.places import read_image_uint8
    from placesnet.data.views import single_view
    from placesnet.evaluation import batch_probabilities

    loaded, shown = mistakes
    differ = 0
    for m in shown:
        view = single_view(loaded.config)(read_image_uint8(m["image"]))
        assert torch.equal(m["view"], view)  # the view evaluate saw
        for which in ("true", "predicted"):
            expected = batch_heatmaps(loaded, view[None], [m[which]])[0]
            torch.testing.assert_close(m[f"{which}_map"], expected, atol=1e-5, rtol=0)
            probs = batch_probabilities(loaded, view[None])[0]
            assert m[f"{which}_probability"] == pytest.approx(float(probs[m[which]]), abs=1e-6)
        assert m["predicted_probability"] == pytest.approx(m["probability"], abs=1e-5)  # one view
        differ += not torch.allclose(m["true_map"], m["predicted_map"], atol=0.05)
    assert differ  # the two maps of a mistake show different things


def test_the_gallery_shows_each_mistake_beside_its_two_maps(mistakes):
    """Three panels per mistake, two mistakes per row: the view, the overlay of the true class's
    map and that of the predicted class's, each titled with its class and probability."""
    from placesnet.config import pretty
    from placesnet.plots import misclassified_figure, overlay

    loaded, shown = mistakes
    fig = misclassified_figure(shown, loaded.classes)
    panels = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    assert len(panels) == 3 * len(shown) and len(fig.axes) == 12  # 2 rows of 2 mistakes x 3 panels
    for m in shown:
        true, predicted = pretty(loaded.classes[m["true"]]), pretty(loaded.classes[m["predicted"]])
        image = panels[f"mistake:{m['index']}"]
        assert image.get_title() == f"true: {true}\npred: {predicted} {m['probability']:.0%}"
        assert np.array_equal(image.get_images()[0].get_array(), m["view"].permute(1, 2, 0).numpy())
        for which, label in (("true", f"true: {true}"), ("predicted", f"pred: {predicted}")):
            ax = panels[f"mistake:{m['index']}:{which}"]
            assert ax.get_title() == f"{label}\n{m[f'{which}_probability']:.1%}"
            drawn = ax.get_images()[0].get_array()
            assert np.array_equal(drawn, overlay(m["view"], m[f"{which}_map"]))
    assert "where it sees the predicted class" in fig._suptitle.get_text()


def test_evaluate_writes_the_gallery_with_the_maps(checkpoint, tmp_path):
    """evaluate.py --gallery 3 (one process, no Ray): misclassified.png holds 3 mistakes x 3
    panels, and evaluation.json each mistake's probability of its true class too."""
    out = tmp_path / "eval"
    proc = run_script(
        "rayjobs/evaluate.py", "--checkpoint", checkpoint, "--gallery", 3, "--out", out, "--cpu"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    assert len(report["mistakes"]) == 3
    for m in report["mistakes"]:
        assert set(m) == {"index", "image", "true", "predicted", "probability", "true_probability"}
        assert 0 <= m["true_probability"] <= m["probability"]  # the predicted class won
    with Image.open(out / "misclassified.png") as gallery:
        assert gallery.format == "PNG" and gallery.width > gallery.height  # 2 rows of 6 panels
