"""Options shared by several commands, defined once, and the end-of-command summary."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any
from pathlib import Path

import click

from ..log import LOGGER_NAME
from ..stages import StageSummary

class FullHelpGroup(click.Group):
    """A command group whose ``--help`` shows each sub-command's whole first line (click cuts it at 45
    characters with "...")."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace an existing output store instead of resuming it."
)
seed_option = click.option(
    "--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
    help="Seed of every random choice (same seed, same result).",
)


def output_option(help: str) -> Callable:  # noqa: A002 - click's spelling
    """``-o/--output``: one spelling across commands."""
    return click.option("-o", "--output", required=True, type=click.Path(file_okay=True, path_type=Path), help=help)


def _cores() -> int:
    from ..parallel import available_cores

    return available_cores()


def executor_options(func: Callable) -> Callable:
    """``--executor``, ``--workers``, ``--scheduler``: where per-image work runs."""
    func = click.option("--scheduler", default=None, metavar="tcp://HOST:8786",
                        help="Dask scheduler address (with --executor dask).")(func)
    func = click.option("--workers", type=click.IntRange(min=1), default=_cores, show_default="one per core",
                        help="Worker processes (local; 1 runs in this process) or Dask workers (dask-local).")(func)
    func = click.option("--executor", type=click.Choice(["local", "dask", "dask-local"]), default="local",
                        show_default=True,
                        help="local: this process or --workers processes; dask: a Dask cluster at --scheduler; "
                             "dask-local: a Dask LocalCluster of --workers processes "
                             "(dask needs: pip install 'segsort-unsup[dask]').")(func)
    return func


def one_or_several(values: tuple[str, ...]) -> str | tuple[str, ...] | None:
    """A repeatable path option's values: None, one path, or a tuple of several (as a TOML list)."""
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def finish(*summaries: StageSummary) -> None:
    """Print each summary line; exit 1 if any item failed (the rest are saved).

    Each failure is printed once: stages log it (a warning) as it happens, so the summary only
    lists failures when warnings are hidden (``-q``).
    """
    failed = False
    already_shown = logging.getLogger(LOGGER_NAME).isEnabledFor(logging.WARNING)
    for summary in summaries:
        click.echo(summary.line(), err=True)
        if summary.ok:
            continue
        failed = True
        if already_shown:
            click.echo(f"  {len(summary.failed)} failed item(s): the reasons are above", err=True)
            continue
        shown = summary.failed[:5]
        for key, reason in shown:
            click.echo(f"  failed: {key}: {reason}", err=True)
        if len(summary.failed) > len(shown):
            click.echo(f"  ... and {len(summary.failed) - len(shown)} more (see failures.tsv in the output)",
                       err=True)
    if failed:
        raise click.exceptions.Exit(1)


# --------------------------------------------------------------------------------------------
# Commands generated from a stage's config: a stage needs no hand-written command
# --------------------------------------------------------------------------------------------
_EXECUTOR_OPTIONS = {"output", "overwrite", "executor", "workers", "scheduler"}  # every per-image stage's


class _Choice(click.Choice):
    """A choice whose values may be read when first needed (a registry that imports torch)."""

    def __init__(self, choices) -> None:
        self._source = choices
        super().__init__(())

    @property
    def choices(self) -> tuple:
        return tuple(self._source() if callable(self._source) else self._source)

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns; the source is the truth
        pass


