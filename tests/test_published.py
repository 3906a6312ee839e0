"""The published Places365 models (issue #28): files in their format (Python 2.7 / PyTorch 0.2
pickles in torch's legacy format, DataParallel's ``module.``, DenseNet's old names) become
checkpoints that predict exactly what torchvision's model with those weights predicts under the
official transform, through predict.py, the Serve replica (CPU and device decode) and evaluate;
the eval transform belongs to the checkpoint (old checkpoints load as before); indoor/outdoor by
the official rule; the ten-crop protocol. The real files cannot be downloaded here: each test file
holds random weights, built in the same format."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import assert_user_error, run_script, untrained_checkpoint
from PIL import Image
from torch import nn
from torchvision import transforms as T

from placesnet.checkpoint import load_checkpoint, read_meta, verify_checkpoint
from placesnet.config import Preprocess, TrainConfig, UserError
from placesnet.data.scenes import official_categories
from placesnet.published import import_published, torchvision_names

IO_FILE = Path(__file__).parents[1] / "placesnet" / "assets" / "IO_places365.txt"  # the official one
# The official preprocessing (CSAILVision/places365, run_placesCNN_basic.py), written out here
# rather than taken from the package.
OFFICIAL = T.Compose(
    [
        T.Resize((256, 256)),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]
)


# --- files in the published format -------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2.7 with PyTorch 0.2 did: ``str`` as byte strings (SHORT_BINSTRING, which
    Python 3 decodes with the ``encoding`` it is given), tensors through ``_rebuild_tensor``,
    OrderedDicts as a list of pairs, storages saved from the GPU (location cuda:0)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, protocol=2):
        super().__init__(file, protocol)
        self._pid = lambda obj: None

    def _save_str(self, obj: str) -> None:
        data = obj.encode("latin1")
        self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        self.memoize(obj)

    dispatch[str] = _save_str

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            # a typed storage, as PyTorch 0.2's (built directly: tensor.storage() warns it is deprecated)
            storage = torch.TypedStorage(wrap_storage=obj.untyped_storage(), dtype=obj.dtype, _internal=True)
            return torch._utils._rebuild_tensor, (
                storage,
                obj.storage_offset(),
                tuple(obj.shape),
                obj.stride(),
            )
        if isinstance(obj, collections.OrderedDict):
            return collections.OrderedDict, ([[k, v] for k, v in obj.items()],)
        return NotImplemented

    @property
    def persistent_id(self):
        return self._pid

    @persistent_id.setter
    def persistent_id(self, fn):  # torch's legacy save sets it: saved "on the GPU"
        def on_gpu(obj):
            pid = fn(obj)
            return pid if pid is None else (*pid[:3], "cuda:0", *pid[4:])

        self._pid = on_gpu


class _Py2Pickle:
    """The pickle module torch.save is given."""

    Pickler = _Py2Pickler

    @staticmethod
    def dump(obj, file, protocol=2):
        _Py2Pickler(file, protocol).dump(obj)


def _official_names(arch: str, state: dict) -> collections.OrderedDict:
    """``state`` (torchvision's names) under the names of the published files: DataParallel's
    ``module.`` (AlexNet: around its features only), DenseNet's pre-0.4 ``norm.1``, and no
    ``num_batches_tracked`` (BatchNorm had none in PyTorch 0.2)."""
    out = collections.OrderedDict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if arch == "alexnet":
            key = key.replace("features.", "features.module.", 1)
        else:
            key = "module." + key
        if arch == "densenet161":
            for old in ("norm", "relu", "conv"):
                for i in ("1", "2"):
                    key = key.replace(f".{old}{i}.", f".{old}.{i}.") if "denselayer" in key else key
        out[key] = value
    return out


def reference_model(arch: str) -> nn.Module:
    """The published architecture, with random weights: torchvision's, and for wideresnet18 the
    one of CSAILVision/places365's wideresnet.py (ResNet-18, no max-pool, AvgPool2d(14))."""
    if arch == "wideresnet18":
        net = torchvision.models.resnet18(num_classes=365)
        net.maxpool, net.avgpool = nn.Identity(), nn.AvgPool2d(14)
    else:
        net = getattr(torchvision.models, arch)(num_classes=365)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so they must load
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return net.eval()


def write_published(path: Path, arch: str, seed: int = 0, arch_label: str | None = None) -> nn.Module:
    """A file in the format of ``<arch>_places365.pth.tar`` at ``path``, with random weights;
    returns the torchvision model that holds them."""
    torch.manual_seed(seed)
    net = reference_model(arch)
    checkpoint = {
        "epoch": 90,
        "arch": arch_label or arch,
        "state_dict": _official_names(arch, net.state_dict()),
        "best_prec1": 54.74,
    }
    torch.save(
        checkpoint, path, pickle_module=_Py2Pickle, pickle_protocol=2, _use_new_zipfile_serialization=False
    )
    return net


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """``get(arch)``: (the published-format file, its reference model, the imported checkpoint),
    built once per module and arch."""
    tmp, made = tmp_path_factory.mktemp("published"), {}

    def get(arch: str):
        if arch not in made:
            file = tmp / f"{arch}_places365.pth.tar"
            net = write_published(file, arch)
            made[arch] = (file, net, import_published(file, arch, tmp / f"ckpt_{arch}"))
        return made[arch]

    return get


def photo(seed: int, size=(333, 250)) -> Image.Image:
    """A smooth RGB picture with some noise (not square, so the resize matters)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * x + seed), np.cos(4 * y - seed), np.sin(3 * (x + y))], -1)
    pixels = (base * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def official_probabilities(net: nn.Module, images: list[Image.Image]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.softmax(net(torch.stack([OFFICIAL(img) for img in images])), 1)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _same_predictions(ours: torch.Tensor, theirs: torch.Tensor, k: int = 10) -> None:
    assert torch.equal(ours.topk(k).indices, theirs.topk(k).indices)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


# --- the key mapping ---------------------------------------------------------------------------


def test_keys_get_torchvisions_names():
    """``module.`` goes wherever it stands; DenseNet's norm.1/relu.1/conv.1 (and .2) are joined;
    other names are left alone (DenseNet's norm0, norm5 and transition convs, AlexNet's indices)."""
    names = {
        "module.conv1.weight": "conv1.weight",
        "module.layer1.0.downsample.1.running_var": "layer1.0.downsample.1.running_var",
        "features.module.0.weight": "features.0.weight",
        "features.module.10.bias": "features.10.bias",
        "classifier.6.weight": "classifier.6.weight",
        "module.features.denseblock1.denselayer1.norm.1.bias": "features.denseblock1.denselayer1.norm1.bias",
        "module.features.denseblock4.denselayer9.relu.2.x": "features.denseblock4.denselayer9.relu2.x",
        "module.features.transition1.conv.weight": "features.transition1.conv.weight",
        "module.features.norm5.running_mean": "features.norm5.running_mean",
    }
    assert list(torchvision_names(dict.fromkeys(names))) == list(names.values())


@pytest.mark.parametrize("arch", ["resnet18", "alexnet", pytest.param("densenet161", marks=pytest.mark.slow)])
def test_an_imported_model_predicts_what_torchvision_predicts_under_the_official_transform(published, arch):
    """The file's weights, renamed and loaded strictly, in a checkpoint of this project: its
    predictions (load_checkpoint + predict's core) are torchvision's model with those weights
    under Resize((256, 256)), CenterCrop(224), ImageNet mean/std, on photos of other sizes."""
    from placesnet.evaluation import image_probabilities

    file, net, ckpt = published(arch)
    assert verify_checkpoint(ckpt) is None
    loaded = load_checkpoint(ckpt)
    assert loaded.classes == official_categories() and loaded.note is None
    images = [photo(1), photo(2, (180, 420))] if arch != "densenet161" else [photo(1)]  # (its CPU time)
    _same_predictions(image_probabilities(loaded, images), official_probabilities(net, images))


def test_densenets_old_names_import(published):
    """DenseNet161's file (pre-0.4 norm.1/relu.1/conv.1 under module.) loads strictly: every
    weight and statistic is the file's (its forward pass is compared in the slow test above)."""
    _, net, ckpt = published("densenet161")
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}.keys() == {
        f"net.{k}" for k in net.state_dict() if not k.endswith("num_batches_tracked")
    }
    assert all(
        torch.equal(state[f"net.{k}"], v) for k, v in net.state_dict().items() if "num_batches" not in k
    )


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "wideresnet18"])
def test_the_other_published_architectures_import_and_predict_alike(published, arch):
    from placesnet.evaluation import image_probabilities

    _, net, ckpt = published(arch)
    loaded = load_checkpoint(ckpt)
    _same_predictions(image_probabilities(loaded, [photo(3)]), official_probabilities(net, [photo(3)]))


