"""Fine-tuning (issue #28 point 3): train.py and sweep.py ``--init-from CHECKPOINT``.

Without Ray: which layer is the classifier head, for every model; what load_init loads (the head
kept for the same classes, new for others) and what it records (an imported model's licence and
citation carried forward); the optimizer's groups (--backbone-lr-mult scales the backbone's
steps, --freeze-backbone keeps its weights); the config a run takes from the checkpoint, and the
one-line refusals before Ray starts. With Ray (slow): train.py from the shared trained run starts
at its accuracy and records where it came from, and a resumed run does not load it again; a model
with its own input transform fine-tunes through it, frozen, and its val numbers are evaluate.py's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, flip_bytes, run_script, train_cli, untrained_checkpoint
from torch.utils.data import DataLoader, TensorDataset

from placesnet.checkpoint import read_meta, save_checkpoint
from placesnet.config import MODELS, Preprocess, TrainConfig, UserError, default_lr
from placesnet.finetune import config_from_init, load_init
from placesnet.model import build_model, head_names, split_parameters
from placesnet.train import engine
from placesnet.train.step import StepSettings, train_step

CPU = torch.device("cpu")
TINY_CLASSES = ["/b/beach", "/d/desert/sand", "/f/field/wild", "/f/forest/broadleaf"]  # the tiny data's
OTHER_CLASSES = ["/a/airfield", "/b/bakery/shop", "/c/canyon", "/d/dam"]
IMAGENET = Preprocess((40, 40), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SOURCE = {"file": "theirs.pth.tar", "sha256": "ab" * 32, "licence": "CC BY", "citation": "Zhou et al."}


def _script(path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train, sweep = _script("rayjobs/train.py"), _script("tuning/sweep.py")


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the head ------------------------------------------------------------------------------------


# The classifier head of each model: its fully connected layers, the last one the classes'.
HEADS = {
    "deepcnn": ["fc1", "fc2"],
    "workshop": ["fc1", "fc2"],
    "resnet18": ["fc"],
    "resnet50": ["fc"],
    "wideresnet18": ["fc"],
    "alexnet": ["classifier.1", "classifier.4", "classifier.6"],
    "densenet161": ["classifier"],
}


def test_every_model_has_its_head_listed():
    assert set(HEADS) == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_the_head_is_the_fully_connected_layers_and_the_last_outputs_the_classes(name):
    """For every model: the head is its fully connected layers, none of them in the backbone;
    the last is the one layer whose weights' shape follows the number of classes, and its output
    is the model's."""
    cfg = TrainConfig(model=name)
    torch.manual_seed(0)
    three, five = build_model(cfg, 3), build_model(cfg, 5)
    head = head_names(five)
    assert head == HEADS[name]
    follows = {
        n for (n, a), (_, b) in zip(three.named_parameters(), five.named_parameters()) if a.shape != b.shape
    }
    assert follows == {f"{head[-1]}.weight", f"{head[-1]}.bias"}
    ours, backbone = split_parameters(five)
    assert [id(p) for p in ours] == [id(p) for n in head for p in five.get_submodule(n).parameters()]
    assert len(ours) + len(backbone) == len(list(five.parameters()))
    linear = {id(p) for m in five.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    assert not linear & {id(p) for p in backbone}
    seen = []
    five.get_submodule(head[-1]).register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        out = five.eval()(torch.rand(2, 3, 64, 64))
    assert torch.equal(seen[-1], out) and out.shape == (2, 5)


def test_an_imported_models_head_is_inside_its_input_stats():
    model = build_model(TrainConfig(model="resnet18", image_size=32, preprocess=IMAGENET), 4)
    assert type(model).__name__ == "InputStats" and head_names(model) == ["net.fc"]


# --- the weights and the record -------------------------------------------------------------------


@pytest.fixture(scope="module")
def init(tiny_config, tmp_path_factory):
    """A checkpoint of the tiny model for the tiny data's classes (seed 1)."""
    return untrained_checkpoint(tmp_path_factory.mktemp("init") / "ckpt", tiny_config, seed=1)


@pytest.mark.parametrize(
    "classes,kept",
    [
        (TINY_CLASSES, True),
        (OTHER_CLASSES, False),
        (TINY_CLASSES[:3], False),
        ([*TINY_CLASSES, "/d/dam"], False),
    ],
    ids=["same classes", "other names", "fewer", "more"],
)
def test_load_init_keeps_the_head_only_for_the_same_classes(init, tiny_config, classes, kept):
    theirs = torch.load(init / "model.pt", weights_only=True)
    torch.manual_seed(2)
    model = build_model(tiny_config, len(classes))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    source, line = load_init(model, str(init), classes)
    for key, value in model.state_dict().items():
        if key.startswith(("fc1.", "fc2.")) and not kept:  # the new head: its fresh initialisation
            assert torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, theirs[key]), key
    assert not torch.equal(fresh["features.0.weight"], theirs["features.0.weight"])  # it loaded something
    assert source == {
        "init_from": str(init),
        "model_sha256": _sha256(init / "model.pt"),
        "head": "kept" if kept else "new",
    }
    assert line.startswith(f"starting from {init} (epoch 1): ")
    assert line.endswith(
        "every layer (the same classes)" if kept else f"new for {len(classes)} classes (it had 4)"
    )