def _list_callback(inner: type, low: float | None, high: float | None) -> Callable:
    """Parse ``"1,2,3"`` into a tuple of ``inner``, each within ``low``/``high``."""

    def parse(ctx: click.Context | None, param: click.Parameter | None, value: str | None):
        if value is None:
            return None
        try:
            values = tuple(inner(part) for part in value.split(",") if part.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {inner.__name__}") from None
        if any((low is not None and v < low) or (high is not None and v > high) or v != v for v in values):
            bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
            raise click.BadParameter(f"{value!r}: every value must be {bounds}")
        return values

    return parse


class _LevelOrWord(click.ParamType):
    """A number or a word (``int | str`` fields: a gallery level or ``requested``)."""

    name = "N|WORD"

    def convert(self, value, param, ctx):
        return int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value


class _AutoOr(click.ParamType):
    """``auto`` (None: the stage picks) or a value of ``inner``."""

    def __init__(self, inner) -> None:
        self.inner = click.types.convert_type(inner)
        self.name = f"auto|{self.inner.name}"

    def convert(self, value, param, ctx):
        return None if value in (None, "auto") else self.inner.convert(value, param, ctx)


def _number_type(base: type, cli) -> click.ParamType | type:
    if cli.low is None and cli.high is None:
        return base
    return (click.IntRange if base is int else click.FloatRange)(min=cli.low, max=cli.high)


def _base_type(tp) -> Any:
    """The type of a field without ``None``; ``int | str`` stays a union (a number or a word)."""
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tuple(args)
    return tp


def field_parameter(f, tp) -> Callable:
    """The click option (or argument) of one config field, from its type, default, help and
    :class:`~segsort_unsup.config.Cli` metadata."""
    import typing

    from ..config import cli_of, help_of

    cli, base, default = cli_of(f), _base_type(tp), f.default
    flags = cli.flags or ("--" + f.name.replace("_", "-"),)
    kwargs: dict = {"default": default, "help": help_of(f) or None, "show_default": default is not None,
                    "metavar": cli.metavar}
    if cli.argument:
        return click.argument(f.name, metavar=cli.metavar or f.name.upper())
    if cli.multiple:
        kwargs.update(multiple=True, default=(), show_default=False, type=str,
                      callback=lambda ctx, param, values: one_or_several(values))
    elif cli.auto:
        kwargs.update(type=_AutoOr(_number_type(base, cli)), default="auto" if default is None else default,
                      show_default=True)
    elif isinstance(base, tuple):
        kwargs["type"] = _LevelOrWord()
    elif cli.nargs:
        kwargs.update(nargs=cli.nargs, type=typing.get_args(base)[0])
    elif typing.get_origin(base) is tuple:
        inner = typing.get_args(base)[0]
        kwargs.update(default=",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default),
                      callback=_list_callback(inner, cli.low, cli.high), metavar=cli.metavar or "V1,V2,...",
                      show_default=bool(default))
    elif base is bool:
        flags = cli.flags or (f"{flags[0]}/--no-{flags[0][2:]}",)
    elif cli.choices:
        kwargs["type"] = _Choice(cli.choices)
    else:
        kwargs["type"] = _number_type(base, cli) if base in (int, float) else str
    return click.option(*flags, f.name, **kwargs)


def config_options(config_cls: type, *, skip: set[str] = frozenset()) -> Callable:
    """Click options for every field of a stage config (but ``skip`` and hidden ones): type, default
    and help declared once, in the config (``setting``/``run_only`` with :class:`~segsort_unsup.config.Cli`)."""
    import dataclasses
    import typing

    from ..config import cli_of

    hints = typing.get_type_hints(config_cls)

    def decorate(func: Callable) -> Callable:
        for f in reversed(dataclasses.fields(config_cls)):
            if f.name not in skip and not cli_of(f).hidden:
                func = field_parameter(f, hints[f.name])(func)
        return func

    return decorate


def _build_config(config_cls: type, values: dict):
    """The config of the given option values; an error names the other settings it mentions by
    their options (``needs png_dir`` -> ``needs --png-dir``)."""
    import dataclasses
    import re

    from ..config import cli_of
    from ..errors import InputError

    try:
        return config_cls.from_mapping(values)
    except InputError as exc:
        message = str(exc)
        for f in dataclasses.fields(config_cls):
            flag = (cli_of(f).flags or ("--" + f.name.replace("_", "-"),))[0].split("/")[0]
            if flag not in message:  # messages written for both pipeline files and options stay as they are
                message = re.sub(rf"(?<![\w'-]){f.name}(?![\w']|\s*=)", flag, message)
        raise InputError(message) from None


def _absolute_paths(stage, values: dict) -> dict:
    """The stage's path settings made absolute, as a pipeline file resolves them: the run's
    identity then names the same files whatever folder the command ran from."""
    out = {}
    for key in stage.input_paths:
        value = values.get(key)
        if isinstance(value, str):
            out[key] = os.path.abspath(value)
        elif isinstance(value, tuple):
            out[key] = tuple(os.path.abspath(v) for v in value)
    return out


def stage_command(stage, *, help: str | None = None, after: Callable | None = None) -> click.Command:  # noqa: A002
    """A command for a registry stage: its sources as arguments (``stage.arguments`` names them; an
    upstream stage's output must exist), ``-o``,
    an option per config field, the executor options when the stage spreads items over workers, and
    ``--overwrite``; it builds the config and calls the stage's ``run`` like a pipeline does.

    ``after(config, output)`` runs after the stage, also when items failed (e.g. print where a
    gallery is).
    """
    import dataclasses

    names = stage.arguments or stage.sources

    def callback(output, overwrite, **values):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
        from ..config import cli_of
        from ..io.images import excluding_outputs
        from ..parallel import make_executor

        # a stage without executor options may have settings of those names (train's loader --workers)
        executor, workers, scheduler = ((values.pop("executor"), values.pop("workers"), values.pop("scheduler"))
                                        if stage.executor else ("local", 1, None))
        inputs = [values.pop(name) for name in names]
        values.update(_absolute_paths(stage, values))
        fields = dataclasses.fields(stage.config)
        config = _build_config(stage.config, {k: v for k, v in values.items() if v is not None})
        written = [getattr(config, f.name) for f in fields if cli_of(f).writes]
        try:
            with excluding_outputs(output, *written), \
                    make_executor(executor, workers=workers, scheduler=scheduler) as pool:
                result = stage.run(config, inputs[0] if len(inputs) == 1 else inputs, output, executor=pool,
                                   overwrite=overwrite)
            finish(*(result if isinstance(result, (list, tuple)) else [result]))
        finally:
            if after is not None:
                after(config, output)

    skip = set(_EXECUTOR_OPTIONS) if stage.executor else {"output", "overwrite"}
    # an upstream stage's output must exist; the pipeline's input may also be a glob or list file
    decorators = [*(click.argument(name, metavar=name.upper(),
                                   type=click.STRING if source == "input" else click.Path(exists=True))
                    for name, source in zip(names, stage.sources)),
                  output_option(f"Folder the {stage.name} stage writes (or resumes)."),
                  config_options(stage.config, skip=skip),
                  *([executor_options] if stage.executor else []), overwrite_option]
    for decorator in reversed(decorators):  # as if written above the function, first on top
        callback = decorator(callback)
    return click.command(stage.name, help=help or stage.help or f"The {stage.name} stage.")(callback)
