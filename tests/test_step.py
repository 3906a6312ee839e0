"""One training step for every path that trains: a Ray Train worker's epoch loop
(engine.train_one_epoch with the worker's StepSettings), engine.fit and the LR range test."""

import dataclasses

import pytest
import torch

from placesnet.config import UserError
from placesnet.model import build_model
from placesnet.train import engine, lr_find, optim
from placesnet.train.step import StepSettings

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


@pytest.fixture
def recipe(tiny_config):
    """A config whose step differs from the plain one in every setting: label smoothing, a clip
    small enough to bite, and (on a GPU) AMP and channels_last. One epoch of one step, no warmup,
    flat schedule: fit's only step runs at config.lr, as the other paths do."""
    return tiny_config.replace(
        label_smoothing=0.2,
        clip_grad_norm=0.05,
        lr=0.5,
        epochs=1,
        warmup_steps=0,
        schedule="none",
        amp=True,
        channels_last=True,
    )


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 4, (16,), generator=g)


def _fresh(cfg, device):
    torch.manual_seed(0)  # the same initial weights for every path
    return build_model(cfg, 4).to(device)


def _weights(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _epoch_loop(cfg, device, settings=None):
    """The worker's path: its StepSettings, its optimizer, train_one_epoch over one batch."""
    settings = settings or StepSettings.from_config(cfg, device)
    model = settings.prepare_model(_fresh(cfg, device))
    opt = optim.build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, device)
    engine.train_one_epoch(
        model, [_batch()], opt, device, settings=settings, scaler=settings.make_scaler(device)
    )
    return _weights(model)


def _fit(cfg, device):
    model = _fresh(cfg, device)
    assert len(list(engine.fit(model, [_batch()], [_batch()], cfg, device, num_classes=4))) == 1
    return _weights(model)


def _range_test(cfg, device):
    """One range-test step at cfg.lr (a one-step schedule holds min_lr); with fewer than 3 steps
    it has no suggestion to make, so it says so after changing the weights."""
    settings = StepSettings.from_config(cfg, device)
    model = settings.prepare_model(_fresh(cfg, device))
    opt = optim.build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, device)
    with pytest.raises(UserError, match=r"after 1 step\(s\)"):
        lr_find.lr_range_test(
            model, [_batch()], opt, device, min_lr=cfg.lr, max_lr=10 * cfg.lr, steps=1, settings=settings
        )
    return _weights(model)


def _same(a: dict, b: dict, device: str) -> bool:
    # CPU kernels are deterministic: bit-identical. cuDNN's may sum in another order from run to run.
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-3, atol=1e-6)
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), **tol) for k in a)


@pytest.mark.parametrize("device", DEVICES)
def test_worker_fit_and_range_test_take_the_same_step(recipe, device, monkeypatch):
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    dev = torch.device(device)
    before = _weights(_fresh(recipe, dev))
    worker = _epoch_loop(recipe, dev)
    assert not _same(worker, before, device)  # the step trained
    assert _same(_fit(recipe, dev), worker, device), "engine.fit took another step than the worker"
    assert _same(_range_test(recipe, dev), worker, device), "the LR range test took another step"
    # and the comparison can tell: a step without the smoothing, or without the clip, differs
    settings = StepSettings.from_config(recipe, dev)
    for change in ({"label_smoothing": 0.0}, {"clip_grad_norm": 0.0}):
        assert not _same(_epoch_loop(recipe, dev, dataclasses.replace(settings, **change)), worker, device)


def test_settings_come_from_the_config_and_the_device(recipe):
    cpu = StepSettings.from_config(recipe, torch.device("cpu"))
    assert cpu == StepSettings(label_smoothing=0.2, clip_grad_norm=0.05)  # no AMP, no channels_last
    assert not cpu.grad_scaler and cpu.make_scaler(torch.device("cpu")) is None
    assert StepSettings(amp_dtype=torch.float16).grad_scaler  # fp16 needs a GradScaler, bf16 not
    assert not StepSettings(amp_dtype=torch.bfloat16).grad_scaler


def test_find_lr_runs_the_configs_step(recipe, tiny_root, monkeypatch):
    """--lr auto measures the step the run will train with, not a plain one."""
    seen = []

    def range_test(model, loader, optimizer, device, *, settings, **kwargs):
        seen.append(settings)
        raise UserError("stop here")

    monkeypatch.setattr(lr_find, "lr_range_test", range_test)
    with pytest.raises(UserError, match="stop here"):
        lr_find.find_lr(recipe, tiny_root, torch.device("cpu"))
    assert seen == [StepSettings.from_config(recipe, torch.device("cpu"))]
