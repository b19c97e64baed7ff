"""The ``segsort-unsup`` command line: a click group whose commands live in ``commands/``.

Commands are imported lazily so that ``--help`` and light commands do not pay for torch.
Library errors (:class:`~segsort_unsup.errors.SegsortError`) become one-line messages;
other exceptions too, with the traceback only under ``-v``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import importlib.util
import signal
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
    "features": "segsort_unsup.commands.features:features",
    "train": "segsort_unsup.commands.train:train",
    "discover": "segsort_unsup.commands.discover:discover",
    "evaluate": "segsort_unsup.commands.evaluate:evaluate",
    "demo": "segsort_unsup.commands.demo:demo",
    "run": "segsort_unsup.commands.run:run",
    "inspect": "segsort_unsup.commands.inspect:inspect",
    "embed": "segsort_unsup.commands.embed:embed",
    "transfer": "segsort_unsup.commands.transfer:transfer",
    "cluster": "segsort_unsup.commands.cluster:cluster",
    "retrieve": "segsort_unsup.commands.retrieve:retrieve",
}
OTHER_COMMANDS: tuple[str, ...] = ("run", "demo", "retrieve", "inspect", "weights")


# command name -> one-line summary for `--help` (kept here so help needs no heavy imports)
SUMMARIES: dict[str, str] = {
    "contours": "Edge probability + orientation for every image (PiDiNet or HED).",
    "weights": "List, fetch and check the contour models' pretrained weights.",
    "ucm": "OWT-UCM segment hierarchies from contour maps.",
    "features": "Frozen-trunk features of a segments store's images (cached-mode training's input).",
    "train": "Train a SegSort embedding (model.pt) on a segments store.",
    "discover": "FINCH visual groups of segment prototypes, with a gallery and a 2-D map.",
    "evaluate": "BSDS500 boundary/region benchmarks and semantic mIoU.",
    "demo": "The pipeline on bundled photos, with pictures to open.",
    "run": "Every stage of a pipeline TOML file, in order, resuming what exists.",
    "inspect": "What a store, run folder or model file holds (--json for scripts).",
    "embed": "Segments and one prototype per segment (SegSort embeddings + pixel sorting).",
    "transfer": "kNN label transfer from labelled prototypes: a label PNG per image.",
    "cluster": "Label-free cluster maps of prototypes (k-means / FINCH) for the Hungarian-matched mIoU.",
    "retrieve": "Pictures of query segments next to their nearest labelled segments.",
}
# Stage modules whose command is a module above: `stage_command(STAGE)` with a longer help (or, for
# discover, the gallery's address), imported only when that command runs; "" for semantic (`evaluate
# semantic`). Any other module of stages.STAGE_MODULES gets its command generated here from its
# config, so adding a stage is its module and one line in STAGE_MODULES. `help` lists the stage commands in pipeline
# order, then OTHER_COMMANDS.
_STAGE_MODULE_COMMANDS: dict[str, str] = {
    "segsort_unsup.contours.stage": "contours", "segsort_unsup.ucm.stage": "ucm",
    "segsort_unsup.train.stage": "train", "segsort_unsup.embed.stage": "embed",
    "segsort_unsup.transfer.stage": "transfer", "segsort_unsup.evaluate.semantic_stage": "",
    "segsort_unsup.discover.stage": "discover", "segsort_unsup.evaluate.stage": "evaluate",
}


def _stage_modules() -> tuple[str, ...]:
    """``stages.STAGE_MODULES`` without importing ``stages`` (h5py, numpy) when it is not loaded yet:
    ``--help`` stays light. The literal is read from the module's source."""
    loaded = sys.modules.get("segsort_unsup.stages")
    if loaded is not None:
        return tuple(loaded.STAGE_MODULES)
    import ast

    spec = importlib.util.find_spec("segsort_unsup.stages")
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "STAGE_MODULES":
            return tuple(ast.literal_eval(node.value))
    from .stages import STAGE_MODULES  # not a plain literal: import it after all

    return tuple(STAGE_MODULES)


def _generated_stages() -> dict:
    """The registry's stages that have no hand-written command, by name (imports only their modules)."""
    stages = {}
    for module in _stage_modules():
        if module not in _STAGE_MODULE_COMMANDS:
            stage = importlib.import_module(module).STAGE
            stages[stage.name] = stage
    return stages


def _stage_commands() -> list[str]:
    """The command of every stage, in pipeline order."""
    names = []
    for module in _stage_modules():
        name = _STAGE_MODULE_COMMANDS.get(module)
        if name is None:
            name = importlib.import_module(module).STAGE.name
        if name and name not in names:
            names.append(name)
    return names


_GLOBAL_FLAGS = {"-v", "-vv", "-vvv", "--verbose", "-q", "--quiet"}
EXIT_INTERRUPTED = 130


