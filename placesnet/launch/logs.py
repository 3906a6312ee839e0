"""Log lines and filters of the Train workers and controller: one line per message on the driver,
no traceback for a user's mistake, Ray Train's per-report chatter quiet."""

from __future__ import annotations

import logging
import sys

from placesnet.config import UserError


def echo(message: str) -> None:
    # Ray Train patches print() to also feed its logger, which prints every line twice;
    # writing to the process's real stdout shows it once on the driver.
    print(message, file=sys.__stdout__, flush=True)


class _UserErrorTracebacks(logging.Filter):
    """Drops Ray's "Error in training function" traceback for a UserError raised in this worker
    (see :func:`user_error`): the driver prints its one line, and a traceback of bad data or a
    corrupt checkpoint only hides it. A collective that lost its peer (a worker or node died) is
    one line. Tracebacks of real bugs still show."""

    pending = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Error in training function" not in str(record.msg):
            return True
        if _UserErrorTracebacks.pending:
            _UserErrorTracebacks.pending = False
            return False
        # A peer lost (its process or node died): one line; Ray restarts the group or the driver
        # says why the run ended. The dead peer's own error, if any, still shows.
        lines = [line.strip() for line in str(record.msg).splitlines() if line.strip()]
        if lines and any(words in lines[-1] for words in PEER_LOST):
            record.msg, record.args = f"a peer worker is gone: {lines[-1][:300]}", ()
        return True


def user_error(error: UserError) -> UserError:
    """Mark ``error`` as the user's before it leaves the training function (``raise user_error(e)``)."""
    _UserErrorTracebacks.pending = True
    return error


def quiet_ray_train() -> None:
    # Ray Train logs every report() at INFO ("Reporting training result ..."), a screenful per
    # epoch; LoggingConfig(log_level) does not reach that logger in 2.60, so quiet it here.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    util_logger = logging.getLogger("ray.train.v2._internal.util")
    if not any(isinstance(f, _UserErrorTracebacks) for f in util_logger.filters):
        util_logger.addFilter(_UserErrorTracebacks())
    try:  # that message's logger is named after its file path, not its module
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


class _PlacementTimeoutTracebacks(logging.Filter):
    """Drops Ray's "Error in control loop iteration" record (a ~30-line traceback) for a worker
    group that could not be placed in time: the failure policy says it in one line instead
    (placesnet/launch/trainer.py). Other controller errors still show in full."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, WorkerGroupStartupTimeoutError)


class _NoTraceback(logging.Filter):
    """Keeps a record's own line, without its traceback: for Ray's warning that the backend could
    not shut down cleanly, which Ray itself says is expected when a worker (its node) is gone."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _add_filter(logger_name: str, kind: type[logging.Filter]) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


def quiet_controller() -> None:
    """On the Train controller, after Ray configured its loggers: a lost node or a placement that
    timed out is one line each, not a traceback."""
    _add_filter("ray.train.v2._internal.execution.controller.controller", _PlacementTimeoutTracebacks)
    _add_filter("ray.train.v2._internal.callbacks.backend_setup", _NoTraceback)


# A collective that lost its peer: the surviving ranks' error after a worker or its node died.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
