"""What a sweep trial trains with, without Ray: batch size, lr and the linear scaling rule."""

import math

import pandas as pd
import pytest

from placesnet.config import TrainConfig
from placesnet.sweep import best_record, train_lr, trial_config


def test_linear_scaling_rule():
    assert train_lr(0.1, 512, 256) == pytest.approx(0.2)
    assert train_lr(0.1, 64, 256) == pytest.approx(0.025)
    assert train_lr(0.1, 64, None) == 0.1  # off: the searched lr as is


@pytest.mark.parametrize("scale_lr,expected", [(None, 0.08), (32, 0.16)])
def test_trial_config_takes_the_trial_values(scale_lr, expected):
    base = {"config": TrainConfig(epochs=3, image_size=32).to_dict(), "scale_lr": scale_lr}
    cfg = trial_config({"batch_size": 64, "lr": 0.08}, base)
    assert cfg.batch_size == 64 and cfg.lr == pytest.approx(expected)
    assert cfg.epochs == 3 and cfg.image_size == 32  # the rest from the base config


def test_best_json_config_reproduces_the_trial():
    table = pd.DataFrame([
        {"trial_id": "a", "batch_size": 128, "lr": 0.1, "train_lr": 0.05, "best_val_top1": 0.7,
         "best_val_top5": 0.9, "epochs_run": 4, "best_checkpoint": "/runs/a/checkpoint_1"},
        {"trial_id": "b", "batch_size": 64, "lr": 0.2, "train_lr": math.nan, "best_val_top1": math.nan,
         "best_val_top5": math.nan, "epochs_run": 0, "best_checkpoint": ""},
    ])
    best = best_record(table, TrainConfig(epochs=4))
    assert best["lr"] == 0.1 and best["train_lr"] == 0.05
    assert best["config"]["lr"] == 0.05 and best["config"]["batch_size"] == 128  # as trained
