"""Command-line pieces shared by rayjobs/, tuning/ and serving/: the flags of TrainConfig's fields
(derived from each field's option()), the config from those flags, and the wrapper that turns a
UserError into one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from placesnet.config import (
    DATA,
    DERIVED_DEFAULTS,
    INPUT,
    MODEL,
    MODEL_LR,
    NO_FLAG,
    REFERENCE_BATCH,
    Interrupted,
    TrainConfig,
    UserError,
    fill_defaults,
    flag,
    recipe_of,
)

PACKAGE_DIR = Path(__file__).resolve().parent


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def worker_count(text: str) -> int | tuple[int, int]:
    """``--num-workers``/``--workers-per-trial``: ``N`` (a fixed number) or ``MIN-MAX`` (an elastic
    run: as many as the cluster holds, at least MIN); ``N-N`` is ``N``."""
    low, dash, high = text.partition("-")
    try:
        first = positive_int(low)
        if not dash:
            return first
        last = positive_int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX (e.g. 2 or 1-4), got {text!r}") from None
    if last < first:
        raise argparse.ArgumentTypeError(f"MIN-MAX needs MIN <= MAX, got {text!r}")
    return first if first == last else (first, last)


def worker_range(workers, ray_data: bool = False):
    """``(min, max)`` of ``--num-workers``/``--workers-per-trial`` (``N``, ``(MIN, MAX)`` or None):
    ``min`` is None for a fixed number. An elastic range is refused with ``ray_data``."""
    if not isinstance(workers, tuple):
        return None, workers
    if ray_data:
        raise UserError(
            f"{workers[0]}-{workers[1]} workers (elastic) needs --input loader: with --input ray-data "
            "each worker's batch is the global batch split by the worker count, so a resize would "
            "change the batches; give one number of workers, or use --input loader"
        )
    return workers


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def lr_value(text: str) -> float | str:
    """--lr: a positive float, or "auto" (run the LR range test first)."""
    if text == "auto":
        return text
    try:
        return positive_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'auto', got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# How a flag's text becomes its field's value: by the field's type, except where the flag takes
# other text than the field holds: --lr also 'auto', and --clip-grad-norm and --warmup-steps only
# real values, not their field's "off" / "automatic" sentinel (0.0, -1).
_PARSE_BY_TYPE = {
    "int": int,
    "int | None": int,
    "float": float,
    "str": str,
    "str | None": str,
    "tuple[int, ...]": int_list,
}
FLAG_PARSE = {"lr": lr_value, "clip_grad_norm": positive_float, "warmup_steps": non_negative_int}


def option_fields() -> list[dataclasses.Field]:
    """TrainConfig's fields that are command-line options: all but NO_FLAG, each an option()."""
    found = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in NO_FLAG:
            continue
        if "help" not in f.metadata:
            raise TypeError(
                f"TrainConfig.{f.name} is not an option(): declare it with one, or list it in NO_FLAG"
            )
        found.append(f)
    return found


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_field_arg(container, name: str, default_help: str | None = None) -> None:
    """Add the flag of TrainConfig field ``name`` (config.flag) to a parser or argument group, with
    the help, choices and default of its option(); the value lands in ``args.<name>``. An option
    in DERIVED_DEFAULTS starts as None (fill_defaults resolves it). ``default_help`` replaces what
    the help says of the default (a command whose default comes from elsewhere)."""
    f = {f.name: f for f in option_fields()}[name]
    meta = f.metadata
    text = meta["help"]
    if f.type == "bool":  # a switch: the flag sets the field to the opposite of its default
        action = "store_false" if f.default else "store_true"
        container.add_argument(flag(name), dest=name, action=action, help=text.replace("%", "%%"))
        return
    shown = default_help or meta["default_help"] or (None if f.default is None else _shown(f.default))
    text += f" (default: {shown})" if shown else ""
    container.add_argument(
        flag(name),
        dest=name,
        type=FLAG_PARSE.get(name) or _PARSE_BY_TYPE[f.type],
        choices=meta["choices"],
        default=None if name in DERIVED_DEFAULTS else f.default,
        metavar=meta["metavar"],
        help=text.replace("%", "%%"),  # argparse %-formats help
    )


def add_config_args(p: argparse.ArgumentParser, group: str) -> argparse._ArgumentGroup:
    """Add the flag of every option() of TrainConfig in ``group`` (config.GROUPS) to ``p``, under
    that --help heading, in field order; options with one ``exclusive`` tag are mutually exclusive.
    Returns the argument group, for a command's own flags under the same heading."""
    g = p.add_argument_group(group)
    exclusive = {}
    for f in option_fields():
        if f.metadata["group"] != group:
            continue
        tag = f.metadata["exclusive"]
        if tag and tag not in exclusive:
            exclusive[tag] = g.add_mutually_exclusive_group()
        add_field_arg(exclusive[tag] if tag else g, f.name)
    return g


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data options, and --no-check-files (a check before training, not part of the config)."""
    g = add_config_args(p, DATA)
    g.add_argument(
        "--no-check-files",
        dest="check_files",
        action="store_false",
        help="before training, check only the list files, not that every listed image "
        "exists and is non-empty (a stat per file: for slow network filesystems)",
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model, optimisation and speed options."""
    add_config_args(p, MODEL)


def add_input_arg(p: argparse.ArgumentParser) -> None:
    """--input and --decode, for the commands that train under Ray (train.py, sweep.py)."""
    add_config_args(p, INPUT)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig option, by --help heading, and --no-check-files: train.py's and sweep.py's."""
    add_data_args(p)
    add_model_args(p)
    add_input_arg(p)


def _config(args: argparse.Namespace, fields: list[dataclasses.Field]) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}
    if values.get("lr") == "auto":  # a placeholder until the LR range test has run
        values["lr"] = None
    return TrainConfig(**fill_defaults(values)).validate()


def data_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig from add_data_args' flags alone (the other fields at defaults)."""
    return _config(args, [f for f in option_fields() if f.metadata["group"] == DATA])


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig from parsed flags: each option the parser had (the others at their
    field defaults), with the defaults that depend on other options filled in (fill_defaults)."""
    return _config(args, option_fields())


def lr_source(args: argparse.Namespace, cfg: TrainConfig) -> str:
    """Where the lr of ``cfg`` came from, for the line train.py prints before training."""
    if args.lr is not None and args.lr != "auto":
        return flag("lr")
    return (
        f"{cfg.model} default {MODEL_LR[recipe_of(cfg.model)]:g} per {REFERENCE_BATCH} images x "
        f"{cfg.batch_size}/{REFERENCE_BATCH}"
    )


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def ray_init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster in --address / RAY_ADDRESS, or start a local Ray.

    The package travels to the workers as a py_module, so ``python rayjobs/train.py`` works
    without installing the project and ``ray job submit --working-dir .`` works on any cluster.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train 2.60 starts a PreemptionWatcher actor per run that only logs node drains (this
    # project does not read them) and makes the core worker warn about its restartable
    # constructor arguments on every run; off unless the user turns it on.
    env_vars = {PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0")}
    kwargs = dict(
        runtime_env={"py_modules": [str(PACKAGE_DIR)], "env_vars": env_vars},
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {e}") from None


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_cli(main: Callable[[], int | None], resumable: bool = False) -> None:
    """Run ``main``; a UserError becomes one line on stderr and exit 2, Ctrl-C or SIGTERM one line
    and exit 130 (``resumable``: the line says the same command resumes)."""
    prog = Path(sys.argv[0]).name
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        sys.exit(main() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted" + (": resume with the same command" if resumable else ""), file=sys.stderr
        )
        sys.exit(130)