def test_the_checkpoint_records_its_source_licence_citation_and_transform(published):
    file, _, ckpt = published("resnet18")
    source = read_meta(ckpt)["source"]
    data = file.read_bytes()
    assert source["file"] == "resnet18_places365.pth.tar" and source["bytes"] == len(data)
    assert source["sha256"] == hashlib.sha256(data).hexdigest()
    assert (source["arch"], source["file_arch"], source["file_epoch"]) == ("resnet18", "resnet18", 90)
    assert source["reported_top1"] == pytest.approx(54.74)
    assert source["licence"].startswith("CC BY")
    assert "Places: A 10 million Image Database for Scene Recognition" in source["citation"]
    assert "Zhou" in source["citation"] and "2017" in source["citation"] and "TPAMI" in source["citation"]
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["model"], config["image_size"], config["dataset"]) == ("resnet18", 224, "places365")
    assert config["preprocess"] == {
        "resize": [256, 256],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }


def test_a_file_whose_keys_do_not_fit_is_one_line_naming_them(published, tmp_path):
    file, _, _ = published("resnet18")
    with pytest.raises(UserError) as wrong:
        import_published(file, "resnet50", tmp_path / "r50")
    message = str(wrong.value)
    assert message.startswith("resnet18_places365.pth.tar does not fit --arch resnet50 with 365 classes: ")
    assert "missing layer1.0.conv3.weight, layer1.0.bn3.weight, layer1.0.bn3.bias (+" in message
    assert "wrong shape layer1.0.conv1.weight [64, 64, 3, 3] (expected [64, 64, 1, 1])" in message
    assert "the file says arch 'resnet18'" in message and "\n" not in message
    assert not (tmp_path / "r50").exists()  # nothing written
    # the names as they are in the file, not renamed: every key is unexpected
    from placesnet.published import _misfit, read_published

    state = read_published(file)["state_dict"]

    net = torchvision.models.resnet18(num_classes=365)
    assert "unexpected module.conv1.weight, module.bn1.weight" in _misfit(state, net.state_dict())


