"""The ``segsort-unsup`` command line: a click group whose commands live in ``commands/``.

Commands are imported lazily so that ``--help`` and light commands do not pay for torch.
Library errors (:class:`~segsort_unsup.errors.SegsortError`) become one-line messages;
other exceptions too, with the traceback only under ``-v``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from . import __version__
from .errors import InputError, SegsortError
from .log import setup_logging

# command name -> "module:attribute" of its click command
COMMANDS: dict[str, str] = {
    "contours": "segsort_unsup.commands.contours:contours",
    "weights": "segsort_unsup.commands.weights:weights",
    "ucm": "segsort_unsup.commands.ucm:ucm",
    "evaluate": "segsort_unsup.commands.evaluate:evaluate",
    "demo": "segsort_unsup.commands.demo:demo",
    "run": "segsort_unsup.commands.run:run",
}


class _BadInput(click.ClickException):
    """A bad input or argument found past option parsing: one line, exit code 2 like a usage error."""

    exit_code = 2


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, target in COMMANDS.items() if _importable(target))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not _importable(target):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        verbose = ctx.params.get("verbose", 0) > 0
        try:
            return super().invoke(ctx)
        except InputError as exc:
            if verbose:
                raise
            raise _BadInput(str(exc)) from None
        except SegsortError as exc:
            if verbose:
                raise
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: one line unless -v
            if verbose:
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {exc} (re-run with -v for the traceback, and please report it)"
            ) from None


def _importable(target: str) -> bool:
    module = target.split(":")[0]
    return importlib.util.find_spec(module) is not None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="segsort-unsup")
@click.option("-v", "--verbose", count=True, help="More detail; -v also shows tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
def main(verbose: int, quiet: bool) -> None:
    """Unsupervised segments and visual groups from a folder of photos (SegSort pipeline).

    Stages: contours -> ucm -> (train -> discover); evaluate measures them on BSDS500.
    """
    setup_logging(-1 if quiet else verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
