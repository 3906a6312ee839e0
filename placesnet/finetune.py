"""A run that starts from another checkpoint's weights: train.py and sweep.py ``--init-from``.

On the driver, before Ray starts (:func:`config_from_init`): the checkpoint is found as
evaluate.py finds one (:func:`placesnet.checkpoint.locate_checkpoint`: a checkpoint or run dir, a
summary.json, ``latest``, a URI), verified and loaded, so a missing or corrupt one is one error
line; the run's config takes the checkpoint's architecture and input transform (INHERITED and
``preprocess``). On every worker, before DDP wraps the model (:func:`load_init`): the weights go
into the run's new model, the classifier head (:func:`placesnet.model.head_names`) too when the
classes are the same, and :func:`record` says where they came from, for each checkpoint's
meta.json ``source`` and summary.json. An imported model's licence and citation are carried
forward: CC BY's attribution applies to what is trained from it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from placesnet.checkpoint import MODEL_FILE, Loaded, load_checkpoint, locate_checkpoint
from placesnet.config import ARCHITECTURE, TrainConfig, UserError, flag

if TYPE_CHECKING:
    from torch import nn

# Fields a run started from a checkpoint takes from it unless they are given: the architecture
# (given, it must be the checkpoint's: it decides the shape of the weights) and the image size.
INHERITED = (*ARCHITECTURE, "image_size")
# What meta.json's ``source`` keeps of the init checkpoint's own source (an imported model's).
ATTRIBUTION = ("licence", "citation")


def open_init(spec: str) -> tuple[str, Loaded]:
    """The checkpoint ``spec`` names (``--init-from``): where it is (an absolute local path or a
    URI, as the workers will find it) and the checkpoint, verified and loaded on this machine's
    CPU. UserError naming --init-from for one that is missing, corrupt or not a checkpoint."""
    try:
        where = locate_checkpoint(spec)
        return where, load_checkpoint(where)
    except UserError as e:
        raise UserError(f"{flag('init_from')} {spec}: {e}") from None


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_from_init(args: argparse.Namespace) -> TrainConfig:
    """The run's config from train.py's or sweep.py's parsed flags (placesnet.cli.add_train_args):
    ``config_from_args(args)``, and with ``--init-from`` the checkpoint's INHERITED fields where
    they were not given (so the default lr is its model's), its ``preprocess``, and ``init_from``
    where it was found (:func:`open_init`). UserError for a given --model, --widths or --fc-hidden
    that is not the checkpoint's, and for --lr auto."""
    from placesnet.cli import config_from_args

    spec = getattr(args, "init_from", None)
    if not spec:
        return config_from_args(args)
    if args.lr == "auto":
        raise UserError(
            f"{flag('lr')} auto runs the LR range test from random weights, not from "
            f"{flag('init_from')}'s: give {flag('lr')} (the model's default is a start; fine-tuning "
            "often takes less)"
        )
    where, init = open_init(spec)
    inherited = {}
    for name in INHERITED:
        given, theirs = getattr(args, name), getattr(init.config, name)
        if given is None:
            inherited[name] = theirs
        elif name in ARCHITECTURE and given != theirs:
            raise UserError(
                f"{flag(name)} {_shown(given)} is not the {flag('init_from')} checkpoint's "
                f"{_shown(theirs)} ({where}): a run started from it has its architecture; drop "
                f"{flag(name)}, or train a new model without {flag('init_from')}"
            )
    cfg = config_from_args(argparse.Namespace(**{**vars(args), **inherited, "init_from": where}))
    return cfg.replace(preprocess=init.config.preprocess).validate()


def record(init: Loaded, where: str, head_kept: bool) -> dict:
    """meta.json's ``source`` for a run started from ``init`` (found at ``where``): where it is,
    the sha256 of its model.pt, whether its classifier head was kept, and its own ``source`` (an
    imported model's file, licence and citation; an earlier init's) with the licence and
    citation repeated at the top, where an imported checkpoint has them."""
    theirs = init.meta.get("source") or {}
    return {
        "init_from": where,
        "model_sha256": init.meta["files"][MODEL_FILE]["sha256"],
        "head": "kept" if head_kept else "new",
        **{key: theirs[key] for key in ATTRIBUTION if key in theirs},
        **({"source": theirs} if theirs else {}),
    }


def load_init(model: nn.Module, where: str, classes: list[str]) -> tuple[dict, str]:
    """Load the weights of the checkpoint at ``where`` (config.init_from) into ``model``, the
    run's freshly built model for ``classes``: all of them when the checkpoint's classes are
    ``classes`` (the same names in the same order), else all but the classifier head
    (model.head_names: its fully connected layers), which keeps its fresh initialisation. The
    checkpoint is verified again here (the file may have changed since the driver read it; a URI
    is fetched onto this node). Returns :func:`record` and one line saying what was loaded;
    UserError when the weights do not fit ``model``."""
    from placesnet.model import head_names

    try:
        init = load_checkpoint(where)
    except UserError as e:
        raise UserError(f"{flag('init_from')}: {e}") from None
    head = head_names(model)
    kept = init.classes == list(classes)

    def in_head(key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in head)

    state = init.model.state_dict()
    if not kept:
        state = {k: v for k, v in state.items() if not in_head(k)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        missing, unexpected = [str(e).splitlines()[-1].strip()], []
    new_head = sorted(k for k in model.state_dict() if in_head(k))
    if unexpected or sorted(missing) != ([] if kept else new_head):
        found = ", ".join([*missing, *unexpected][:3])
        raise UserError(
            f"{flag('init_from')} {where}: its {init.config.model} weights do not fit this run's "
            f"model ({found})"
        )
    what = (
        "every layer (the same classes)"
        if kept
        else f"every layer but the head ({', '.join(head)}), new for {len(classes)} classes "
        f"(it had {len(init.classes)})"
    )
    return record(init, where, kept), f"starting from {where} (epoch {init.epoch + 1}): {what}"
