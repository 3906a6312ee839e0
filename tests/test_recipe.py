"""The training recipe without Ray: per-step schedule, default lrs and the scaling rule, the LR
range test, gradient clipping and the first-epoch loss-rise warning."""

import math

import pytest
import torch
from torch import nn

from placesnet.cli import add_data_args, add_model_args, config_from_args, lr_source
from placesnet.config import MODEL_LR, REFERENCE_BATCH, TrainConfig, UserError, default_lr
from placesnet.train import engine, optim
from placesnet.train.lr_find import lr_range_test, lr_schedule, minimum, steepest, valley
from placesnet.train.step import StepSettings

CPU = torch.device("cpu")


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _optimizer(lr=1.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_schedule_warms_up_linearly_then_follows_a_cosine_per_step():
    opt = _optimizer(0.4)
    lrs = _lrs(optim.build_scheduler(opt, "cosine", total_steps=10, warmup_steps=4), opt, 10)
    expected = [0.4 * (s + 1) / 5 for s in range(4)]  # 0.08 .. 0.32, never 0
    expected += [0.4 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(4, 10)]
    assert lrs == pytest.approx(expected)
    assert lrs[4] == pytest.approx(0.4)  # the peak right after the warmup
    assert lrs[-1] < 0.04  # near zero at the end


def test_step_and_flat_schedules_per_step():
    opt = _optimizer()
    assert _lrs(optim.build_scheduler(opt, "step", 8, 0), opt, 8) == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    opt = _optimizer()
    assert _lrs(optim.build_scheduler(opt, "none", 5, 2), opt, 5) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])


@pytest.mark.parametrize(
    "total,kwargs,expected",
    [
        (48, {}, 9),  # 8 epochs x 6 steps (the tiny run): floor = a fifth of the run
        (800, {}, 50),  # the floor
        (30 * 7000, {}, 5000),  # 30 Places365 epochs of 7,000 steps: the cap (0.7 epoch)
        (20_000, {}, 1000),  # 5 %
        (48, {"warmup_steps": 7}, 7),
        (48, {"warmup_steps": 0}, 0),
        (48, {"warmup_epochs": 2, "steps_per_epoch": 6}, 12),
        (10, {"warmup_steps": 50}, 9),  # never the whole run
    ],
)
def test_warmup_length(total, kwargs, expected):
    assert optim.warmup_steps_for(total, **kwargs) == expected


def test_scheduler_for_a_config_counts_steps_of_all_epochs():
    opt = _optimizer()
    sched = optim.scheduler_for(opt, TrainConfig(epochs=8, schedule="cosine"), steps_per_epoch=6)
    assert sched.lr_lambdas[0].keywords == {"total_steps": 48, "warmup_steps": 9, "schedule": "cosine"}


def test_resume_mid_warmup_continues_the_schedule_exactly():
    """The scheduler state saved in a checkpoint (as train_state.pt does) brings a resumed run
    back to the same step: its lrs are those of the run that never stopped."""
    import io

    opt = _optimizer(0.1)
    whole = _lrs(optim.build_scheduler(opt, "cosine", 30, 12), opt, 30)
    opt = _optimizer(0.1)
    sched = optim.build_scheduler(opt, "cosine", 30, 12)
    first = _lrs(sched, opt, 5)  # stopped in the middle of the warmup
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = _optimizer(0.1)
    sched2 = optim.build_scheduler(opt2, "cosine", 30, 12)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert first + _lrs(sched2, opt2, 25) == pytest.approx(whole)


def test_an_extended_run_uses_its_new_length():
    """Resuming with more --epochs must not bring back the old total from the saved state."""
    opt = _optimizer()
    sched = optim.build_scheduler(opt, "cosine", 10, 0)
    _lrs(sched, opt, 10)
    longer = optim.build_scheduler(_optimizer(), "cosine", 20, 0)
    longer.load_state_dict(sched.state_dict())
    assert longer.lr_lambdas[0].keywords["total_steps"] == 20


