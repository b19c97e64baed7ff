"""The stage skeleton: what every stage reports, the runner that owns its store, and the registry.

Every stage module exports its config class (a :class:`~segsort_unsup.config.StageConfig`),
one function ``run(config, inputs, output, *, executor, overwrite) -> StageSummary`` and
``STAGE = Stage(...)``; :data:`STAGE_MODULES` lists them in pipeline order. Adding a stage is one
module and one line there: the pipeline loops over :func:`registry` (a pipeline file takes its
``[section]``) and the command line generates ``segsort-unsup <stage>`` from its config's fields
(``commands/options.stage_command``: type, default, help and spelling declared once, by
``setting``/``run_only``). A module in ``commands/`` is needed only for a longer help text or
behaviour around the run.

A store-writing stage wraps its work in :class:`StageRun`, which owns the store writer, the
to-do list (items already complete are skipped), the recording of each outcome (a stored
item, or a failure: one log line, one ``failures.tsv`` row, one summary entry, in one
format) and the summary. Per-image stages hand it a module-level ``process(job) -> Item`` and
an executor (:meth:`StageRun.run_jobs`); batched torch stages feed it from their own loops
(:meth:`StageRun.add`, :meth:`StageRun.fail`).
"""

from __future__ import annotations

import importlib
import math
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .config import StageConfig
from .errors import SegsortError
from .io.sources import ItemSources
from .io.store import FLUSH_BYTES, SCHEMAS, Item, ShardInfo, StoreWriter, close_readers, item_nbytes, write_shard
from .log import get_logger
from .parallel import Executor, InProcess, kept_torch_threads

log = get_logger("stages")


@dataclass
class StageSummary:
    """Counts of one stage run: items done now, skipped (already complete), failed (with reasons)."""

    stage: str
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    output: str = ""
    identity_hash: str = ""
    note: str = ""  # e.g. the scores of an evaluation, shown after the counts
    seconds: float | None = None  # wall time, when the caller measured it (pipelines do)

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        """One line for the terminal."""
        text = f"{self.stage}: {self.done} done, {self.skipped} already complete, {len(self.failed)} failed of {self.total}"
        if self.output:
            text += f" -> {self.output}"
        if self.note:
            text += f": {self.note}"
        if self.seconds is not None:
            minutes, seconds = divmod(round(self.seconds), 60)
            text += f" [{minutes} min {seconds:02d} s]" if minutes else f" [{self.seconds:.1f} s]"
        return text


def failure_reason(error: BaseException) -> str:
    """One line for a failed item: library errors speak for themselves (path: reason), others name their type."""
    if isinstance(error, (SegsortError, ValueError)):
        return " ".join(str(error).split()) or type(error).__name__
    return " ".join(f"{type(error).__name__}: {error}".split())


class Job(Protocol):
    """What a per-image task is: small, picklable, with the item's key."""

    key: str


@dataclass(frozen=True)
class ChunkTask:
    """A distributed task: run ``process`` over ``jobs`` and write their items as one complete shard."""

    process: Callable[[Any], Item]
    jobs: tuple
    root: str
    shard: str
    kind: str
    epoch: str | None
    sources: ItemSources | None = None  # the inputs of these jobs: their fingerprints are recorded

    def __len__(self) -> int:
        return len(self.jobs)


@dataclass
class ChunkResult:
    """What a distributed task returns: the shard it wrote (if any) and its failures."""

    shards: list[ShardInfo]
    failed: list[tuple[str, str]]


def run_chunk(task: ChunkTask) -> ChunkResult:
    """Process a chunk and write its shards (runs on a worker; module-level so it pickles by reference).

    Items are written as one shard, or several when their arrays pass ``FLUSH_BYTES`` (a chunk of
    huge images is not held in the worker's memory until its last image is done).
    """
    items: list[Item] = []
    shards: list[ShardInfo] = []
    failed: list[tuple[str, str]] = []
    pending = 0

    def write() -> None:
        name = task.shard if not shards else f"{task.shard[:-len('.h5')]}-{len(shards)}.h5"
        inputs = {it.key: task.sources.fingerprint(it.key) for it in items} if task.sources is not None else None
        shards.append(write_shard(task.root, name, items, schema=SCHEMAS.get(task.kind), epoch=task.epoch,
                                  inputs=inputs))
        items.clear()

    for job in task.jobs:
        try:
            items.append(task.process(job))
        except Exception as exc:  # noqa: BLE001 - one bad image never fails its chunk
            failed.append((job.key, failure_reason(exc)))
            continue
        pending += item_nbytes(items[-1])
        if pending >= FLUSH_BYTES or items[-1].stream:  # a streamed item is huge: written at once
            write()
            pending = 0
    if items:
        write()
    return ChunkResult(shards, failed)


