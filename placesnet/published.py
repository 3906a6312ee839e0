"""The published Places365 models (CSAILVision/places365, http://places2.csail.mit.edu/models_places365/)
as checkpoints of this project: :func:`import_published` reads one of their files and writes a
checkpoint that load_checkpoint, predict, evaluate and Serve load like any other.

Their files (``resnet18_places365.pth.tar``, ...) are not tar archives: each is a dict
``{"epoch", "arch", "state_dict", "best_prec1"}`` saved by PyTorch 0.2 under Python 2.7 in torch's
legacy (non-zip) format. It is read with ``weights_only=True`` (no code runs) and latin1 for its
Python 2 byte strings (the UnicodeDecodeError Python 3 users meet otherwise). Its keys carry
DataParallel's ``module.`` (``module.conv1.weight``; AlexNet wraps only its features:
``features.module.0.weight``), and DenseNet161's are pre-0.4 names (``norm.1``) that torchvision
now calls ``norm1``: :func:`torchvision_names` maps both.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from placesnet.config import Preprocess, TrainConfig, UserError

# The architectures of the published files (wideresnet18 is ResNet-18 without its max-pool, see
# placesnet/model.py), each a TrainConfig model.
ARCHS = ("resnet18", "resnet50", "wideresnet18", "alexnet", "densenet161")
# The official eval transform: Resize((256, 256)), CenterCrop(224), ImageNet mean/std.
IMAGE_SIZE = 224
OFFICIAL = Preprocess(resize=(256, 256), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LICENCE = "CC BY (Creative Commons Attribution): the weights of the Places365 models, CSAILVision/places365"
CITATION = (
    'B. Zhou, A. Lapedriza, A. Khosla, A. Oliva and A. Torralba, "Places: A 10 million Image Database '
    'for Scene Recognition", IEEE Transactions on Pattern Analysis and Machine Intelligence (TPAMI), 2017'
)
FILE_KEYS = ("epoch", "arch", "state_dict", "best_prec1")
_OLD_DENSENET = re.compile(r"\.(norm|relu|conv)\.([12])\.")  # denselayer's norm.1 -> norm1


def read_published(path: Path) -> dict:
    """The dict a published file holds, its state_dict's values tensors. UserError (one line) for a
    missing file or one that is not such a dict."""
    import torch

    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        with warnings.catch_warnings():
            # torch warns that pickle arguments are ignored with weights_only; for the legacy
            # format they are not: latin1 reaches its Python 2 strings (tests/test_published.py)
            warnings.filterwarnings("ignore", "pickle_load_args only works")
            found = torch.load(path, map_location="cpu", weights_only=True, encoding="latin1")
    except Exception as e:  # not a torch file, truncated, or a pickle that would run code
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else "no details"
        raise UserError(
            f"not a Places365 model file: cannot load {path} ({type(e).__name__}: {first})"
        ) from None
    state = found.get("state_dict") if isinstance(found, dict) else None
    tensors = isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors:
        raise UserError(
            f"not a Places365 model file: {path} holds no state_dict of tensors (expected a dict with "
            f"{', '.join(FILE_KEYS)})"
        )
    return found


def torchvision_names(state: dict) -> dict:
    """``state`` with torchvision's key names: every ``module.`` dropped, wherever it stands, and
    DenseNet's old ``norm.1``/``relu.1``/``conv.1`` (and ``.2``) joined to ``norm1``, ..."""
    out = {}
    for key, value in state.items():
        name = ".".join(part for part in key.split(".") if part != "module")
        out[_OLD_DENSENET.sub(r".\1\2.", name)] = value
    return out


def _misfit(state: dict, expected: dict) -> str | None:
    """What keeps ``state`` from loading strictly into a model whose state_dict is ``expected``:
    the first few missing, unexpected and wrongly shaped keys; None if it fits. num_batches_tracked
    (BatchNorm buffers since PyTorch 0.4) may be missing: BatchNorm fills them in."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    parts = [
        f"{label} {_first(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if keys
    ]
    return "; ".join(parts) or None


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _number(value) -> float | None:
    """A plain float for JSON (best_prec1 may be a one-element tensor), None if it is none."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def published_config(arch: str) -> TrainConfig:
    """The config of an imported ``arch``: Places365's data, the official eval transform."""
    return TrainConfig(dataset="places365", model=arch, image_size=IMAGE_SIZE, preprocess=OFFICIAL).validate()


def import_published(path: str | Path, arch: str, out: str | Path) -> Path:
    """Read the published file ``path``, load its weights strictly into torchvision's ``arch``
    with Places365's 365 categories, and write a checkpoint into ``out`` (a new or empty directory).
    Its meta.json's ``source`` names the file, its size and sha256, its arch and epoch, the top-1
    its authors reported, the licence and the citation. UserError (one line) for a file that is not
    a published model, or whose keys do not fit ``arch`` (naming the first that do not)."""
    from placesnet.checkpoint import save_checkpoint
    from placesnet.checkpoint_files import _fingerprint
    from placesnet.data.scenes import official_categories
    from placesnet.model import build_model

    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    path, out = Path(path).expanduser().resolve(), Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty directory: give a new one")
    found = read_published(path)
    state = torchvision_names(found["state_dict"])
    config, classes = published_config(arch), official_categories()
    model = build_model(config, len(classes))
    problem = _misfit(state, model.net.state_dict())
    if problem:
        raise UserError(
            f"{path.name} does not fit --arch {arch} with {len(classes)} classes: {problem}"
            + (f" (the file says arch {found['arch']!r})" if found.get("arch") not in (None, arch) else "")
        )
    model.net.load_state_dict(state)
    epoch = found.get("epoch")
    source = {
        "file": path.name,
        **_fingerprint(path),
        "arch": arch,
        "file_arch": found.get("arch"),
        "file_epoch": epoch if isinstance(epoch, int) else None,
        "reported_top1": _number(found.get("best_prec1")),  # the authors', in percent (one centre crop)
        "licence": LICENCE,
        "citation": CITATION,
    }
    return save_checkpoint(
        out,
        model=model,
        config=config,
        classes=classes,
        epoch=max(epoch - 1, 0) if isinstance(epoch, int) else 0,  # theirs counts from 1
        metrics={},
        history=[],
        source=source,
    )
