"""Run a per-item function over many items, in-process or across processes, with progress.

Per-image stages (contours, ucm, evaluation) call :func:`map_items`; every item yields
either a result or the exception it raised, so one bad image never stops the batch.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .log import progress

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Outcome(Generic[T, R]):
    """What became of one item: ``result`` or ``error`` (never both)."""

    item: T
    result: R | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def map_items(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int = 1,
    desc: str = "",
    total: int | None = None,
    unit: str = "img",
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
) -> Iterator[Outcome[T, R]]:
    """Apply ``fn`` to each item, yielding :class:`Outcome` as items finish (any order if ``workers > 1``).

    With ``workers > 1``, ``fn`` and ``initializer`` must be module-level functions (they are
    sent to ``forkserver`` worker processes). At most ``2 * workers`` items are in flight, so
    results are consumed (and saved) as they come. KeyboardInterrupt cancels pending work. A worker
    that dies (segfault, out-of-memory kill) fails only the item that killed it: the items in
    flight with it are retried once, one at a time, in a fresh pool.
    """
    items = list(items) if total is None else items
    total = len(items) if total is None else total
    with progress(total=total, desc=desc, unit=unit) as bar:
        if workers <= 1:
            if initializer is not None:
                initializer(*initargs)
            for item in items:
                try:
                    outcome = Outcome(item, result=fn(item))
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 - reported per item by the caller
                    outcome = Outcome(item, error=exc)
                bar.update(1)
                yield outcome
            return
        ctx = mp.get_context("forkserver")

        def new_pool() -> ProcessPoolExecutor:
            return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer, initargs=initargs)

        pool = new_pool()
        pending: dict[Future, T] = {}
        retry: list[T] = []  # in flight when a worker died: run again once, alone
        crashes: dict[int, int] = {}  # id(item) -> worker deaths it was in flight for
        iterator = iter(items)
        try:
            exhausted = False
            while True:
                if retry:  # suspects of a worker death run alone, so a second death is surely theirs
                    if not pending:
                        item = retry.pop()
                        pending[pool.submit(fn, item)] = item
                else:
                    while not exhausted and len(pending) < 2 * workers:
                        try:
                            item = next(iterator)
                        except StopIteration:
                            exhausted = True
                            break
                        pending[pool.submit(fn, item)] = item
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                if any(isinstance(fut.exception(), BrokenProcessPool) for fut in done):
                    # A worker died (segfault, out of memory...): every item in flight fails with it and
                    # the culprit is unknown. Retry each once, alone, in a fresh pool.
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = new_pool()
                    for fut, item in list(pending.items()):
                        del pending[fut]
                        crashes[id(item)] = crashes.get(id(item), 0) + 1
                        if crashes[id(item)] >= 2:
                            bar.update(1)
                            yield Outcome(item, error=RuntimeError("its worker process died (crash or out of memory)"))
                        else:
                            retry.append(item)
                    continue
                for fut in done:
                    item = pending.pop(fut)
                    exc = fut.exception()
                    bar.update(1)
                    yield Outcome(item, error=exc) if exc is not None else Outcome(item, result=fut.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
