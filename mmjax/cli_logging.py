"""One logging policy for the command-line entry points (train, evaluate, predict, generate, convert, data build):
mmjax's own lines, foreign warnings and errors; --verbosity=1 shows everything."""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging


# Foreign warnings that normal use always triggers: our dataset builders pass their own configs on purpose.
EXPECTED_WARNINGS = ("Using custom data configuration",)


class _OnlyOurInfo(std_logging.Filter):
    """Keeps INFO lines from mmjax only (orbax, jax and tfds log every internal step at INFO through absl), and
    drops the foreign warnings that say nothing about the user's run."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if f"{os.sep}mmjax{os.sep}" in record.pathname:
            return True
        return record.levelno >= std_logging.WARNING and not str(record.msg).startswith(EXPECTED_WARNINGS)


def quiet_foreign_info() -> None:
    """Drops other libraries' INFO lines unless --verbosity asks for debug output."""
    if logging.get_verbosity() < logging.DEBUG:
        logging.get_absl_handler().addFilter(_OnlyOurInfo())
