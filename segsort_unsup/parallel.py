"""Executors: run a per-item function in-process, on local processes, or on Dask distributed.

Every executor has one method, :meth:`Executor.map`, yielding an :class:`Outcome` (result or
error) per item as items finish, so one bad image never stops the batch. Stages never talk to
an executor's machinery directly; :class:`~segsort_unsup.stages.StageRun` decides what an item
is: for local executors one image whose result comes back to the parent, which writes shards;
for distributed ones (``distributed = True``) a chunk of images whose task writes its own
complete shard and returns only counts and failures.

* :class:`InProcess` — the calling process, one item at a time.
* :class:`ProcessPool` — ``workers`` local processes (``spawn``), started once and shared by
  every map until the executor is closed or lets them go (a pipeline's stages import torch once
  per worker; a stage that works in the calling process lets them go first); a
  worker that dies (segfault, out-of-memory kill) fails only the item that killed it; workers
  ignore Ctrl-C (the parent stops them) and die with their parent, so a killed run leaves nothing
  running.
* :class:`DaskExecutor` — a ``distributed`` cluster: ``scheduler="tcp://host:8786"``, or a
  ``LocalCluster`` of ``workers`` processes when no scheduler is given. Tasks of a lost worker
  are retried elsewhere by the scheduler. Needs the ``dask`` extra.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing as mp
import os
import signal
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import InputError
from .log import get_logger, progress

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("local", "dask", "dask-local")
DASK_HINT = "pip install 'segsort-unsup[dask]'"

log = get_logger("parallel")

# Torch threads of one inference call (a contour map, an embedding) unless --threads says otherwise,
# the same in every executor: oneDNN and torch split their reductions by thread count, so the
# bits of a bf16 (or fp32) map depend on it. Parallelism comes from worker processes instead
# (per-image commands default to one per core).
INFERENCE_THREADS = 1


def inference_threads(requested: int | None = None) -> int:
    """Torch threads for each inference call: ``requested`` (``--threads``), else :data:`INFERENCE_THREADS`."""
    return int(requested) if requested else INFERENCE_THREADS


def use_torch_threads(threads: int) -> None:
    """Set this process's torch threads before an inference call (cheap when already set)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def kept_torch_threads() -> Iterator[None]:
    """Give this process back its torch thread count on exit.

    A stage may set it for its own work (embed checks its model at one inference thread). torch and
    faiss share one OpenMP runtime, so without this every later stage of a pipeline run in this
    process (transfer's kNN search, cluster, training) would run on that one thread."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        use_torch_threads(threads)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)

_stop = {"requested": False}


def request_stop() -> None:
    """Ask every running map to stop at its next step (set by the CLI's Ctrl-C / SIGTERM handler).

    The handler also raises KeyboardInterrupt at once; the flag makes sure a library that
    swallows that exception mid-call still cannot keep the run going.
    """
    _stop["requested"] = True


def clear_stop() -> None:
    """Forget a stop request (a new run in the same process starts afresh)."""
    _stop["requested"] = False


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop was requested."""
    if _stop["requested"]:
        raise KeyboardInterrupt


@dataclass
class Outcome(Generic[T, R]):
    """What became of one item: ``result`` or ``error`` (never both)."""

    item: T
    result: R | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (no orphans after a killed run)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _worker_init() -> None:
    """Start of every local worker process: Ctrl-C is the parent's to handle; die with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


@dataclass(frozen=True)
class _MapCall:
    """Which ``map`` call a task belongs to, and that call's worker initializer."""

    token: str
    initializer: Callable[..., Any] | None = None
    initargs: tuple = ()


_current_map = {"token": None}


def _run_task(call: _MapCall, fn: Callable[[T], R], item: T) -> R:
    """In a worker: ``fn(item)``, after starting ``call``'s map in this worker if it is new.

    A worker serves every map of its pool (one import of torch and the stages per worker, not per
    stage); a new map first closes the store readers the last one kept open and runs its own
    initializer, so each map finds the worker as a fresh one would be where it matters."""
    if _current_map["token"] != call.token:
        from .io.store import close_readers

        close_readers()
        gc.collect()
        _current_map["token"] = call.token
        if call.initializer is not None:
            call.initializer(*call.initargs)
    return fn(item)


class Executor:
    """Base: ``map(fn, items)`` -> outcomes as items finish."""

    name = "executor"
    distributed = False
    workers = 1
    local_workers = 0  # worker processes sharing this machine's cores (0: none or unknown)

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str = "", total: int | None = None,
            unit: str = "img", weight: Callable[[T], int] | None = None,
            initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> Iterator[Outcome[T, R]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers or the cluster connection."""

    def release_idle(self) -> None:
        """Let idle local worker processes go until the next map (a stage that works in the calling
        process is next: their memory, and any GPU context they hold, is its own again)."""

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcess(Executor):
    """Run every item in the calling process, in order."""

    name = "in-process"

    def map(self, fn, items, *, desc="", total=None, unit="img", weight=None, initializer=None, initargs=()):
        items = list(items)
        total = sum(weight(i) for i in items) if weight else (len(items) if total is None else total)
        if initializer is not None:
            initializer(*initargs)
        with progress(total=total, desc=desc, unit=unit) as bar:
            for item in items:
                check_stop()
                try:
                    outcome = Outcome(item, result=fn(item))
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 - reported per item by the caller
                    outcome = Outcome(item, error=exc)
                bar.update(weight(item) if weight else 1)
                yield outcome


class ProcessPool(Executor):
    """``workers`` local processes; at most ``2 * workers`` items in flight (results are saved as they come).

    The processes start at the first ``map`` and serve every later one until :meth:`close` or
    :meth:`release_idle` (a pipeline's stages share them); a map that is interrupted or fails stops
    them, and the next map starts new ones."""

    name = "local processes"

    def __init__(self, workers: int):
        if workers < 1:
            raise InputError("--workers must be >= 1")
        self.workers = self.local_workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._busy = False  # a map has items in flight (its caller may have stopped reading it)

    def _live_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = mp.get_context("spawn")  # workers are our children: PDEATHSIG reaches them
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_worker_init)
        return self._pool

    def _drop_pool(self, *, kill: bool) -> None:
        pool, self._pool = self._pool, None
        self._busy = False
        if pool is None:
            return
        if kill:
            _terminate(pool)
        else:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        # busy: the caller left a map mid-way (Ctrl-C while it saved a result): nobody will record
        # what the workers are doing, so they are stopped, not waited for
        self._drop_pool(kill=self._busy)

    def release_idle(self) -> None:
        self.close()  # the next map starts new workers

    def map(self, fn, items, *, desc="", total=None, unit="img", weight=None, initializer=None, initargs=()):
        items = list(items)
        total = sum(weight(i) for i in items) if weight else (len(items) if total is None else total)
        step = (lambda it: weight(it)) if weight else (lambda it: 1)
        call = _MapCall(uuid.uuid4().hex, initializer, tuple(initargs))

        mine: ProcessPoolExecutor | None = None  # the pool this map submits to (a dead worker's is replaced)

        def submit(item) -> Future:
            nonlocal mine
            mine = self._live_pool()
            return mine.submit(_run_task, call, fn, item)

        with progress(total=total, desc=desc, unit=unit) as bar:
            self._busy = True
            pending: dict[Future, Any] = {}
            retry: list = []  # in flight when a worker died: run again once, alone
            crashes: dict[int, int] = {}
            iterator = iter(items)
            try:
                exhausted = False
                while True:
                    if retry:  # suspects of a worker death run alone, so a second death is surely theirs
                        if not pending:
                            item = retry.pop()
                            pending[submit(item)] = item
                    else:
                        while not exhausted and len(pending) < 2 * self.workers:
                            try:
                                item = next(iterator)
                            except StopIteration:
                                exhausted = True
                                break
                            pending[submit(item)] = item
                    if not pending:
                        break
                    done: set = set()
                    while not done:
                        check_stop()
                        done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    if any(isinstance(fut.exception(), BrokenProcessPool) for fut in done):
                        self._drop_pool(kill=False)  # the next submit starts a new one
                        self._busy = True
                        for fut, item in list(pending.items()):
                            del pending[fut]
                            crashes[id(item)] = crashes.get(id(item), 0) + 1
                            if crashes[id(item)] >= 2:
                                bar.update(step(item))
                                yield Outcome(item, error=RuntimeError("its worker process died (crash or out of memory)"))
                            else:
                                retry.append(item)
                        continue
                    for fut in done:
                        item = pending.pop(fut)
                        exc = fut.exception()
                        bar.update(step(item))
                        yield Outcome(item, error=exc) if exc is not None else Outcome(item, result=fut.result())
            except BaseException:
                # Ctrl-C, SIGTERM, errors: stop now, waiting for nobody; unless the executor was
                # closed meanwhile and another map has new workers (this map was left suspended)
                if mine is not None and self._pool is mine:
                    self._drop_pool(kill=True)
                raise
            self._busy = False


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's workers now (Ctrl-C, errors): they must not finish work nobody will record."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.kill()
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.join(timeout=2)


class DaskExecutor(Executor):
    """Tasks on a Dask ``distributed`` cluster (a remote scheduler, or a ``LocalCluster``)."""

    distributed = True

    def __init__(self, scheduler: str | None = None, *, workers: int = 2, threads_per_worker: int = 1):
        try:
            import distributed
        except ImportError:
            raise InputError(f"the dask executors need dask.distributed: {DASK_HINT}") from None
        self._cluster = None
        if scheduler:
            self.name = f"dask {scheduler}"
            try:
                self.client = distributed.Client(scheduler, timeout="20s", set_as_default=True)
            except (OSError, TimeoutError) as exc:
                raise InputError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one with "
                                 f"`dask scheduler` and workers with `dask worker {scheduler}`") from None
            self.workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        else:
            self.name = "dask-local"
            if workers < 1:
                raise InputError("--workers must be >= 1")
            self._cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                dashboard_address=None, silence_logs=logging.ERROR,
            )
            self.client = distributed.Client(self._cluster, set_as_default=True)
            self.workers = self.local_workers = workers

    def map(self, fn, items, *, desc="", total=None, unit="img", weight=None, initializer=None, initargs=()):
        from distributed import as_completed

        items = list(items)
        total = sum(weight(i) for i in items) if weight else (len(items) if total is None else total)
        step = (lambda it: weight(it)) if weight else (lambda it: 1)
        if initializer is not None:
            self.client.run(initializer, *initargs)
        with progress(total=total, desc=desc, unit=unit) as bar:
            iterator = iter(items)
            futures: dict[Any, Any] = {}
            limit = max(4, 4 * self.workers)

            def submit(item):
                fut = self.client.submit(fn, item, pure=False)
                futures[fut] = item
                return fut

            for item in iterator:
                submit(item)
                if len(futures) >= limit:
                    break
            queue = as_completed(list(futures))
            try:
                for fut in queue:
                    check_stop()
                    item = futures.pop(fut)
                    try:
                        outcome = Outcome(item, result=fut.result())
                    except Exception as exc:  # noqa: BLE001 - the task's own error (or KilledWorker)
                        outcome = Outcome(item, error=exc)
                    fut.release()
                    bar.update(step(item))
                    for nxt in iterator:
                        queue.add(submit(nxt))
                        break
                    yield outcome
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close()


def make_executor(executor: str = "local", *, workers: int = 1, scheduler: str | None = None) -> Executor:
    """The executor named on the command line / in a pipeline file.

    ``local`` with ``workers`` 1 runs in-process, more workers use local processes;
    ``dask`` connects to ``scheduler``; ``dask-local`` starts a ``LocalCluster`` of ``workers``.
    """
    if executor == "local":
        if scheduler:
            raise InputError("--scheduler goes with --executor dask")
        return InProcess() if workers <= 1 else ProcessPool(workers)
    if executor == "dask":
        if not scheduler:
            raise InputError("--executor dask needs --scheduler tcp://HOST:8786 (or use --executor dask-local)")
        return DaskExecutor(scheduler)
    if executor == "dask-local":
        if scheduler:
            raise InputError("--executor dask-local starts its own cluster; drop --scheduler (or use --executor dask)")
        return DaskExecutor(None, workers=max(1, workers))
    raise InputError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
