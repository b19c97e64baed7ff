"""Logging that cooperates with tqdm progress bars."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

LOGGER_NAME = "segsort_unsup"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def get_logger(name: str | None = None) -> logging.Logger:
    """Logger under the package namespace (``segsort_unsup.<name>``)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def setup_logging(verbosity: int = 0) -> None:
    """Configure the package logger: -1 quiet (errors), 0 info, >=1 debug."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    level = logging.ERROR if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logger.setLevel(level)


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "img", disable: bool | None = None,
             initial: int = 0):
    """A tqdm bar with the package's defaults (hidden when output is not a terminal and quiet);
    ``initial``: work already done (a resumed run's bar starts there)."""
    if disable is None:
        disable = logging.getLogger(LOGGER_NAME).level > logging.INFO
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                initial=initial)