def test_an_imported_models_licence_and_citation_are_carried_forward(tiny_config, tmp_path):
    """The record of a run from an imported model keeps its source, with the licence and citation
    on top as in an imported checkpoint's; a run from that run's checkpoint keeps them again."""
    torch.manual_seed(0)
    model = build_model(tiny_config, 4)
    first = save_checkpoint(
        tmp_path / "imported", model=model, config=tiny_config, classes=TINY_CLASSES, epoch=0,
        metrics={}, history=[], source=SOURCE,
    )  # fmt: skip
    source, _ = load_init(build_model(tiny_config, 4), str(first), OTHER_CLASSES)
    assert source == {
        "init_from": str(first),
        "model_sha256": _sha256(first / "model.pt"),
        "head": "new",
        "licence": "CC BY",
        "citation": "Zhou et al.",
        "source": SOURCE,
    }
    second = save_checkpoint(
        tmp_path / "tuned", model=model, config=tiny_config, classes=TINY_CLASSES, epoch=3,
        metrics={}, history=[], source=source,
    )  # fmt: skip
    again, line = load_init(build_model(tiny_config, 4), str(second), TINY_CLASSES)
    assert (again["licence"], again["citation"], again["source"]) == ("CC BY", "Zhou et al.", source)
    assert "(epoch 4)" in line


def test_weights_that_do_not_fit_are_one_line(init, tiny_config):
    with pytest.raises(UserError, match=r"^--init-from .*: its deepcnn weights do not fit this run's model"):
        load_init(build_model(tiny_config.replace(widths=(8, 16)), 4), str(init), TINY_CLASSES)


# --- the optimizer's groups -----------------------------------------------------------------------


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def _plain_sgd(tiny_config, **changes) -> TrainConfig:
    """No momentum, weight decay, warmup or decay, no dropout: a step moves each weight by lr x grad."""
    plain = dict(momentum=0.0, weight_decay=0.0, warmup_steps=0, schedule="none", dropout=0.0)
    return tiny_config.replace(**plain, **changes).validate()


def _one_step(cfg: TrainConfig) -> tuple[dict, torch.optim.Optimizer, torch.nn.Module]:
    """Each parameter's change in one training step of a seed-0 model (frozen first with
    --freeze-backbone, as the worker does), the optimizer and the model."""
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    if cfg.freeze_backbone:
        from placesnet.model import freeze_backbone

        freeze_backbone(model)
    settings = StepSettings()
    optimizer, scheduler, _ = engine.training_state(model, cfg, settings, 1, CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, optimizer, *_batch(), CPU, settings, scheduler=scheduler)
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, optimizer, model


def test_the_backbone_steps_at_its_multiple_of_the_lr_and_the_head_at_the_lr(tiny_config):
    full, _, _ = _one_step(_plain_sgd(tiny_config, init_from="x"))
    tenth, optimizer, model = _one_step(_plain_sgd(tiny_config, init_from="x", backbone_lr_mult=0.1))
    head = tuple(f"{name}." for name in head_names(model))
    for name, step in tenth.items():
        assert step.abs().sum() > 0, name
        expected = full[name] if name.startswith(head) else 0.1 * full[name]
        torch.testing.assert_close(
            step, expected, rtol=1e-3, atol=5e-7, msg=name
        )  # a few ulps of weights near 1
    assert optimizer.param_groups[0]["lr"] == tiny_config.lr  # metrics.csv's lr: the head's, the run's
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx(
        [0.1 * tiny_config.lr, tiny_config.lr]
    )


def test_a_frozen_backbone_keeps_its_weights_and_only_the_head_is_optimised(tiny_config):
    steps, optimizer, model = _one_step(_plain_sgd(tiny_config, init_from="x", freeze_backbone=True))
    head, backbone = split_parameters(model)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in head}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(steps[names[id(p)]].abs().sum() > 0 for p in head)
    assert all(torch.equal(steps[names[id(p)]], torch.zeros_like(p)) for p in backbone)