def test_files_that_are_not_published_models_are_one_line_each(tmp_path, published):
    file, _, ckpt = published("resnet18")
    cases = {
        "text.pth.tar": (b"not a model at all", "not a Places365 model file: cannot load"),
        "list.pth": (None, "holds no state_dict of tensors (expected a dict with epoch, arch, state_dict"),
        "code.pth.tar": (pickle.dumps(_Evil(tmp_path / "ran")), "not a Places365 model file: cannot load"),
        "cut.pth.tar": (file.read_bytes()[:5000], "not a Places365 model file: cannot load"),
        "short.pth.tar": (file.read_bytes()[:-1000], "not a Places365 model file: cannot load"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        if data is None:
            torch.save([torch.zeros(2)], path)
        else:
            path.write_bytes(data)
        with pytest.raises(UserError) as refused:
            import_published(path, "resnet18", tmp_path / f"out_{name}")
        assert expected in str(refused.value) and "\n" not in str(refused.value), (name, str(refused.value))
    assert not (tmp_path / "ran").exists()  # the pickle's code did not run
    with pytest.raises(UserError, match="no such file"):
        import_published(tmp_path / "missing.pth.tar", "resnet18", tmp_path / "x")
    with pytest.raises(UserError, match="already exists and is not an empty directory"):
        import_published(file, "resnet18", ckpt)


class _Evil:
    """A pickle that would make a directory when loaded without weights_only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.path),)


def test_python2_byte_strings_are_read_as_latin1(tmp_path, capsys):
    """A byte string that is not UTF-8 (the UnicodeDecodeError of the Places365 issues) loads;
    the file's own arch name is kept, and import_weights.py notes it when it differs."""
    file = tmp_path / "resnet18_places365.pth.tar"
    write_published(file, "resnet18", arch_label="r\xe9snet18")
    with pytest.raises(UnicodeDecodeError):
        torch.load(file, map_location="cpu", weights_only=True)  # Python 3's default: utf-8
    from rayjobs import import_weights

    assert import_weights.main([str(file), "--arch", "resnet18", "--out", str(tmp_path / "ckpt")]) == 0
    assert read_meta(tmp_path / "ckpt")["source"]["file_arch"] == "r\xe9snet18"
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("imported resnet18 (365 Places365 classes) from resnet18_places365.pth.tar")
    assert "note: the file names its arch 'résnet18'" in out
    assert f"checkpoint: {tmp_path / 'ckpt'}" in lines and any(
        line.startswith("licence:    CC BY") for line in lines
    )
    refused = run_script("rayjobs/import_weights.py", file, "--arch", "alexnet", "--out", tmp_path / "a")
    assert_user_error(refused, "does not fit --arch alexnet", "missing features.0.weight")


# --- a first-class checkpoint: predict.py and the Serve replica ----------------------------------


def test_predict_cli_adds_the_environment_by_the_official_rule(published, tmp_path):
    """predict.py on an imported model: the official top-5 and, from the top 10, indoor or
    outdoor as the official script computes it (labels 0/1, mean below 0.5 is indoor)."""
    _, net, ckpt = published("resnet18")
    images = [photo(4), photo(5, (500, 300))]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"p{i}.png")
        img.save(paths[-1])
    proc = run_script("rayjobs/predict.py", "--checkpoint", ckpt, "--json", *paths)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]  # (the text output: test_predict_text_...)
    probs = official_probabilities(net, images)
    io = [int(line.split()[1]) - 1 for line in IO_FILE.read_text().splitlines()]  # 0 indoor, 1 outdoor
    for result, p in zip(results, probs):
        assert [r["class_index"] for r in result["predictions"]] == p.topk(5).indices.tolist()
        official = (
            "indoor" if np.mean(np.array(io)[p.argsort(descending=True)[:10].numpy()]) < 0.5 else "outdoor"
        )
        assert result["environment"] == official


