"""Errors that reach the user as one line naming the file and what to do.

Library code raises these; the CLI turns them into ``click`` errors (exit code 1 or 2)
without a traceback unless ``-v`` is given.
"""

from __future__ import annotations

from pathlib import Path


class SegsortError(Exception):
    """Base class: an error whose message is fit to show a user as one line."""


class _PathError(SegsortError):
    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes (default uses self.args)
        return (type(self), (self.path, self.reason))


class BadImageError(_PathError):
    """An input image cannot be read or used (unreadable, truncated, wrong shape...)."""


class StoreError(_PathError):
    """An HDF5 store is missing, corrupt, locked, or was written with another configuration."""


class WeightsError(_PathError):
    """Model weights are missing, of the wrong format, or fail their checksum."""


class InputError(SegsortError):
    """A bad argument combination or input source (not tied to one file)."""
