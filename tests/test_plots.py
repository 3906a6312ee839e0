"""The pictures say what the data says: the best epoch and best trial are the right ones, every
trial is told apart, early-stopped trials show as such, nothing is clipped. No Ray."""

from __future__ import annotations

import json

import matplotlib.colors as mcolors
import pandas as pd
import pytest

from placesnet.plots import BEST_COLOUR, curves_figure, curves_png, sweep_figure, sweep_png

PNG = b"\x89PNG\r\n\x1a\n"


def _history(top1, losses):
    return [
        {
            "epoch": e + 1,
            "train_loss": 1.0 / (e + 1),
            "train_top1": 0.5,
            "val_loss": v,
            "val_top1": t,
            "val_top5": 1.0,
        }
        for e, (t, v) in enumerate(zip(top1, losses))
    ]


def test_curves_mark_the_best_epoch_with_ties_broken_by_val_loss():
    # epochs 4-8 tie at 0.99375 (the run); epoch 7 has the lowest val loss
    top1 = [0.5, 0.9, 0.98, 0.99375, 0.99375, 0.99375, 0.99375, 0.99375]
    losses = [1.0, 0.4, 0.1, 0.05, 0.04, 0.035, 0.02, 0.021]
    fig = curves_figure(_history(top1, losses))
    marks = [line for ax in fig.axes for line in ax.lines if line.get_label().startswith("best epoch")]
    assert len(marks) == 2  # a line on the loss and on the accuracy panel
    assert {tuple(m.get_xdata()) for m in marks} == {(7, 7)}
    assert marks[0].get_label() == "best epoch 7 (val top-1 0.9938)"
    star = [line for line in fig.axes[1].lines if line.get_marker() == "*"]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in star] == [([7], [0.99375])]
    assert curves_png(_history(top1, losses)).startswith(PNG)


def _table(rows):
    cols = ["trial_id", "batch_size", "lr", "best_val_top1", "status", "best_checkpoint", "curve"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows]).sort_values(
        "best_val_top1", ascending=False, na_position="last"
    )


@pytest.fixture
def sweep_table():
    return _table(
        [
            ("t0", 64, 0.1, 0.80, "finished", "/c0", json.dumps([0.5, 0.7, 0.8])),
            ("t1", 32, 0.05, 0.95, "finished", "/c1", json.dumps([0.6, 0.9, 0.95])),  # the best
            ("t2", 64, 0.01, 0.40, "stopped early", "/c2", json.dumps([0.40])),  # one epoch, then ASHA
            ("t3", 32, 0.2, 0.60, "stopped early", "/c3", json.dumps([0.5, 0.6])),
            ("t4", 64, 0.02, float("nan"), "errored", "", json.dumps([])),
        ]
    )


def test_sweep_plot_highlights_the_best_trial_in_its_own_colour(sweep_table):
    fig = sweep_figure(sweep_table)
    ax_lr, ax_curve = fig.axes
    star = [c for c in ax_lr.collections if c.get_paths() and c.get_label().startswith("best:")]
    assert len(star) == 1
    assert star[0].get_offsets().tolist() == [[0.05, 0.95]]  # batch 32, not the batch-64 colour
    assert star[0].get_label() == "best: bs 32 lr 0.05, val top-1 0.9500"
    # unclipped: the star lies inside both axis ranges, with room
    (x0, x1), (_, y1) = ax_lr.get_xlim(), ax_lr.get_ylim()
    assert x0 < 0.05 < x1 and x0 < 0.01 and x1 > 0.2 and y1 > 0.95

    curves = {line.get_label(): line for line in ax_curve.lines if not line.get_label().startswith("_")}
    best_curve = curves["best: bs 32 lr 0.05 (finished)"]
    assert mcolors.same_color(best_curve.get_color(), BEST_COLOUR)
    assert best_curve.get_linewidth() > max(
        c.get_linewidth() for k, c in curves.items() if c is not best_curve
    )
    others = [c.get_color() for c in curves.values() if c is not best_curve]
    assert len({mcolors.to_hex(c) for c in others}) == len(others) == 3  # one colour per trial
    assert not any(mcolors.same_color(c, BEST_COLOUR) for c in others)
    # point colours on the left match the curves on the right
    points = {c.get_label(): mcolors.to_hex(c.get_facecolor()[0]) for c in ax_lr.collections}
    assert points["bs 64 lr 0.1 (finished)"] == mcolors.to_hex(curves["bs 64 lr 0.1 (finished)"].get_color())


def test_sweep_plot_shows_early_stopped_trials_even_after_one_epoch(sweep_table):
    fig = sweep_figure(sweep_table)
    ends = {line.get_gid(): line for line in fig.axes[1].lines if line.get_gid()}
    assert set(ends) == {"end:t2:stopped early", "end:t3:stopped early"}
    assert all(line.get_marker() == "x" for line in ends.values())
    assert list(ends["end:t2:stopped early"].get_xdata()) == [1]
    assert "x: stopped early" in fig.axes[1].get_title()
    assert sweep_png(sweep_table).startswith(PNG)


def test_sweep_plot_of_a_sweep_without_results():
    table = _table([("t0", 32, 0.05, float("nan"), "interrupted", "", json.dumps([]))])
    assert sweep_png(table).startswith(PNG)