def test_predict_text_output_says_indoor_or_outdoor_only_for_places365_classes(
    published, tiny_config, tmp_path, capsys
):
    from placesnet.environment import environment, io_labels
    from rayjobs import predict

    _, net, ckpt = published("resnet18")
    photo(6).save(tmp_path / "a.png")
    assert predict.main(["--checkpoint", str(ckpt), str(tmp_path / "a.png")]) == 0
    want = environment(official_probabilities(net, [photo(6)])[0], io_labels(official_categories()))
    assert capsys.readouterr().out.splitlines()[-1] == f"  environment: {want}"
    own = untrained_checkpoint(tmp_path / "own", tiny_config)
    assert predict.main(["--checkpoint", str(own), "--json", str(tmp_path / "a.png")]) == 0
    assert "environment" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def replicas(published):
    """A CPU replica of the imported resnet18, and one whose uploads go through the device decode
    (gpudecode.decode_uploads, here on the CPU; a GPU replica's path)."""
    from placesnet.serve.options import ServeOptions
    from placesnet.serve.replica import Replica

    _, net, ckpt = published("resnet18")
    options = ServeOptions(num_cpus=1, max_batch_size=4)
    cpu, dev = Replica(str(ckpt), options), Replica(str(ckpt), options)
    dev.gpu_decode = True
    return cpu, dev, net