def test_plain_fit_freezes_the_backbone_too(tiny_config):
    """engine.fit (benchmarks/finetune.py) with --freeze-backbone: a whole epoch, the backbone's
    weights unchanged (its BatchNorm statistics follow the data), the head's trained."""
    cfg = _plain_sgd(tiny_config, init_from="x", freeze_backbone=True, epochs=1, lr=0.1)
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = TensorDataset(*_batch(16))
    list(engine.fit(model, DataLoader(data, 8), DataLoader(data, 16), cfg, CPU, num_classes=4))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith(("fc1.", "fc2.")), name


# --- the run's config from the checkpoint ----------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A resnet18 checkpoint with its own transform and a source, as an imported one: 48 px crops
    of 56x56 images, other classes than the tiny data's."""
    cfg = TrainConfig(
        model="resnet18", image_size=48, preprocess=Preprocess((56, 56), IMAGENET.mean, IMAGENET.std)
    )
    return untrained_checkpoint(tmp_path_factory.mktemp("imported") / "ckpt", cfg, classes=OTHER_CLASSES)


def test_a_run_from_a_checkpoint_takes_its_architecture_and_transform(imported, tmp_path):
    """train.py and sweep.py: the model, image size and transform come from the checkpoint (the
    default lr is its model's); a summary.json naming it works as evaluate.py's --checkpoint does;
    an image size given is kept."""
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"best_checkpoint": str(imported)}))
    cfg = config_from_init(train.parse_args(["--init-from", str(summary)]))
    assert (cfg.model, cfg.image_size, cfg.init_from) == ("resnet18", 48, str(imported))
    assert cfg.preprocess == Preprocess((56, 56), IMAGENET.mean, IMAGENET.std)
    assert cfg.lr == default_lr("resnet18", 64) and cfg.dataset == "sample"
    given = config_from_init(
        train.parse_args(["--init-from", str(imported), "--image-size", "40", "--model", "resnet18"])
    )
    assert (given.model, given.image_size) == ("resnet18", 40)
    trial = config_from_init(
        sweep.parse_args(["--grid", "--lrs", "0.1", "--init-from", str(imported), "--freeze-backbone"])
    )
    assert (trial.model, trial.freeze_backbone, trial.init_from) == ("resnet18", True, str(imported))
    assert config_from_init(train.parse_args([])).init_from is None  # no --init-from: as before


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--model", "deepcnn"],
            "--model deepcnn is not the --init-from checkpoint's resnet18 ({ckpt}): a run started from it "
            "has its architecture; drop --model, or train a new model without --init-from",
        ),
        (["--widths", "8,16"], "--widths 8,16 is not the --init-from checkpoint's 32,64,128,256 ({ckpt})"),
        (["--lr", "auto"], "--lr auto runs the LR range test from random weights, not from --init-from's"),
        (["--input", "ray-data"], "this model has its own input transform (an imported published model's"),
        (["--image-size", "64"], "--image-size 64 is larger than the images it is cropped from (56x56)"),
    ],
    ids=["model", "widths", "lr auto", "ray data", "image size"],
)
def test_what_a_run_from_a_checkpoint_cannot_change_is_refused_before_ray(imported, argv, message):
    """config_from_init: train.py's first step, before the data, the storage and Ray."""
    with pytest.raises(UserError) as e:
        config_from_init(train.parse_args(["--init-from", str(imported), *argv]))
    assert str(e.value).startswith(message.format(ckpt=imported)), str(e.value)


def test_fine_tuning_flags_need_a_checkpoint():
    with pytest.raises(
        UserError, match="^--freeze-backbone and --backbone-lr-mult are for a run that starts --init-from"
    ):
        config_from_init(train.parse_args(["--backbone-lr-mult", "0.1"]))
    with pytest.raises(SystemExit):  # argparse: one or the other
        train.parse_args(["--freeze-backbone", "--backbone-lr-mult", "0.1"])


def test_a_missing_or_corrupt_checkpoint_is_one_line_before_ray(init, tmp_path):
    proc = run_script("rayjobs/train.py", "--init-from", tmp_path / "nope")
    assert_user_error(proc, f"--init-from {tmp_path / 'nope'}: checkpoint not found: {tmp_path / 'nope'}")
    assert "Ray" not in proc.stdout + proc.stderr
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in init.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    flip_bytes(corrupt / "model.pt")
    with pytest.raises(UserError, match=rf"^--init-from {corrupt}: corrupt checkpoint: {corrupt}: model.pt"):
        config_from_init(train.parse_args(["--init-from", str(corrupt)]))


