"""The base of our TFDS builders that read local files (no downloads): one place for what they share."""

from __future__ import annotations

import abc
import sys
from typing import Any

import tensorflow_datasets as tfds
from absl import logging
from etils import epath


class OfflineMessages:
    """TFDS prints "Downloading and preparing dataset Unknown size ..." before every build; ours download nothing,
    so they log one line before and one after instead (a mixin for GeneratorBasedBuilder subclasses)."""

    def _log_download_bytes(self) -> None:
        logging.info("building dataset %s from local files into %s", self.info.full_name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("built dataset %s: %s", self.info.full_name,
                     ", ".join(f"{name} {split.num_examples:,}" for name, split in self.info.splits.items()))


class LocalBuilder(OfflineMessages, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder whose inputs are checked once, up front, by `plan()` (cached per builder)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    # tfds derives code_path through importlib resources, which needs the `importlib_resources` backport for an
    # editable install; the answer is simply the subclass's file.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(sys.modules[cls.__module__].__file__)

    @abc.abstractmethod
    def _make_plan(self) -> Any:
        """Reads and validates every input; raises ValueError on bad input."""

    def plan(self) -> Any:
        """The validated inputs (read once per builder); raises ValueError on bad input."""
        # _info needs some of it (e.g. region dims); the generators and the summary need the rest.
        if "_plan_cache" not in self.__dict__:
            self.__dict__["_plan_cache"] = self._make_plan()
        return self.__dict__["_plan_cache"]
