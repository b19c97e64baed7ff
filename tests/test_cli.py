"""The command line as a newcomer meets it: help, typos, -v anywhere, Ctrl-C and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segsort_unsup.cli import EXIT_INTERRUPTED, run

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_untruncated(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    commands = out.split("Stages, in pipeline order:")[1]
    assert "..." not in commands and "(cache:" not in commands
    for name in ("contours", "ucm", "evaluate", "run", "weights", "demo", "embed", "retrieve", "inspect"):
        assert f"  {name}" in out


@pytest.mark.parametrize("args", [["--help"], ["embed", "--help"], ["run", "--help"]])
def test_help_does_not_import_torch(args):
    """Help lists every stage from the registry without loading torch (1.8 s of a 2-core CPU)."""
    code = ("import sys\nfrom segsort_unsup.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Usage:" in done.stdout, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _listed(section: str) -> list[str]:
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ") and not line.startswith("   ")]


def test_help_lists_the_stages_in_pipeline_order_then_the_other_commands(capsys):
    from segsort_unsup.cli import COMMANDS
    from segsort_unsup.stages import registry

    assert run(["--help"]) == 0
    stages_part, others_part = capsys.readouterr().out.split("Stages, in pipeline order:")[1].split("Other commands:")
    pipeline_order = [stage.name for stage in registry() if stage.name in COMMANDS]
    assert _listed(stages_part) == pipeline_order and "embed" in pipeline_order
    assert _listed(others_part)[0] == "run"
    assert sorted(_listed(stages_part) + _listed(others_part)) == sorted(COMMANDS)


@pytest.mark.parametrize("group", ["weights", "evaluate"])
def test_group_help_shows_whole_summaries(capsys, group):
    assert run([group, "--help"]) == 0
    commands = capsys.readouterr().out.split("Commands:")[1]
    assert "..." not in commands
    assert len(_listed(commands)) == 3


def test_per_image_commands_default_to_one_worker_per_core(monkeypatch, tmp_path):
    import os

    from segsort_unsup import parallel

    seen = {}

    def fake_make_executor(executor, *, workers, scheduler=None):
        seen["workers"] = workers
        raise parallel.InputError("stop here")

    monkeypatch.setattr(parallel, "make_executor", fake_make_executor)
    (tmp_path / "a.png").write_bytes(b"")
    assert run(["ucm", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert seen["workers"] == len(os.sched_getaffinity(0))
    assert run(["ucm", str(tmp_path), "-o", str(tmp_path / "o"), "--workers", "1"]) == 2
    assert seen["workers"] == 1


def test_mistyped_command_gets_a_suggestion(capsys):
    assert run(["countours", "x"]) == 2
    assert "Did you mean 'contours'?" in capsys.readouterr().err


def test_verbose_flag_after_the_command(capsys, tmp_path):
    code = run(["ucm", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "-v"])
    err = capsys.readouterr().err
    assert code == 2 and "No such option" not in err and "does not exist" in err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_130_without_tracebacks_and_resumes(tmp_path, bsds, sig):
    from PIL import Image
    from skimage import color, filters, io

    edges = tmp_path / "edges"
    edges.mkdir()
    for path in sorted((bsds / "images" / "test").glob("*.jpg"))[:40]:
        image_id = path.stem
        photo = io.imread(path)
        sob = filters.sobel(color.rgb2gray(photo))
        Image.fromarray((255 * sob / sob.max()).astype("uint8")).save(edges / f"{image_id}.png")
    cmd = [str(Path(sys.executable).parent / "segsort-unsup"), "ucm", str(edges), "-o", str(tmp_path / "seg"),
           "--workers", "2", "--shard-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "seg").glob("part-*.h5")):
        time.sleep(0.05)
    t0 = time.monotonic()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole foreground process group
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED and time.monotonic() - t0 < 10, err[-800:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Interrupted" in err
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr


_BUSY = """
import sys, signal
from numba import njit
from segsort_unsup import cli

@njit(nogil=True)
def spin(n):  # a long compiled loop that never returns to Python: no signal handler runs in it
    acc = 0.0
    for i in range(n):
        acc += (i % 7) * 1e-9
    return acc

spin(10)
signal.signal(signal.SIGTERM, cli._interrupt)
cli._start_stop_watchdog(grace=1.0)
print("ready", flush=True)
spin(10**12)
print("kernel finished", flush=True)
"""


def test_a_stop_request_ends_a_long_kernel_within_the_grace_period(tmp_path):
    """Inside a compiled kernel Python's SIGTERM handler cannot run; the watchdog still ends the
    process (exit 130, one line, no traceback) about a grace period after the signal."""
    script = tmp_path / "busy.py"
    script.write_text(_BUSY)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED and "kernel finished" not in out
    assert 0.9 < took < 5, f"stopped after {took:.1f} s"
    assert "Interrupted" in err and "Traceback" not in err


def test_the_long_running_kernels_release_the_gil():
    """The stop watchdog (and Dask's threads) can only run beside kernels compiled with nogil."""
    import importlib

    from numba.core.registry import CPUDispatcher

    for module in ("segsort_unsup.ucm._kernels", "segsort_unsup.evaluate._kernels",
                   "segsort_unsup.edgemaps._kernels", "segsort_unsup.discover._kernels", "segsort_unsup._heap"):
        mod = importlib.import_module(module)
        kernels = {name: f for name, f in vars(mod).items()
                   if isinstance(f, CPUDispatcher) and f.__module__ == module}
        assert kernels, module
        held = sorted(name for name, f in kernels.items() if not f.targetoptions.get("nogil"))
        assert not held, f"{module}: {held} hold the GIL"


_FORK = """
import os, signal, time
from segsort_unsup import cli

signal.signal(signal.SIGTERM, lambda *a: None)  # a forked child keeps its parent's Python handlers
cli._start_stop_watchdog(grace=0.5)
pid = os.fork()
if pid == 0:  # still a Python handler: its C part writes the signal into any wakeup pipe
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    time.sleep(30)
    os._exit(1)
time.sleep(0.3)
os.kill(pid, signal.SIGTERM)  # what a data loader does to a worker that does not exit in time
os.waitpid(pid, 0)
time.sleep(2)
print("parent still running", flush=True)
"""


def test_a_forked_childs_signal_does_not_stop_the_parent(tmp_path):
    script = tmp_path / "fork.py"
    script.write_text(_FORK)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "parent still running" in done.stdout, done.stderr