def _parse(*argv):
    import argparse

    p = argparse.ArgumentParser()
    add_data_args(p)
    add_model_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("model", sorted(MODEL_LR))
def test_default_lr_follows_the_linear_scaling_rule(model):
    assert default_lr(model, REFERENCE_BATCH) == MODEL_LR[model]
    for batch in (32, 64, 512):
        args = _parse("--model", model, "--batch-size", str(batch))
        cfg = config_from_args(args)
        assert cfg.lr == pytest.approx(MODEL_LR[model] * batch / 256)
        assert lr_source(args, cfg) == f"{model} default {MODEL_LR[model]:g} per 256 images x {batch}/256"
    places = config_from_args(_parse("--model", model, "--dataset", "places365"))
    assert places.batch_size == 256 and places.lr == MODEL_LR[model]


def test_an_explicit_lr_is_used_as_given():
    args = _parse("--lr", "0.3", "--batch-size", "32")
    assert config_from_args(args).lr == 0.3 and lr_source(args, config_from_args(args)) == "--lr"
    auto = _parse("--lr", "auto")
    assert auto.lr == "auto" and config_from_args(auto).lr > 0  # a placeholder until the test runs


@pytest.mark.parametrize("value", ["0", "-1", "fast", "nan"])
def test_bad_lr_values_are_refused(value, capsys):
    with pytest.raises(SystemExit):
        _parse("--lr", value)
    assert "--lr" in capsys.readouterr().err


def test_new_recipe_flags_reach_the_config():
    cfg = config_from_args(_parse("--warmup-steps", "30", "--clip-grad-norm", "2.5", "--schedule", "step"))
    assert (cfg.warmup_steps, cfg.clip_grad_norm, cfg.schedule) == (30, 2.5, "step")
    default = config_from_args(_parse())
    assert (default.warmup_steps, default.warmup_epochs, default.clip_grad_norm) == (-1, 0, 0.0)
    with pytest.raises(SystemExit):  # one warmup or the other
        _parse("--warmup-steps", "3", "--warmup-epochs", "1")


# --- the LR range test ---------------------------------------------------------------------------


def test_lr_schedule_is_exponential():
    lrs = lr_schedule(1e-4, 1.0, 5)
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])


def test_valley_takes_the_longest_fall():
    lrs = [10.0 ** (i / 4 - 5) for i in range(17)]
    #        flat noise        a long fall (index 3..12)                    divergence
    losses = [2.0, 2.1, 2.05, 2.0, 1.9, 1.7, 1.5, 1.2, 1.0, 0.8, 0.7, 0.65, 0.6, 0.9, 2.0, 5.0, 9.0]
    # The longest fall is 2.1 (index 1) down to 0.6 (index 12); fastai's formula takes
    # start = 12 - 12 = 0 and start + 4 + 2 (a third, then a sixth of the 12): index 6.
    assert valley(lrs, losses) == lrs[6]
    with pytest.raises(UserError, match="at least 3 steps"):
        valley(lrs[:2], losses[:2])


