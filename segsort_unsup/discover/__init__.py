"""Discovery of visual groups: FINCH clustering of feature vectors (``finch``)."""

from .finch import FinchResult, finch

__all__ = ["FinchResult", "finch"]
