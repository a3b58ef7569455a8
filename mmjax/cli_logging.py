"""One logging policy for the command-line entry points (train, evaluate, data build)."""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging


class _OnlyOurInfo(std_logging.Filter):
    """Keeps INFO lines from mmjax only: orbax, jax and tfds log every internal step at INFO through absl."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or f"{os.sep}mmjax{os.sep}" in record.pathname


def quiet_foreign_info() -> None:
    """Drops other libraries' INFO lines unless --verbosity asks for debug output."""
    if logging.get_verbosity() < logging.DEBUG:
        logging.get_absl_handler().addFilter(_OnlyOurInfo())