class _BadInput(click.ClickException):
    """A bad input or argument found past option parsing: one line, exit code 2 like a usage error."""

    exit_code = 2


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        stages = _stage_commands()
        ordered = [*stages, *OTHER_COMMANDS, *sorted(set(COMMANDS) - {*stages, *OTHER_COMMANDS})]
        return [name for name in ordered if name not in COMMANDS or _importable(COMMANDS[name])]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            stage = _generated_stages().get(name)
            if stage is None:
                return None
            from .commands.options import stage_command

            return stage_command(stage)
        if not _importable(target):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS and name not in _generated_stages():
            close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else f" Commands: {', '.join(sorted(COMMANDS))}."
            raise click.UsageError(f"No such command {name!r}.{hint}", ctx)
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        generated = {name: stage.help for name, stage in _generated_stages().items()}
        stages = [n for n in names if n in _stage_commands()]
        for title, members in (("Stages, in pipeline order", stages),
                               ("Other commands", [n for n in names if n not in stages])):
            if members:
                with formatter.section(title):
                    formatter.write_dl([(name, SUMMARIES.get(name) or generated.get(name, "")) for name in members])

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


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="segsort-unsup")
@click.option("-v", "--verbose", count=True, help="More detail; -v also shows tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
def main(verbose: int, quiet: bool) -> None:
    """Unsupervised segments and visual groups from a folder of photos (SegSort pipeline).

    Stages: contours -> ucm -> train -> embed -> transfer / discover; evaluate measures them.
    `run PIPELINE.toml` runs them all in order (see pipelines/*.toml).
    """
    setup_logging(-1 if quiet else verbose)


def _hoist_global_flags(args: list[str]) -> list[str]:
    """``segsort-unsup contours ... -v`` works like ``segsort-unsup -v contours ...``."""
    if "--" in args:
        return args
    flags = [a for a in args if a in _GLOBAL_FLAGS]
    return flags + [a for a in args if a not in _GLOBAL_FLAGS]


def _interrupt(signum, frame) -> None:
    """Ctrl-C or a scheduler's SIGTERM: stop now, keeping finished work."""
    from .parallel import request_stop

    request_stop()
    raise KeyboardInterrupt


STOP_GRACE_SECONDS = 5.0  # after Ctrl-C / SIGTERM, how long a long computation may take to reach a check point


def _start_stop_watchdog(grace: float = STOP_GRACE_SECONDS) -> None:
    """Make Ctrl-C / SIGTERM end the process within ``grace`` seconds even inside a long compiled
    kernel (a huge image's watershed or matching), where Python's own handler cannot run.

    Python's C-level handler writes each signal's number to a wakeup pipe at once; a daemon thread
    reads it, waits ``grace`` seconds for the ordinary stop (KeyboardInterrupt, stores closed,
    exit 130), and if the process is still here, leaves with exit 130 itself. That is as safe as a
    kill: every store write is atomic and an unfinished item is simply redone by the next run.
    The kernels release the GIL (numba ``nogil``), so this thread runs while they do.
    """
    import threading
    import time

    if any(t.name == "stop-watchdog" for t in threading.enumerate()):
        return  # one per process (the CLI may be run several times in one interpreter)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except ValueError:  # not the main thread (the CLI called from a library's thread): no watchdog
        os.close(read_end)
        os.close(write_end)
        return
    stops = {signal.SIGINT.value, signal.SIGTERM.value}
    # A forked child (a data-loader worker) would write its own signals into this pipe and stop
    # the parent: forked children get no wakeup pipe.
    os.register_at_fork(after_in_child=_no_wakeup_fd)

    def watch() -> None:
        while True:
            received = os.read(read_end, 64)
            if not received:
                return
            if stops.intersection(received):
                time.sleep(grace)
                import multiprocessing

                for child in multiprocessing.active_children():  # worker processes must not run on
                    child.kill()
                os.write(2, b"\nInterrupted inside a long computation: finished items are saved; "
                            b"run the same command again to resume.\n")
                os._exit(EXIT_INTERRUPTED)

    threading.Thread(target=watch, name="stop-watchdog", daemon=True).start()


def _no_wakeup_fd() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # forked from another thread than the main one
        pass


def _quiet_interrupts(unraisable) -> None:
    """A KeyboardInterrupt raised where Python cannot propagate it (a finaliser, a weakref callback) is
    not a crash: the stop flag ends the run at its next step. Anything else is reported as usual."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(unraisable)


def run(args: list[str] | None = None) -> int:
    """The console entry point; returns the exit code.

    0: every item done; 1: some item failed (the rest are saved) or the run stopped on an error;
    2: a usage error or bad input; 130: Ctrl-C or SIGTERM (finished work is saved). No traceback.
    """
    from .parallel import clear_stop

    args = _hoist_global_flags(list(sys.argv[1:] if args is None else args))
    clear_stop()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    _start_stop_watchdog()
    sys.unraisablehook = _quiet_interrupts
    try:
        # Outside standalone mode click *returns* the code of an ``Exit`` (``finish`` raises
        # ``Exit(1)`` when items failed) instead of raising it: that code is the process's.
        code = main.main(args=args, prog_name="segsort-unsup", standalone_mode=False)
    except (KeyboardInterrupt, click.Abort):
        click.echo("\nInterrupted: finished items are saved; run the same command again to resume.", err=True)
        # Stores are closed by now (their context managers ran). Leave at once: a worker pool whose
        # processes were stopped mid-reply can keep the interpreter's exit hooks waiting forever.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
