"""What transformers warns about while a block runs, for tests that a deprecated call is no longer made."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

from transformers.utils import logging as hf_logging


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextlib.contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """Messages of the Python warnings raised and the transformers log warnings logged inside the block (filled in
    when it ends). Both are shown once per process by default; here every one is kept, so an earlier test cannot
    hide a warning from this one."""
    messages: list[str] = []
    handler = _Collect(messages)
    logger = hf_logging.get_logger("transformers")
    logging.Logger.warning_once.cache_clear()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        logger.removeHandler(handler)
    messages += [str(w.message) for w in caught]