# --- under Ray: train.py ---------------------------------------------------------------------------


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_a_run_from_the_trained_run_starts_at_its_accuracy_and_says_where_it_came_from(
    trained_run, ray_head, tmp_path
):
    """train.py --init-from the shared run's directory (the same classes): its best checkpoint's
    every weight, so the first epoch at a small lr is at the init model's val top-1, not at
    chance; summary.json, meta.json and config.json name the checkpoint and its model.pt's sha256.
    The same command with more epochs resumes the run from its own checkpoint and says so; with
    --freeze-backbone added it is refused."""
    run_dir, _ = trained_run
    init = _summary(run_dir)
    best = init["best_checkpoint"]
    proc = train_cli(ray_head, tmp_path, "tuned", "--init-from", run_dir, "--lr", "0.005", epochs=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"from {best}: every layer trains at the lr" in out
    assert f"starting from {best} (epoch {init['best_epoch']}): every layer (the same classes)" in out
    tuned = _summary(tmp_path / "tuned")
    source = {"init_from": best, "model_sha256": _sha256(Path(best) / "model.pt"), "head": "kept"}
    assert tuned["source"] == source and read_meta(tuned["best_checkpoint"])["source"] == source
    assert json.loads((Path(tuned["best_checkpoint"]) / "config.json").read_text())["init_from"] == best
    assert init["val_top1"] > 0.6  # well above chance (0.25), so starting from it shows
    assert tuned["val_top1"] >= init["val_top1"] - 0.1, (tuned["val_top1"], init["val_top1"])

    again = train_cli(ray_head, tmp_path, "tuned", "--init-from", run_dir, "--lr", "0.005", epochs=2)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert (
        f"--init-from is not applied again: the run goes on from its own checkpoint (it started from {best})"
        in out
    )
    assert "starting from" not in out
    resumed = _summary(tmp_path / "tuned")
    assert resumed["epochs_completed"] == 2 and read_meta(resumed["latest_checkpoint"])["source"] == source
    # the optimizer's groups follow --freeze-backbone: a resume cannot change it (refused before Ray)
    refused = train_cli(ray_head, tmp_path, "tuned", "--init-from", run_dir, "--freeze-backbone", epochs=3)
    assert_user_error(
        refused, "holds a run with a different freeze_backbone; resume it with the same settings"
    )


@pytest.mark.slow
def test_a_model_with_its_own_transform_fine_tunes_through_it_and_evaluate_agrees(
    ray_head, tiny_config, tmp_path
):
    """--init-from a model with an imported model's input transform (resize to 40x40, crop 32,
    ImageNet statistics) and a source, for other classes, with --freeze-backbone: a new head
    trains and nothing else; the checkpoints keep the transform and carry the licence and citation;
    the val top-1 and loss the run reports are those evaluate.py reports for its checkpoint."""
    cfg = tiny_config.replace(preprocess=IMAGENET)
    torch.manual_seed(0)
    init = save_checkpoint(
        tmp_path / "imported", model=build_model(cfg, 4), config=cfg, classes=OTHER_CLASSES, epoch=0,
        metrics={}, history=[], source=SOURCE,
    )  # fmt: skip
    proc = train_cli(ray_head, tmp_path, "frozen", "--init-from", init, "--freeze-backbone", epochs=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"from {init}: the classifier head trains, the other layers are frozen" in proc.stdout
    run = _summary(tmp_path / "frozen")
    best = Path(run["best_checkpoint"])
    assert TrainConfig.from_dict(json.loads((best / "config.json").read_text())).preprocess == IMAGENET
    assert read_meta(best)["source"] == {
        "init_from": str(init),
        "model_sha256": _sha256(init / "model.pt"),
        "head": "new",
        "licence": "CC BY",
        "citation": "Zhou et al.",
        "source": SOURCE,
    }
    theirs, ours = (torch.load(d / "model.pt", weights_only=True) for d in (init, best))
    for name, _ in build_model(cfg, 4).named_parameters():  # weights, not BatchNorm's statistics
        assert torch.equal(ours[name], theirs[name]) != name.startswith(("net.fc1.", "net.fc2.")), name

    proc = run_script("rayjobs/evaluate.py", "--checkpoint", best, "--out", tmp_path / "eval", "--gallery", 0)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["transform"].startswith("resize to 40x40, centre crop 32")
    assert report["val_top1"] == run["val_top1"] and report["val_images"] == 48
    assert report["val_loss"] == pytest.approx(run["val_loss"], rel=1e-5)


def test_the_measuring_script_runs():
    """benchmarks/finetune.py (docs/recipe.md's fine-tuning table) on tiny settings."""
    proc = run_script("benchmarks/finetune.py", "--quick", "--pretrain-epochs", 1, "--epochs", 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in (
        "from scratch",
        "--init-from",
        "--init-from --backbone-lr-mult 0.1",
        "--init-from --freeze-backbone",
    ):
        assert f"| {row} " in proc.stdout, proc.stdout
