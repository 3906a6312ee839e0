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
    corrupt checkpoint only hides it. Tracebacks of real bugs still show."""

    pending = False

    def filter(self, record: logging.LogRecord) -> bool:
        if _UserErrorTracebacks.pending and "Error in training function" in record.getMessage():
            _UserErrorTracebacks.pending = False
            return False
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
