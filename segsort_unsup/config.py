"""The configuration base every stage shares: typed fields, run-only fields, an identity hash.

A stage's settings are a frozen dataclass built on :class:`StageConfig`::

    @dataclass(frozen=True)
    class UcmConfig(StageConfig):
        threshold: float = 0.5
        levels: tuple[float, ...] = ()
        shard_size: int = run_only(64)

* Fields are checked against their annotations when the config is built from a mapping (a
  pipeline TOML section or CLI values): an unknown key, a wrong type or a bad value is an
  :class:`~segsort_unsup.errors.InputError` naming the file, section and key, the expected
  type and an example.
* Fields marked :func:`run_only` (workers, batch size, threads, shard size, device...) do not
  change results: they are left out of the stage's identity, so changing them never
  invalidates a store.
* :meth:`StageConfig.identity` is the rest plus the provenance of the inputs (source store
  identity, weights sha256): what a store records and checks on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import InputError

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
_RUN_ONLY = "segsort_run_only"
_OFF = "segsort_identity_off"
_HELP = "segsort_help"
_CLI = "segsort_cli"


#: the compute precisions every torch stage accepts (``auto`` picks bf16/fp16 where the hardware has it)
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Cli:
    """How a config field appears on the command line (the generated command reads it).

    flags : option spellings when ``--field-name`` is not the only one, e.g. ``("--supervised",
        "--labels-dir")``; a bool's ``"--owt/--no-owt"``.
    choices : the accepted values (a callable returning them is read when the command runs).
    low, high : bounds of a number (of each number of a list).
    metavar : the value's name in ``--help``.
    argument : a positional argument instead of an option.
    hidden : no option (a setting only pipeline files set).
    auto : the word ``auto`` stands for the default ``None`` (the stage picks a value).
    writes : a folder the stage writes (photos found there are not inputs).
    nargs : a tuple given as that many values (``--grid 5 5``) instead of comma-separated.
    multiple : a repeatable path option: one value gives a path, several a tuple of paths.
    """

    flags: tuple[str, ...] = ()
    choices: Any = ()
    low: float | None = None
    high: float | None = None
    metavar: str | None = None
    argument: bool = False
    hidden: bool = False
    auto: bool = False
    writes: bool = False
    nargs: int | None = None
    multiple: bool = False


def run_only(default: Any, *, help: str = "", **cli: Any) -> Any:  # noqa: A002 - mirrors click's spelling
    """A field that does not change results (kept out of the identity hash); ``cli``: see :class:`Cli`."""
    return field(default=default, metadata={_RUN_ONLY: True, _HELP: help, _CLI: Cli(**cli)})


def setting(default: Any, *, help: str = "", off: Any = None, **cli: Any) -> Any:  # noqa: A002
    """A result-changing field with a help text and its command-line form (:class:`Cli`).

    ``off``: the value at which the setting is left out of store identities (``None`` always is):
    for a setting added after stores were made, the value that means what those stores did.
    """
    return field(default=default, metadata={_HELP: help, _CLI: Cli(**cli), _OFF: off})


def help_of(f: dataclasses.Field) -> str:
    """The help text of a config field (its ``setting``/``run_only`` metadata), "" if none."""
    return str(f.metadata.get(_HELP, ""))


def cli_of(f: dataclasses.Field) -> Cli:
    """The command-line form of a config field (:class:`Cli`; plain defaults get ``Cli()``)."""
    return f.metadata.get(_CLI) or Cli()


def did_you_mean(unknown: list[str], known: typing.Iterable[str]) -> str:
    """`` (did you mean 'threshold'?)`` for the first unknown name close to a known one, else ""."""
    import difflib

    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


def config_hash(data: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-able mapping (16 hex digits of sha256 over sorted JSON)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_EXAMPLES = {int: "4", float: "0.5", bool: "true", str: '"text"'}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}"
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" (or omitted)" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))


def _example(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        ex = _EXAMPLES.get(inner, "...")
        return f"[{ex}, {ex}]"
    if origin in (typing.Union, types.UnionType):
        return _example(next(a for a in typing.get_args(tp) if a is not type(None)))
    return _EXAMPLES.get(tp, "...")


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp`` (lists -> tuples, ints -> floats), or _Mismatch."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _Mismatch
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    return value


@dataclass(frozen=True)
class StageConfig:
    """Base of every stage's settings (see the module doc)."""

    #: the stage name, used in messages and identities (set by each subclass)
    stage: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                coerced = _coerce(value, hints[f.name])
            except _Mismatch:
                raise InputError(self._type_error(f.name, value, hints[f.name])) from None
            object.__setattr__(self, f.name, coerced)
        seed = getattr(self, "seed", None)
        if isinstance(seed, int) and not 0 <= seed <= SEED_MAX:
            raise self.bad_value("seed", f"must be between 0 and {SEED_MAX}, got {seed}")
        self.validate()

    # -- hooks ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check values beyond their types; raise :class:`InputError` naming the key (override)."""

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "") -> StageConfig:
        """Build from a TOML section or CLI values; errors are prefixed with ``where`` (file [section])."""
        prefix = f"{where}: " if where else ""
        known = set(cls.keys())
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{prefix}unknown key(s) {', '.join(unknown)}{did_you_mean(unknown, known)}; "
                             f"known: {', '.join(sorted(known))}")
        try:
            return cls(**dict(data))
        except InputError as exc:
            raise InputError(f"{prefix}{exc}") from None

    def replace(self, **changes: Any) -> StageConfig:
        """A copy with ``changes`` (checked like any other construction)."""
        return dataclasses.replace(self, **changes)

    # -- identity -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All settings, JSON-able (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def result_fields(self) -> dict[str, Any]:
        """The settings that change results (every field not marked run-only)."""
        data = self.to_dict()
        return {f.name: data[f.name] for f in dataclasses.fields(self) if not f.metadata.get(_RUN_ONLY)}

    def identity(self, **provenance: Any) -> dict[str, Any]:
        """What a store made by this stage is: stage, result settings and input provenance.

        Settings left at ``None`` or at their ``off`` value (:func:`setting`) are left out, so adding
        an optional setting to a stage does not change the identity of the stores it made before.
        """
        off = {f.name: f.metadata.get(_OFF) for f in dataclasses.fields(self)}
        fields = {k: v for k, v in self.result_fields().items() if v is not None and v != off.get(k)}
        return {"stage": self.stage, **fields, **provenance}

    def identity_hash(self, **provenance: Any) -> str:
        return config_hash(self.identity(**provenance))

    # -- messages -----------------------------------------------------------------------------
    def _type_error(self, key: str, value: Any, tp: Any) -> str:
        return (f"key {key!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r} "
                f"(example: {key} = {_example(tp)})")

    def bad_value(self, key: str, message: str) -> InputError:
        """An :class:`InputError` for a key whose value fails a check."""
        return InputError(f"key {key!r}: {message}")


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two identities (a key present in only one counts)."""
    missing = object()
    return sorted(k for k in set(old) | set(new) if old.get(k, missing) != new.get(k, missing))
