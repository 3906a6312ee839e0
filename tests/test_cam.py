"""Class activation maps show where the evidence for the class is: a model that decides by one
quadrant of the image gets its map there, the mirrored model in the mirrored quadrant; maps depend
on the class asked for, are the image's size and lie in [0, 1] for every --model architecture; the
model is left as it was. The overlay pictures put the map's colours where the map is. No Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from placesnet.cam import cam_layer, explain
from placesnet.config import MODELS, TrainConfig
from placesnet.data.places import class_names, open_split
from placesnet.data.transforms import normalize
from placesnet.model import DeepCNN, InputStats, build_model
from placesnet.plots import cam_figure, cam_png, overlay, overlay_png
from placesnet.train import engine

CPU = torch.device("cpu")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a busy 2-core machine two threads run
    them ten times slower: train the fixtures' models on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a model that decides by the top-left quadrant -------------------------------------------
SIZE, MARGIN, NOISE = 64, 4, 0.3


def _stripes() -> torch.Tensor:
    """Four +-1 textures of a quadrant's size, one per class: horizontal and vertical stripes, a
    checkerboard, diagonal stripes."""
    y, x = torch.meshgrid(torch.arange(SIZE // 2), torch.arange(SIZE // 2), indexing="ij")
    return (
        torch.stack([(y // 2) % 2, (x // 2) % 2, (x // 2 + y // 2) % 2, ((x + y) // 3) % 2]).float() * 2 - 1
    )


def _quadrant_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noise images whose class is the texture drawn in the top-left quadrant (``MARGIN``
    pixels inside it); nothing else in the image says anything about the class."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.randn(n, 3, SIZE, SIZE, generator=generator) * NOISE
    inner = slice(MARGIN, SIZE // 2 - MARGIN)
    images[:, :, inner, inner] += _stripes()[labels][:, None, inner, inner]
    return images, labels


def _mirrored(model: DeepCNN) -> DeepCNN:
    """``model`` with every weight mirrored left-right: on a mirrored image it computes exactly
    what ``model`` computes on the image, so it decides by the top-right quadrant."""
    twin = DeepCNN(4, (8, 16, 32), fc_hidden=32, dropout=0.0)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in twin.features:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(m.weight.flip(-1))
        fc1 = twin.fc1.weight  # (hidden, channels * 4 * 4): the pooled grid's columns mirrored too
        fc1.copy_(fc1.view(fc1.shape[0], -1, 4, 4).flip(-1).reshape_as(fc1))
    return twin.eval()


@pytest.fixture(scope="module")
def quadrant_model(one_thread):
    """(a DeepCNN trained to classify by the top-left quadrant, 64 held-out images, their labels)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = DeepCNN(4, (8, 16, 32), fc_hidden=32, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        images, labels = _quadrant_images(16, generator)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images, labels = _quadrant_images(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() > 0.95  # it did learn the task
    return model, images, labels


def _mass(heatmaps: torch.Tensor, rows: slice, cols: slice) -> float:
    """Mean over the maps of the share of each map's sum inside ``rows`` x ``cols``."""
    return float((heatmaps[:, rows, cols].sum((1, 2)) / heatmaps.sum((1, 2)).clamp(min=1e-12)).mean())


TOP, LEFT, RIGHT = slice(0, SIZE // 2), slice(0, SIZE // 2), slice(SIZE // 2, SIZE)


def test_the_map_sits_in_the_quadrant_that_decides_the_class(quadrant_model):
    model, images, labels = quadrant_model
    heatmaps = explain(model, images, labels).heatmaps
    assert _mass(heatmaps, TOP, LEFT) >= 0.8


def test_the_mirrored_model_gets_the_mirrored_map(quadrant_model):
    """Top-right this time: a map transposed anywhere on its way lands bottom-left."""
    model, images, labels = quadrant_model
    mirrored = images.flip(-1)
    heatmaps = explain(_mirrored(model), mirrored, labels).heatmaps
    assert _mass(heatmaps, TOP, RIGHT) >= 0.8
    torch.testing.assert_close(heatmaps, explain(model, images, labels).heatmaps.flip(-1), atol=1e-4, rtol=0)


# --- a model trained on the sample data ------------------------------------------------------
@pytest.fixture(scope="module")
def sample_model(tiny_config, tiny_root, one_thread):
    """(DeepCNN trained 3 epochs on the tiny sample data with the project's Ray-free engine, 12
    val images as uint8, the class names)."""
    train, val = open_split(tiny_config, "train", tiny_root), open_split(tiny_config, "val", tiny_root)

    def tensors(ds):  # decoded once, not once per epoch
        images, targets = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(images), torch.tensor(targets)

    torch.manual_seed(0)
    model = build_model(tiny_config, 4)
    images, targets = tensors(train)
    loader = DataLoader(TensorDataset(images, targets), 32, shuffle=True)
    val_images, val_targets = tensors(val)
    val_loader = DataLoader(TensorDataset(val_images, val_targets), 64)
    history = list(engine.fit(model, loader, val_loader, tiny_config, CPU, num_classes=4))
    assert history[-1]["val_top1"] > 0.5  # better than chance (0.25): a model that learned
    return model.eval(), val_images[::4], class_names(val)


def test_maps_are_image_sized_in_unit_range_and_follow_the_class_asked_for(sample_model):
    model, images, _ = sample_model
    x = normalize(images)
    with torch.no_grad():
        probs = model(x).softmax(1)
    ranked = probs.argsort(1, descending=True)
    first, second = explain(model, x, ranked[:, 0]), explain(model, x, ranked[:, 1].tolist())
    for e in (first, second):
        assert e.heatmaps.shape == (len(images), 32, 32)
        assert torch.isfinite(e.heatmaps).all()
        assert e.heatmaps.min() >= 0 and e.heatmaps.max() <= 1
        peaks = e.heatmaps.amax((1, 2))
        assert ((peaks == 1) | (peaks == 0)).all()  # each map scaled to its own peak
    assert (first.heatmaps - second.heatmaps).abs().mean() > 0.05
    assert (
        first.classes.tolist() == ranked[:, 0].tolist() and second.classes.tolist() == ranked[:, 1].tolist()
    )
    torch.testing.assert_close(second.probabilities, probs.gather(1, ranked[:, 1:2])[:, 0])
    top1 = explain(model, x)  # no classes: each image's top-1
    assert top1.classes.tolist() == ranked[:, 0].tolist()
    torch.testing.assert_close(top1.heatmaps, first.heatmaps)


def test_explain_leaves_the_model_as_it_was(sample_model):
    """In training mode with one BatchNorm in eval mode and fc1 frozen, inside no_grad or
    inference_mode: the maps of eval mode all the same, and every module's mode, every
    requires_grad and every .grad as they were."""
    model, images, _ = sample_model
    x = normalize(images)
    expected = explain(model, x).heatmaps
    model.zero_grad(set_to_none=True)
    model.train()
    model.features[1].eval()  # a BatchNorm kept frozen while the rest trains
    model.fc1.requires_grad_(False)
    try:
        for context in (torch.no_grad(), torch.inference_mode()):
            with context:
                torch.testing.assert_close(explain(model, x).heatmaps, expected)
        assert model.training and model.dropout.training and not model.features[1].training
        assert [p.requires_grad for p in model.parameters()] == [
            not name.startswith("fc1.") for name, _ in model.named_parameters()
        ]
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.requires_grad_(True)
        model.eval()


def test_a_class_without_evidence_gets_a_zero_map_not_nan():
    torch.manual_seed(0)
    model = DeepCNN(3, (4, 8), fc_hidden=8).eval()
    with torch.no_grad():
        model.fc2.weight[1] = 0  # class 1's logit is its bias: no pixel moves it
    heatmaps = explain(model, torch.randn(2, 3, 16, 24), [1, 1]).heatmaps
    assert heatmaps.shape == (2, 16, 24) and (heatmaps == 0).all()


def test_explain_refuses_a_wrong_number_of_classes_or_an_unknown_class():
    model = DeepCNN(3, (4, 8), fc_hidden=8)
    with pytest.raises(ValueError, match=r"^explain needs one class per image: 2 images, 3 classes$"):
        explain(model, torch.randn(2, 3, 16, 16), [0, 1, 2])
    with pytest.raises(ValueError, match=r"^classes must lie in 0\.\.2, got \[0, 3\]$"):
        explain(model, torch.randn(2, 3, 16, 16), [0, 3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_the_gpu_gets_the_maps_it_gets_on_the_cpu(sample_model):
    """CPU images and a list of classes go to the model's device; the maps come back there."""
    model, images, _ = sample_model
    x = normalize(images)
    on_cpu = explain(model, x, [1] * len(x))
    try:
        on_gpu = explain(model.cuda(), x, [1] * len(x))
    finally:
        model.cpu()
    assert on_gpu.heatmaps.device.type == "cuda"
    torch.testing.assert_close(on_gpu.heatmaps.cpu(), on_cpu.heatmaps, atol=0.02, rtol=0)  # TF32 convolutions
    torch.testing.assert_close(on_gpu.probabilities.cpu(), on_cpu.probabilities, atol=1e-4, rtol=0)


# --- every architecture ----------------------------------------------------------------------
def _expected_layer(name: str, net: torch.nn.Module) -> torch.nn.Module:
    if name in ("deepcnn", "workshop"):
        return [m for m in net.features if isinstance(m, torch.nn.ReLU)][-1]  # before the last pool
    if name in ("resnet18", "resnet50", "wideresnet18"):
        return net.layer4
    if name == "alexnet":
        return net.features[11]  # the ReLU of conv5, before the last max-pool
    if name == "densenet161":
        return net.features  # ends in norm5
    raise AssertionError(f"{name}: a --model choice this test does not know; add its CAM layer")


@pytest.mark.parametrize("name", MODELS)
def test_every_model_gets_maps_from_its_last_conv_stage(name, one_thread):
    """Each --model choice: the layer is its last conv stage, and a non-square batch gives finite
    maps of the image's size in [0, 1]."""
    torch.manual_seed(0)
    net = build_model(TrainConfig(model=name), 3)
    assert cam_layer(net) is _expected_layer(name, net)
    e = explain(net, torch.randn(2, 3, 72, 104), [0, 2])
    assert e.heatmaps.shape == (2, 72, 104) and torch.isfinite(e.heatmaps).all()
    assert e.heatmaps.min() >= 0 and e.heatmaps.max() <= 1 and e.classes.tolist() == [0, 2]


def test_a_torchvision_model_inside_input_stats_is_explained_through_its_layer4(one_thread):
    torch.manual_seed(0)
    inner = resnet18(num_classes=5)
    net = InputStats(inner, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert cam_layer(net) is inner.layer4
    e = explain(net, torch.randn(1, 3, 96, 64), [4])
    assert e.heatmaps.shape == (1, 96, 64) and torch.isfinite(e.heatmaps).all() and e.heatmaps.max() == 1


def test_another_network_is_explained_through_its_last_child_with_a_conv():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
            self.body = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    net = Net()
    assert cam_layer(net) is net.body
    assert explain(net, torch.randn(1, 3, 20, 28)).heatmaps.shape == (1, 20, 28)
    with pytest.raises(
        ValueError, match=r"^Linear has no nn\.Conv2d layer to take a class activation map of$"
    ):
        cam_layer(torch.nn.Linear(4, 2))


# --- pictures ---------------------------------------------------------------------------------
def _grey_and_corner(h: int = 40, w: int = 60):
    """A grey PIL image, and a half-resolution map that is 1 in its top-right quarter, 0 elsewhere."""
    image = Image.new("RGB", (w, h), (128, 128, 128))
    heat = torch.zeros(h // 2, w // 2)
    heat[: h // 4, w // 4 :] = 1
    return image, heat


def test_overlay_paints_the_map_in_jet_over_the_image():
    image, heat = _grey_and_corner()
    out = overlay(image, heat)  # the map resized to the image
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    # jet(0) is dark blue (0, 0, 0.5), jet(1) dark red (0.5, 0, 0); half of each over grey 128
    assert out[2, 58].tolist() == [128, 64, 64]  # top-right: the evidence
    assert out[38, 2].tolist() == [64, 64, 128]  # bottom-left: none
    assert out[2, 2].tolist() == [64, 64, 128]  # top-left: none either (a transposed map puts red here)
    assert (overlay(torch.full((3, 40, 60), 128, dtype=torch.uint8), heat) == out).all()  # a uint8 tensor too
    with pytest.raises(ValueError, match=r"^a 20x30 heatmap does not fit a 60x40 image"):
        overlay(image.transpose(Image.Transpose.ROTATE_90), heat)


def test_overlay_png_is_the_overlay_at_the_images_size():
    image, heat = _grey_and_corner()
    data = overlay_png(image, heat)
    assert data.startswith(PNG)
    assert (np.asarray(Image.open(io.BytesIO(data))) == overlay(image, heat)).all()


def test_cam_figure_shows_each_image_beside_its_overlay_titled_with_class_and_probability():
    image, heat = _grey_and_corner()
    items = [(image, heat, "/f/forest/broadleaf", 0.957), (image, heat * 0, "/b/beach", 0.5)] * 2
    fig = cam_figure(items[:3], columns=2)
    panels = fig.subfigs
    assert [p._suptitle.get_text() for p in panels[:3]] == [
        "forest/broadleaf  95.7%",
        "beach  50.0%",
        "forest/broadleaf  95.7%",
    ]
    for panel, (img, h, _, _) in zip(panels, items[:3]):
        left, right = panel.axes
        assert (left.images[0].get_array() == np.asarray(img)).all()
        assert (right.images[0].get_array() == overlay(img, h)).all()
    assert cam_png(items).startswith(PNG)