class StageRun:
    """One run of a store-writing stage: store writer, to-do list, outcome recording, summary.

    Parameters
    ----------
    stage : the stage's name (messages, summary).
    output : the store folder.
    kind : the store kind (its schema is checked on every item).
    identity : result settings + input provenance (``config.identity(...)``); a store with
        another identity is refused unless ``overwrite``.
    meta : further provenance for the manifest (weights file, device...); the package version is added.
    overwrite : ``False``, ``True`` or ``"changed"`` (see :class:`StoreWriter`).
    sources : what each item is computed from (:func:`~segsort_unsup.io.sources.item_sources`): its
        fingerprint is recorded with the item, and an item whose input changed since is redone.
    """

    def __init__(self, stage: str, output: str | os.PathLike, *, kind: str, identity: dict[str, Any],
                 meta: dict[str, Any] | None = None, overwrite: bool | str = False, shard_size: int = 64,
                 sources: ItemSources | None = None):
        self.stage = stage
        self.output = Path(output)
        self.kind = kind
        self.identity = identity
        self.meta = {"package_version": __version__, **(meta or {})}
        self.overwrite = overwrite
        self.shard_size = shard_size
        self.sources = sources
        self.writer: StoreWriter | None = None
        self.summary = StageSummary(stage, output=str(output))

    def __enter__(self) -> StageRun:
        self.writer = StoreWriter(self.output, kind=self.kind, config=self.identity, meta=self.meta,
                                  shard_size=self.shard_size, overwrite=self.overwrite)
        self.summary.identity_hash = self.writer.config_hash
        if self.writer.replaced_keys:
            log.info("%s: settings changed (%s); %s is recomputed", self.stage,
                     ", ".join(self.writer.replaced_keys), self.output)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            close_readers()

    # -- to-do --------------------------------------------------------------------------------
    def todo(self, jobs: Iterable[Job]) -> list:
        """The jobs whose items are not yet complete, or whose input changed since their item was
        stored (those items are withdrawn first); sets the summary's total and skipped."""
        jobs = list(jobs)
        self._forget_changed(jobs)
        todo = [job for job in jobs if job.key not in self.writer.completed]
        if self.sources is not None:
            self.sources.snapshot(job.key for job in todo)
        self.summary.total = len(jobs)
        self.summary.skipped = len(jobs) - len(todo)
        if self.summary.skipped:
            log.info("%s: %d of %d items already in %s: skipped", self.stage, self.summary.skipped, len(jobs),
                     self.output)
        return todo

    def _forget_changed(self, jobs: list) -> None:
        if self.sources is None:
            return
        recorded = self.writer.inputs
        changed = [job.key for job in jobs if job.key in self.writer.completed
                   and not self.sources.unchanged(job.key, recorded.get(job.key))]
        if changed:
            log.info("%s: the input of %d stored item(s) changed since they were computed (first: %s): "
                     "recomputed", self.stage, len(changed), changed[0])
            self.writer.forget(changed)

    # -- recording ----------------------------------------------------------------------------
    def add(self, item: Item) -> None:
        """Record a finished item (durable when its shard is flushed)."""
        self.writer.add(item, input_id=self.sources.fingerprint(item.key) if self.sources is not None else None)
        self.summary.done += 1

    def fail(self, key: str, error: BaseException | str) -> None:
        """Record a failed item: one log line now, a row in failures.tsv, an entry in the summary."""
        reason = error if isinstance(error, str) else failure_reason(error)
        log.warning("%s: %s: %s", self.stage, key, reason)
        self.writer.record_failure(key, reason)
        self.summary.failed.append((key, reason))

    def record(self, key: str, result: Item | None, error: BaseException | None) -> None:
        if error is not None:
            self.fail(key, error)
        else:
            self.add(result)

    def record_chunk(self, result: ChunkResult) -> None:
        """Record what a distributed task wrote and what failed in it."""
        for shard in result.shards:
            self.writer.register_shard(shard)
            self.summary.done += len(shard.keys)
        for key, reason in result.failed:
            self.fail(key, reason)

    # -- running ------------------------------------------------------------------------------
    def run_jobs(self, executor: Executor, process: Callable[[Any], Item], jobs: Sequence[Job], *,
                 desc: str, unit: str = "img") -> StageSummary:
        """Run ``process`` over the jobs not yet complete on ``executor``, recording every outcome.

        Local executors return each item to this process, which writes the shards; distributed
        ones get chunks of about a shard's size whose tasks write their own shards.
        """
        todo = self.todo(jobs)
        if not todo:
            return self.summary
        if not executor.distributed:
            for outcome in executor.map(process, todo, desc=desc, unit=unit):
                self.record(outcome.item.key, outcome.result, outcome.error)
            return self.summary
        self.writer.flush()
        size = max(1, min(self.shard_size, math.ceil(len(todo) / (2 * max(1, executor.workers)))))
        token = uuid.uuid4().hex[:8]
        tasks = [ChunkTask(process, tuple(todo[i:i + size]), str(self.output.resolve()),
                           f"part-{token}-t{i // size:05d}.h5", self.kind, self.writer.epoch,
                           None if self.sources is None else self.sources.subset(j.key for j in todo[i:i + size]))
                 for i in range(0, len(todo), size)]
        for outcome in executor.map(run_chunk, tasks, desc=desc, unit=unit, weight=len):
            if outcome.ok:
                self.record_chunk(outcome.result)
            else:  # the whole task failed (its worker kept dying, the store is gone...)
                for job in outcome.item.jobs:
                    self.fail(job.key, outcome.error)
        return self.summary


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """A stage as the pipeline sees it.

    sources : where its input comes from: ``"input"`` (the pipeline's input) or upstream stage names.
    output : its folder under the pipeline's output.
    input_paths : config keys holding paths, resolved against the pipeline file's folder.
    optional : runs only when the pipeline file has its section.
    help : its command's one-line summary.
    arguments : its command's positional arguments, one per source (default: the source names).
    executor : its run spreads items over an executor (its command has --executor/--workers/--scheduler).
    """

    name: str
    config: type[StageConfig]
    run: Callable[..., StageSummary | list[StageSummary]]
    sources: tuple[str, ...] = ("input",)
    output: str = ""
    input_paths: tuple[str, ...] = ()
    optional: bool = False
    help: str = ""
    arguments: tuple[str, ...] = ()
    executor: bool = True