def test_the_replica_answers_with_the_checkpoints_transform_and_the_environment(replicas):
    """Serve's predict core, one image and several: the official predictions of each upload (as
    PIL decodes it) and its environment; the device decode path gives the same classes."""
    from placesnet.environment import environment, io_labels
    from placesnet.images import decode_image
    from placesnet.serve.replica import Upload

    cpu, dev, net = replicas
    uploads = [Upload(f"p{i}.jpg", jpeg(photo(10 + i, (300 + 40 * i, 260)))) for i in range(3)]
    expected = official_probabilities(net, [decode_image(u.data) for u in uploads])
    labels = io_labels(official_categories())
    alone = asyncio.run(cpu.predict(uploads[:1], 5)).results[0]
    together = asyncio.run(cpu.predict(uploads, 5)).results
    on_device = asyncio.run(dev.predict(uploads, 5)).results
    for i, p in enumerate(expected):
        for result in [together[i], on_device[i], *([alone] if i == 0 else [])]:
            assert [r["class_index"] for r in result.predictions] == p.topk(5).indices.tolist()
        want = environment(p, labels)
        assert together[i].environment == on_device[i].environment == want
        assert together[i].answer() == {"predictions": together[i].predictions, "environment": want}
        assert [r["probability"] for r in together[i].predictions] == pytest.approx(
            p.topk(5).values.tolist(), abs=1e-6
        )
    assert list(cpu.info()["config"]["preprocess"]["resize"]) == [256, 256]


# --- the project's own checkpoints: as before ----------------------------------------------------