def _blobs(scale: float, n=512, seed=0):
    """4 overlapping classes of Gaussian blobs in 8 dimensions (not separable, so the loss has a
    floor and too high an lr shows), inputs multiplied by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x = (centres[y] + torch.randn(n, 8, generator=g)) * scale
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _loss_after(lr, batches, steps=60):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss = sum(nn.functional.cross_entropy(model(x), y) for x, y in batches) / len(batches)
    return loss.item() if math.isfinite(loss.item()) else math.inf


@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("rule", ["steepest", "valley"])
def test_lr_finder_suggests_an_lr_in_the_range_that_trains_well(scale, rule):
    """The good range is measured, not assumed: lrs whose 60-step loss is within 1.2x of the best
    on a log grid. Scaling the inputs by 10 moves that range down ~100x; the suggestion follows."""
    batches = _blobs(scale)
    grid = [10.0 ** (e / 4) for e in range(-24, 9)]
    losses = [_loss_after(lr, batches) for lr in grid]
    good = [lr for lr, loss in zip(grid, losses) if loss <= 1.2 * min(losses)]
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    result = lr_range_test(model, batches, opt, CPU, min_lr=1e-6, max_lr=1e3, steps=100, suggest=rule)
    assert result.stopped_early  # it ran into the divergence and stopped there
    assert min(good) / 1.5 <= result.suggestion <= max(good) * 1.5, (result.suggestion, good)
    assert len(result.lrs) == len(result.losses) == len(result.smoothed) < 100
    assert result.lrs == sorted(result.lrs) and result.lrs[0] == 1e-6


def test_suggestion_rules_on_a_known_curve():
    lrs = [10.0 ** (i / 4 - 5) for i in range(17)]
    losses = [2.0, 2.1, 2.05, 2.0, 1.9, 1.7, 1.5, 1.2, 0.95, 0.8, 0.7, 0.65, 0.6, 0.9, 2.0, 5.0, 9.0]
    assert minimum(lrs, losses) == lrs[12] / 10
    assert steepest(lrs, losses) == lrs[7]  # the largest fall around one point: 1.5 -> 0.95


def test_lr_finder_refuses_an_empty_range():
    with pytest.raises(UserError, match="0 < --min-lr < --max-lr"):
        lr_range_test(nn.Linear(8, 4), _blobs(1.0), _optimizer(), CPU, min_lr=1.0, max_lr=0.1)


# --- guard rails ---------------------------------------------------------------------------------


def test_clip_grad_norm_bounds_every_update():
    """Plain SGD (no momentum) moves the weights by lr x the gradient: with clipping, by at most
    lr x max_norm; without it, by far more on these huge inputs."""

    def step_size(clip):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        batch = [(torch.randn(4, 3, 2, 2) * 100, torch.randint(0, 3, (4,)))]
        engine.train_one_epoch(model, batch, opt, CPU, settings=StepSettings(clip_grad_norm=clip))
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return (after - before).norm().item()

    assert step_size(0.5) == pytest.approx(0.5, rel=1e-4)
    assert step_size(0.0) > 10


def _rising_batches():
    """A linear model, huge inputs and lr 0.1: the loss grows step by step but stays finite."""
    torch.manual_seed(0)
    return [(torch.randn(8, 3, 2, 2) * 30, torch.randint(0, 3, (8,))) for _ in range(6)]


def test_a_rising_first_epoch_loss_is_warned_about_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    lines = []
    row = engine.train_one_epoch(
        model, _rising_batches(), opt, CPU, log=lines.append, epoch=1, rise_warning=engine.RISE_WARNING
    )
    assert row["peak_step_loss"] > engine.RISE_WARNING * row["first_step_loss"]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, lines
    assert "the training loss rose from" in warnings[0] and "--lr auto" in warnings[0]
    assert "epoch 1, step" in warnings[0]


def test_no_warning_when_the_loss_falls_or_when_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    lines = []
    engine.train_one_epoch(
        model, _rising_batches(), opt, CPU, log=lines.append, epoch=1, rise_warning=engine.RISE_WARNING
    )
    assert not [line for line in lines if line.startswith("warning:")]
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine.train_one_epoch(model, _rising_batches(), opt, CPU, log=lines.append, epoch=2)
    assert not lines


def test_a_checkpoint_from_before_per_step_schedules_resumes_at_its_epoch_boundary():
    """Older checkpoints counted scheduler steps in epochs: they resume at epochs x steps."""
    from placesnet.launch.worker import _move_scheduler

    opt = _optimizer(0.1)
    sched = optim.build_scheduler(opt, "cosine", 30, 6)
    _move_scheduler(sched, 12)  # 2 epochs of 6 steps done
    opt_ref = _optimizer(0.1)
    ref = optim.build_scheduler(opt_ref, "cosine", 30, 6)
    _lrs(ref, opt_ref, 12)
    assert _lrs(sched, opt, 18) == pytest.approx(_lrs(ref, opt_ref, 18))