# Pipeline order. Adding a stage: its module with STAGE = Stage(...), and one line here (its command is
# generated from its config).
STAGE_MODULES: tuple[str, ...] = (
    "segsort_unsup.contours.stage",
    "segsort_unsup.ucm.stage",
    "segsort_unsup.train.features",
    "segsort_unsup.train.stage",
    "segsort_unsup.embed.stage",
    "segsort_unsup.transfer.stage",
    "segsort_unsup.discover.clusters",
    "segsort_unsup.evaluate.semantic_stage",
    "segsort_unsup.discover.stage",
    "segsort_unsup.evaluate.stage",
)


def registry() -> list[Stage]:
    """Every stage, in pipeline order (imports the stage modules)."""
    return [importlib.import_module(module).STAGE for module in STAGE_MODULES]


def run_stage(stage: Stage, config: StageConfig, inputs: Any, output: str | os.PathLike, *,
              executor: Executor | None = None, overwrite: bool | str = False) -> list[StageSummary]:
    """Call a stage's ``run`` with a default in-process executor; always a list of summaries. The
    process's torch threads are as before afterwards, whatever the stage set them to."""
    with kept_torch_threads():
        result = stage.run(config, inputs, output, executor=executor or InProcess(), overwrite=overwrite)
    return list(result) if isinstance(result, (list, tuple)) else [result]
