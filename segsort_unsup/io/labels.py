"""Where an image's class-label PNG is: one lookup rule for every stage that reads labels.

Label sources are one or several folders (searched recursively) or list files (``.txt``/``.lst``,
one label path per line, relative to the list file, as :func:`~segsort_unsup.io.images.list_images`
reads them), e.g. CamVid's ``trainannot`` and ``extraannot`` for all 367 train frames. An image
with key ``K`` takes the label file whose key (path below its folder, without extension) is ``K``,
else the one named like ``K``'s last part (``a/b/0001TP_006690`` -> ``0001TP_006690.png``), else
the one named like the image's recorded source file. A name found in two places (two folders, or
two sub-folders of one) is an error naming both, never a silent pick.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from .images import IMAGE_EXTENSIONS, LIST_EXTENSIONS

LabelSources = str | os.PathLike | Sequence[str | os.PathLike]


def label_sources(sources: LabelSources | None) -> tuple[str, ...]:
    """``sources`` as a tuple of paths (one path, or a list of them; None: none)."""
    if sources is None:
        return ()
    if isinstance(sources, (str, os.PathLike)):
        return (os.fspath(sources),)
    return tuple(os.fspath(s) for s in sources)


def describe_sources(sources: LabelSources | None) -> str:
    """The sources for a message: ``a`` or ``a + b``."""
    return " + ".join(label_sources(sources)) or "no label folder"


def _files_of(source: str) -> list[tuple[str, Path]]:
    """``(key, path)`` of the label files of one folder or list file."""
    path = Path(source)
    if path.is_dir():
        return [(p.relative_to(path).with_suffix("").as_posix(), p) for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    if path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        found = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                full = Path(line) if Path(line).is_absolute() else path.parent / line
                found.append((_listed_key(full, path.parent), full))
        return found
    raise InputError(f"{source}: no such label folder or list file (.txt/.lst of label PNG paths)")


def _listed_key(path: Path, base: Path) -> str:
    """A listed file's key: its path below the list's folder, else its name (as list_images keys it)."""
    try:
        relative = path.resolve().relative_to(base.resolve())
    except ValueError:
        relative = Path(path.name)
    return relative.with_suffix("").as_posix()


class LabelFiles:
    """The label files of one or several sources, looked up by image key (see the module doc)."""

    def __init__(self, sources: LabelSources) -> None:
        self.sources = label_sources(sources)
        self.by_key: dict[str, list[Path]] = {}
        self.by_name: dict[str, list[Path]] = {}
        for source in self.sources:
            for key, path in _files_of(source):
                self.by_key.setdefault(key, []).append(path)
                self.by_name.setdefault(path.stem, []).append(path)
        if not self.by_name:
            raise InputError(f"{describe_sources(self.sources)}: no label PNGs found")

    def __len__(self) -> int:
        return sum(len(paths) for paths in self.by_name.values())

    def find(self, key: str, source: str | os.PathLike = "") -> Path | None:
        """The label file of the image ``key`` (recorded photo ``source``), or None if there is none."""
        last = key.replace("\\", "/").rstrip("/").split("/")[-1]
        tries = [(self.by_key, key), (self.by_name, last), (self.by_name, Path(os.fspath(source)).stem)]
        for index, name in tries:
            paths = index.get(name) if name else None
            if paths and len(paths) > 1:
                raise InputError(f"label {name!r} is found twice ({paths[0]} and {paths[1]}); keep one "
                                 f"(each image needs exactly one label PNG in {describe_sources(self.sources)})")
            if paths:
                return paths[0]
        return None

    def require(self, key: str, source: str | os.PathLike = "") -> Path:
        """:meth:`find`, or an :class:`InputError` naming the image and the sources searched."""
        path = self.find(key, source)
        if path is None:
            raise InputError(f"no label PNG for image {key!r} in {describe_sources(self.sources)}; "
                             "add it, or give the folder holding it as well")
        return path
