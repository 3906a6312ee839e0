"""What a sweep trial trains with, without Ray: batch size, lr and the linear scaling rule."""

import math

import pandas as pd
import pytest

from placesnet.config import TrainConfig
from placesnet.launch.sweep import best_record, train_lr, trial_config


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
    table = pd.DataFrame(
        [
            {
                "trial_id": "a",
                "batch_size": 128,
                "lr": 0.1,
                "train_lr": 0.05,
                "best_val_top1": 0.7,
                "best_val_top5": 0.9,
                "epochs_run": 4,
                "best_checkpoint": "/runs/a/checkpoint_1",
            },
            {
                "trial_id": "b",
                "batch_size": 64,
                "lr": 0.2,
                "train_lr": math.nan,
                "best_val_top1": math.nan,
                "best_val_top5": math.nan,
                "epochs_run": 0,
                "best_checkpoint": "",
            },
        ]
    )
    best = best_record(table, TrainConfig(epochs=4))
    assert best["lr"] == 0.1 and best["train_lr"] == 0.05
    assert best["config"]["lr"] == 0.05 and best["config"]["batch_size"] == 128  # as trained


def test_random_search_draws_batch_sizes_from_the_list_and_lrs_log_uniformly():
    import random
    import statistics

    from placesnet.launch.sweep import search_space

    space = search_space([32, 64], lr_range=(1e-4, 1.0))
    random.seed(0)
    import numpy as np

    np.random.seed(0)
    lrs = [space["lr"].sample() for _ in range(400)]
    sizes = {space["batch_size"].sample() for _ in range(100)}
    assert sizes == {32, 64}
    assert all(1e-4 <= lr <= 1.0 for lr in lrs)
    # log-uniform: the median is the geometric middle (0.01), not the arithmetic one (0.5)
    assert 0.003 < statistics.median(lrs) < 0.03
    assert sum(lr < 1e-3 for lr in lrs) > 60  # about a quarter of the draws in the lowest decade
    grid = search_space([32, 64], lrs=[0.1, 0.2])
    assert grid == {"batch_size": {"grid_search": [32, 64]}, "lr": {"grid_search": [0.1, 0.2]}}


def test_scheduler_none_runs_every_trial_to_the_end_and_asha_keeps_its_settings():
    from ray.tune.schedulers import ASHAScheduler

    from placesnet.launch.sweep import make_scheduler

    assert make_scheduler("none", 8, 2, 3) is None
    asha = make_scheduler("asha", 8, 2, 3)
    assert isinstance(asha, ASHAScheduler)
    assert asha._max_t == 8 and asha._reduction_factor == 3 and asha._time_attr == "training_iteration"
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [6, 2]  # rungs at epochs 2 and 6
    assert asha._stop_last_trials is False
