"""Options defined once: every TrainConfig field (but the listed exceptions) is a flag of train.py,
sweep.py and lr_find.py, derived from the field's option(); the flag sets exactly that field, and
validate() names the flag. No Ray: the scripts' parse_args only."""

import dataclasses
import importlib.util
import re
import subprocess
import sys

import pytest
from conftest import REPO

from placesnet.cli import config_from_args, option_fields
from placesnet.config import GROUPS, NO_FLAG, TrainConfig, UserError, default_lr, flag


def _script(path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _script("rayjobs/train.py")

# A non-default value for every flag, and every field it changes: itself, plus the defaults that
# follow from it (the dataset's image size, epochs and batch size; the model's and batch's lr; all
# classes of the difficulty). A new field fails test_every_field_is_a_flag until it has a row here.
CASES = {
    "dataset": (
        ["--dataset", "places365"],
        dict(dataset="places365", image_size=256, epochs=30, batch_size=256, lr=default_lr("deepcnn", 256)),
    ),
    "data_root": (["--data-root", "/data/p365"], dict(data_root="/data/p365")),
    "skip_verify": (["--skip-verify"], dict(skip_verify=True)),
    "download": (["--download"], dict(download=True)),
    "image_size": (["--image-size", "96"], dict(image_size=96)),
    "augment": (["--augment"], dict(augment=True)),
    "bad_images": (["--bad-images", "skip"], dict(bad_images="skip")),
    "sample_difficulty": (["--sample-difficulty", "hard"], dict(sample_difficulty="hard", sample_classes=16)),
    "sample_classes": (["--sample-classes", "5"], dict(sample_classes=5)),
    "sample_train_per_class": (["--sample-train-per-class", "20"], dict(sample_train_per_class=20)),
    "sample_val_per_class": (["--sample-val-per-class", "7"], dict(sample_val_per_class=7)),
    "model": (["--model", "workshop"], dict(model="workshop", lr=default_lr("workshop", 64))),
    "widths": (["--widths", "16,32"], dict(widths=[16, 32])),
    "fc_hidden": (["--fc-hidden", "256"], dict(fc_hidden=256)),
    "dropout": (["--dropout", "0.5"], dict(dropout=0.5)),
    "epochs": (["--epochs", "3"], dict(epochs=3)),
    "batch_size": (["--batch-size", "32"], dict(batch_size=32, lr=default_lr("deepcnn", 32))),
    "lr": (["--lr", "0.1"], dict(lr=0.1)),
    "momentum": (["--momentum", "0.8"], dict(momentum=0.8)),
    "weight_decay": (["--weight-decay", "0.001"], dict(weight_decay=0.001)),
    "schedule": (["--schedule", "step"], dict(schedule="step")),
    "warmup_steps": (["--warmup-steps", "30"], dict(warmup_steps=30)),
    "warmup_epochs": (["--warmup-epochs", "1"], dict(warmup_epochs=1)),
    "clip_grad_norm": (["--clip-grad-norm", "2.5"], dict(clip_grad_norm=2.5)),
    "label_smoothing": (["--label-smoothing", "0.1"], dict(label_smoothing=0.1)),
    "amp": (["--no-amp"], dict(amp=False)),
    "channels_last": (["--no-channels-last"], dict(channels_last=False)),
    "compile": (["--compile"], dict(compile=True)),
    "loader_workers": (["--loader-workers", "3"], dict(loader_workers=3)),
    "input": (["--input", "ray-data"], dict(input="ray-data")),
    "decode": (["--decode", "cpu"], dict(decode="cpu")),
    "log_every": (["--log-every", "5"], dict(log_every=5)),
    "seed": (["--seed", "7"], dict(seed=7)),
    "init_from": (["--init-from", "/runs/easy"], dict(init_from="/runs/easy")),
    "freeze_backbone": (["--freeze-backbone", "--init-from", "x"], dict(freeze_backbone=True, init_from="x")),
    "backbone_lr_mult": (
        ["--backbone-lr-mult", "0.1", "--init-from", "x"],
        dict(backbone_lr_mult=0.1, init_from="x"),
    ),
}


def _changes(argv: list[str], module=train) -> dict:
    default = config_from_args(module.parse_args([])).to_dict()
    cfg = config_from_args(module.parse_args(argv)).to_dict()
    return {k: v for k, v in cfg.items() if v != default[k]}


def test_every_field_is_a_flag_or_a_listed_exception():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(NO_FLAG) <= fields and not set(NO_FLAG) & set(CASES)
    assert set(CASES) == fields - set(NO_FLAG), "a field with no row in CASES, or a row with no field"
    assert [f.name for f in option_fields()] == [
        f.name for f in dataclasses.fields(TrainConfig) if f.name in CASES
    ]


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_flag_sets_exactly_its_field(name):
    argv, expected = CASES[name]
    assert argv[0] == flag(name)
    assert _changes(argv) == expected


def test_the_new_model_and_loss_flags_reach_every_training_command():
    """--fc-hidden, --dropout and --label-smoothing: train.py, sweep.py and lr_find.py."""
    argv = ["--fc-hidden", "64", "--dropout", "0.1", "--label-smoothing", "0.2"]
    for script, extra in [
        ("rayjobs/train.py", []),
        ("tuning/sweep.py", ["--grid"]),
        ("rayjobs/lr_find.py", []),
    ]:
        cfg = config_from_args(_script(script).parse_args([*extra, *argv]))
        assert (cfg.fc_hidden, cfg.dropout, cfg.label_smoothing) == (64, 0.1, 0.2), script
    defaults = config_from_args(train.parse_args([]))
    assert (defaults.fc_hidden, defaults.dropout, defaults.label_smoothing) == (1024, 0.3, 0.0)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        (["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
        (["--label-smoothing", "1.0"], "--label-smoothing must be in [0, 1), got 1.0"),
        (["--label-smoothing", "nan"], "--label-smoothing must be in [0, 1), got nan"),
        (["--fc-hidden", "0"], "--fc-hidden must be >= 1, got 0"),
    ],
)
def test_the_new_flags_are_validated(argv, message):
    with pytest.raises(UserError) as e:
        config_from_args(train.parse_args(argv))
    assert str(e.value) == message


def test_flag_names_come_from_field_names():
    assert flag("clip_grad_norm") == "--clip-grad-norm" and flag("fc_hidden") == "--fc-hidden"
    assert flag("amp") == "--no-amp" and flag("compile") == "--compile"  # on by default: --no-
    with pytest.raises(KeyError):
        flag("extra")


def _bad_value(f: dataclasses.Field):
    if f.metadata["choices"]:
        return "bogus"
    if f.metadata["below"] is not None:
        return f.metadata["below"]
    if f.metadata["minimum"] is not None:
        return f.metadata["minimum"] - 1
    return None


def test_validate_names_the_flag_that_sets_the_value():
    """Each refused value's message names its field's flag, and only flags train.py has."""
    flags = _help("rayjobs/train.py")
    checked = 0
    for f in option_fields():
        bad = _bad_value(f)
        if bad is None:
            continue
        with pytest.raises(UserError) as e:
            TrainConfig(**{f.name: bad}).validate()
        assert flag(f.name) in str(e.value), (f.name, str(e.value))
        checked += 1
    for changes in [dict(lr=0), dict(warmup_epochs=8), dict(widths=(8, 0)), dict(sample_classes=9)]:
        with pytest.raises(UserError) as e:
            TrainConfig(**changes).validate()
        assert flag(next(iter(changes))) in str(e.value)
        named = re.findall(r"--[a-z][a-z-]*", str(e.value))
        assert named and all(re.search(rf"{n}\b", flags) for n in named), str(e.value)
    assert checked >= 20


def _help(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _sections(text: str) -> dict[str, str]:
    """--help's sections: heading -> its lines."""
    found = {}
    for block in text.split("\n\n"):
        heading, _, body = block.partition("\n")
        if heading.endswith(":") and not heading.startswith(" "):
            found[heading[:-1]] = body
    return found


@pytest.mark.parametrize(
    "script,own",
    [
        ("rayjobs/train.py", ["cluster and outputs"]),
        ("tuning/sweep.py", ["search space", "early stopping", "resources and outputs"]),
    ],
)
def test_help_shows_each_flag_under_its_group(script, own):
    text = _help(script)
    sections = _sections(text)
    assert [s for s in sections if s in (*GROUPS, *own)] == [*GROUPS, *own]
    for f in option_fields():
        body = sections[f.metadata["group"]]
        assert re.search(rf"^  {re.escape(flag(f.name))}\b", body, re.M), (f.name, f.metadata["group"])
    assert "--no-check-files" in sections["data"]
    for name in NO_FLAG:
        assert "--" + name.replace("_", "-") not in text
