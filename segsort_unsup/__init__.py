"""segsort-unsup: unsupervised segments and visual groups from unlabelled photos."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segsort-unsup")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