def test_a_checkpoint_without_the_new_field_loads_and_predicts_as_before(tiny_config, tmp_path):
    """A checkpoint from before issue #28 (no ``preprocess`` in config.json): the same model (no
    InputStats, the same state_dict keys) and the same eval transform (resize the shorter side,
    centre crop, Normalize 0.5), so the same predictions; no environment for its 4 classes."""
    from placesnet.data.transforms import ResizeCenterCrop, eval_transform, normalize
    from placesnet.data.views import describe, single_view
    from placesnet.evaluation import image_probabilities
    from placesnet.serve.options import ServeOptions
    from placesnet.serve.replica import Replica, Upload

    ckpt = untrained_checkpoint(tmp_path / "old", tiny_config)
    config = json.loads((ckpt / "config.json").read_text())
    del config["preprocess"]
    (ckpt / "config.json").write_text(json.dumps(config))
    meta = read_meta(ckpt)
    data = (ckpt / "config.json").read_bytes()
    meta["files"]["config.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    loaded = load_checkpoint(ckpt)
    assert loaded.config == tiny_config and loaded.config.preprocess is None
    assert type(loaded.model).__name__ == "DeepCNN"
    assert list(loaded.model.state_dict()) == list(torch.load(ckpt / "model.pt", weights_only=True))
    assert isinstance(single_view(loaded.config), ResizeCenterCrop) and single_view(loaded.config).size == 32
    assert (
        describe(loaded.config)
        == "resize the shorter side to 32, centre crop 32, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)"
    )
    images = [photo(7), photo(8, (90, 200))]
    with torch.inference_mode():
        before = torch.softmax(
            loaded.model(normalize(torch.stack([eval_transform(32)(i) for i in images]))), 1
        )
    assert torch.equal(image_probabilities(loaded, images), before)
    replica = Replica(str(ckpt), ServeOptions(num_cpus=1))
    answer = asyncio.run(replica.predict([Upload("a.jpg", jpeg(images[0]))], 2)).results[0]
    assert answer.environment is None and answer.answer() == {"predictions": answer.predictions}
    assert repr(replica.current().transform) == "ResizeCenterCrop(32)"


def test_a_project_resnet18_is_not_wrapped_and_the_preprocess_round_trips():
    from placesnet.model import build_model

    assert type(build_model(TrainConfig(model="resnet18"), 4)).__name__ == "ResNet"
    official = Preprocess((256, 256), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cfg = TrainConfig(model="resnet18", image_size=224, preprocess=official)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg) and again.preprocess == official
    with pytest.raises(UserError, match="--image-size 300 is larger than the images it is cropped from"):
        cfg.replace(image_size=300).validate()
    with pytest.raises(ValueError, match="3 means and 3 stds > 0"):
        Preprocess((256, 256), (0.5, 0.5, 0.5), (0.2, 0.0, 0.2))


# --- indoor or outdoor ---------------------------------------------------------------------------


def test_the_official_io_labels_and_rule():
    """161 indoor and 204 outdoor categories, in the official order; the mean label of the top 10
    below 1.5 is indoor, exactly 1.5 (5 and 5) outdoor; the top 5 alone do not decide."""
    from placesnet.environment import environment, io_labels

    labels = io_labels(official_categories())
    assert labels.tolist().count(1) == 161 and labels.tolist().count(2) == 204
    assert [line.split()[0] for line in IO_FILE.read_text().splitlines()] == official_categories()
    assert (
        io_labels(official_categories()[:4]) is None
        and io_labels(list(reversed(official_categories()))) is None
    )
    indoor = [i for i, v in enumerate(labels.tolist()) if v == 1]
    outdoor = [i for i, v in enumerate(labels.tolist()) if v == 2]

    def ranked(*classes: int) -> torch.Tensor:
        probs = torch.full((365,), 1e-4)
        for rank, c in enumerate(classes):
            probs[c] = 1.0 - 0.01 * rank
        return probs

    assert environment(ranked(*indoor[:6], *outdoor[:4]), labels) == "indoor"
    assert environment(ranked(*indoor[:5], *outdoor[:5]), labels) == "outdoor"  # a tie is outdoor
    assert environment(ranked(*outdoor[:4], *indoor[:6]), labels) == "indoor"  # the order does not matter
    # top 5: 3 indoor (mean 1.4); top 10: 3 indoor and 7 outdoor (mean 1.7)
    assert environment(ranked(*indoor[:3], *outdoor[:7]), labels) == "outdoor"
    # the 11th class does not vote
    assert environment(ranked(*indoor[:6], *outdoor[:4], *outdoor[4:20]), labels) == "indoor"


# --- the ten-crop protocol -----------------------------------------------------------------------


def test_ten_crops_are_the_official_ten():
    """On a PIL image: torchvision's TenCrop of Resize((256, 256)), as uint8 tensors, in its order."""
    from placesnet.data.views import ten_crops
    from placesnet.published import published_config

    img = photo(9, (410, 300))
    expected = torch.stack([T.PILToTensor()(c) for c in T.TenCrop(224)(T.Resize((256, 256))(img))])
    assert torch.equal(ten_crops(published_config("resnet18"))(img), expected)


@pytest.fixture(scope="module")
def cropping_checkpoint(tiny_config, tmp_path_factory):
    """A small random model of the tiny data whose transform crops, as an imported one's does:
    resize to 40x40, crop 32, ImageNet mean/std. Its last layer is scaled up, so that its
    probabilities differ from image to image and from crop to crop (a fresh one's are all near 1/4)."""
    from placesnet.checkpoint import save_checkpoint
    from placesnet.model import build_model

    official = Preprocess((40, 40), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cfg = tiny_config.replace(preprocess=official)
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    with torch.no_grad():
        model.net.fc2.weight.mul_(30)
    directory = tmp_path_factory.mktemp("crop") / "ckpt"
    classes = ["/b/beach", "/d/desert/sand", "/f/field/wild", "/f/forest/broadleaf"]
    save_checkpoint(directory, model=model, config=cfg, classes=classes, epoch=0, metrics={}, history=[])
    return directory


def test_ten_crop_evaluation_averages_the_probabilities_of_the_ten_crops(cropping_checkpoint, tiny_root):
    """evaluate_checkpoint(ten_crop=True) against the protocol written out: each val image's ten
    crops through the model, softmax, mean; top-1, top-5 and the loss of that mean."""
    import torch.nn.functional as F

    from placesnet.data.places import open_split
    from placesnet.evaluation import evaluate_checkpoint

    loaded = load_checkpoint(cropping_checkpoint)
    ten = evaluate_checkpoint(loaded, tiny_root, torch.device("cpu"), ten_crop=True, batch_size=50)
    one = evaluate_checkpoint(loaded, tiny_root, torch.device("cpu"))
    ds = open_split(loaded.config, "val", tiny_root, transform=lambda image: image)
    means, targets = [], torch.tensor(ds.targets)
    with torch.inference_mode():
        for image, _ in ds:
            crops = torch.stack(
                T.functional.ten_crop(T.functional.resize(image, [40, 40], antialias=True), 32)
            )
            x = crops.float() / 255
            x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
                [0.229, 0.224, 0.225]
            )[:, None, None]
            means.append(torch.softmax(loaded.model.net(x), 1).mean(0))
    probs = torch.stack(means)
    assert ten["val_images"] == one["val_images"] == len(ds) == 48
    assert ten["val_top1"] == int((probs.argmax(1) == targets).sum()) / 48
    assert ten["val_top5"] == int((probs.topk(4, 1).indices == targets[:, None]).any(1).sum()) / 48
    assert ten["val_loss"] == pytest.approx(F.nll_loss(probs.log(), targets).item(), rel=1e-5)
    assert ten["val_loss"] != pytest.approx(one["val_loss"], rel=1e-4)  # not the single view's
    assert (ten["protocol"], one["protocol"]) == ("ten-crop", "single view")
    assert (
        one["transform"]
        == "resize to 40x40, centre crop 32, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"
    )
    assert ten["confusion"].sum() == 48


def test_evaluate_cli_names_the_protocol_and_refuses_ten_crop_without_a_crop(
    cropping_checkpoint, tiny_config, tmp_path
):
    proc = run_script(
        "rayjobs/evaluate.py",
        "--checkpoint",
        cropping_checkpoint,
        "--ten-crop",
        "--out",
        tmp_path / "ten",
        "--gallery",
        0,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()[1:]  # after the sample data's note
    assert lines[0].startswith("val (ten-crop): 48 images, top-1 ")
    assert lines[1] == (
        "  transform: resize to 40x40, ten 32 px crops (4 corners + centre, and mirrored), mean "
        "(0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); class probabilities averaged"
    )
    report = json.loads((tmp_path / "ten" / "evaluation.json").read_text())
    assert report["protocol"] == "ten-crop" and report["transform"] == lines[1].removeprefix("  transform: ")
    own = untrained_checkpoint(tmp_path / "own", tiny_config)
    refused = run_script("rayjobs/evaluate.py", "--checkpoint", own, "--ten-crop")
    assert_user_error(refused, "--ten-crop: this checkpoint's images are resized to its input size (32 px)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_imported_model_and_ten_crops_answer_as_on_the_cpu(
    published, cropping_checkpoint, tiny_root
):
    """A GPU replica's nvJPEG decode (the transform on the GPU) gives the CPU decode's top-5;
    ten-crop evaluation with AMP and channels_last counts the CPU's images and nearly its top-1."""
    from placesnet.evaluation import evaluate_checkpoint
    from placesnet.serve.options import ServeOptions
    from placesnet.serve.replica import Replica, Upload

    _, _, ckpt = published("resnet18")
    uploads = [Upload(f"p{i}.jpg", jpeg(photo(20 + i))) for i in range(3)]
    gpu, cpu = (Replica(str(ckpt), ServeOptions(num_cpus=1, num_gpus=1)) for _ in range(2))
    assert gpu.gpu_decode and gpu.device.type == "cuda"
    cpu.gpu_decode = False  # PIL's decode and resize on the CPU, the model on the GPU
    a, b = (asyncio.run(r.predict(uploads, 5)).results for r in (cpu, gpu))
    for ra, rb in zip(a, b, strict=True):
        assert [p["class_index"] for p in ra.predictions] == [p["class_index"] for p in rb.predictions]
        assert ra.environment == rb.environment
    ten = {
        device: evaluate_checkpoint(
            load_checkpoint(cropping_checkpoint, device), tiny_root, device, ten_crop=True
        )
        for device in (torch.device("cpu"), torch.device("cuda"))
    }
    on_cpu, on_gpu = ten.values()
    assert on_cpu["val_images"] == on_gpu["val_images"] == 48
    assert abs(on_cpu["val_top1"] - on_gpu["val_top1"]) <= 2 / 48  # bf16: a near tie may flip


@pytest.mark.slow
def test_ten_crop_evaluation_on_two_ray_workers_is_the_one_in_this_process(
    cropping_checkpoint, ray_head, tmp_path
):
    """evaluate.py --ten-crop on 1 worker (this process, no Ray) and on 2 Ray Train workers, each
    averaging its shard's crops: the same images, top-1, top-5, loss, protocol and transform, and
    the same most confident mistakes."""
    reports = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        proc = run_script(
            "rayjobs/evaluate.py",
            *("--checkpoint", cropping_checkpoint, "--ten-crop", "--num-workers", workers),
            *("--out", out, "--gallery", 8),
            env=ray_head.env,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        reports[workers] = json.loads((out / "evaluation.json").read_text())
    one, two = reports[1], reports[2]
    assert (one["num_workers"], two["num_workers"]) == (1, 2)
    assert one["protocol"] == two["protocol"] == "ten-crop" and one["transform"] == two["transform"]
    for key in ("val_images", "val_top1", "val_top5", "confused_pairs"):
        assert one[key] == two[key], key
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-6)
    assert len(one["mistakes"]) == 8

    def mistakes(report):
        return [(m["index"], m["image"], m["true"], m["predicted"]) for m in report["mistakes"]]

    assert mistakes(one) == mistakes(two)
    assert [m["probability"] for m in one["mistakes"]] == pytest.approx(
        [m["probability"] for m in two["mistakes"]], rel=1e-5
    )


def test_predict_over_http_says_indoor_or_outdoor_per_image_only_for_places365s_classes(
    replicas, tiny_config, tmp_path
):
    """POST /predict (the deployment's route, tests/test_serve_core.py's _http): the imported
    model's answer has "environment" for one image, and in each of "results" for several, by the
    official rule; a 4-class model's answers have no such key."""
    from test_serve_core import _http

    from placesnet.environment import environment, io_labels
    from placesnet.images import decode_image
    from placesnet.serve.options import ServeOptions
    from placesnet.serve.replica import Replica

    cpu, _, net = replicas
    images = [jpeg(photo(40 + i, (280 + 30 * i, 240))) for i in range(3)]
    labels = io_labels(official_categories())
    want = [environment(p, labels) for p in official_probabilities(net, [decode_image(i) for i in images])]
    status, alone, _ = _http(cpu, images[:1])
    assert status == 200 and alone["environment"] == want[0]
    status, together, _ = _http(cpu, images)
    assert status == 200 and [r["environment"] for r in together["results"]] == want
    assert "environment" not in together  # per image, not per request

    own = Replica(str(untrained_checkpoint(tmp_path / "own", tiny_config)), ServeOptions(num_cpus=1))
    status, alone, _ = _http(own, images[:1])
    assert status == 200 and alone["predictions"] and "environment" not in alone
    status, together, _ = _http(own, images)
    assert status == 200 and all(r["predictions"] and "environment" not in r for r in together["results"])
