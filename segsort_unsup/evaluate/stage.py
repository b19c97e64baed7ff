"""The ``evaluate`` stage of a pipeline: BSDS boundary and region benchmarks of its stores.

``run`` benchmarks the contours store's boundaries and the segments store's regions against
BSDS ground truth, writing ``<output>/<store>/`` (BSR's files, ``pr_curve.png``, ``summary.json``).
A result whose identity (settings + the evaluated store's identity and items) is unchanged is
not recomputed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import StageConfig, config_hash
from ..errors import InputError, SegsortError
from ..io.sources import store_content
from ..io.store import StoreReader
from ..log import get_logger
from ..parallel import Executor
from ..stages import Stage, StageSummary

log = get_logger("evaluate")


@dataclass(frozen=True)
class EvaluateConfig(StageConfig):
    """Settings of the pipeline's evaluation.

    ground_truth : folder of BSDS groundTruth ``.mat`` files.
    boundaries : benchmark the contours store's boundaries (ODS/OIS/AP).
    regions : benchmark the segments store's regions (Covering/PRI/VI).
    thresholds : number of thresholds (BSR: 99).
    """

    stage = "evaluate"

    ground_truth: str = ""
    boundaries: bool = True
    regions: bool = True
    thresholds: int = 99

    def validate(self) -> None:
        if not self.ground_truth:
            raise self.bad_value("ground_truth", 'needs a folder of BSDS groundTruth .mat files, e.g. '
                                 'ground_truth = "BSDS500/groundTruth/test"')
        if self.thresholds < 1:
            raise self.bad_value("thresholds", "must be >= 1")


def _identity(config: EvaluateConfig, store: Path, what: str) -> str:
    with StoreReader(store) as reader:
        return config_hash({**config.identity(), "what": what, "store": reader.config_hash,
                            "content": store_content(reader)})


def run(config: EvaluateConfig, inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> list[StageSummary]:
    """Benchmark ``inputs`` = (contours store, segments store) into ``output``/contours and ``output``/segments."""
    from .bsds import BenchOptions, run_benchmark

    contours, segments = (Path(p) for p in inputs)
    runs = []
    if config.boundaries:
        runs.append((contours, "boundaries", BenchOptions(n_thresholds=config.thresholds)))
    if config.regions:
        runs.append((segments, "regions", BenchOptions(regions=True, n_thresholds=config.thresholds)))
    summaries = []
    for store, what, options in runs:
        target = Path(output) / store.name
        identity = _identity(config, store, what)
        done = target / "summary.json"
        previous = previous_result(done) if overwrite is not True else {}
        if previous.get("identity") == identity:
            n = int(previous.get("images", 0))
            summaries.append(StageSummary(f"evaluate {store.name}", total=n, skipped=n, output=str(target),
                                          identity_hash=identity, note=_note(previous)))
            continue
        try:
            report = run_benchmark(store, config.ground_truth, target, options=options, executor=executor,
                                   overwrite=True)
        except SegsortError as exc:
            raise InputError(f"[evaluate] {store.name}: {exc}") from None
        data = stamp_identity(done, identity)
        report.stage.stage = f"evaluate {store.name}"
        report.stage.identity_hash = identity
        report.stage.note = _note(data)
        summaries.append(report.stage)
    return summaries


def previous_result(done: Path) -> dict:
    """An evaluation's result file (``{}`` when missing or unreadable: it is then redone)."""
    try:
        data = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stamp_identity(done: Path, identity: str) -> dict:
    """Record the identity in a result file just written; last, so a result without it is redone."""
    from ..io.atomic import atomic_write_text

    data = json.loads(done.read_text(encoding="utf-8"))
    data["identity"] = identity
    atomic_write_text(done, json.dumps(data, indent=2))
    return data


def _note(data: dict) -> str:
    parts = []
    b = data.get("boundaries")
    if b:
        parts.append(f"boundaries ODS {b['ods']:.3f} OIS {b['ois']:.3f} AP {b['ap']:.3f}")
    r = data.get("regions")
    if r:
        parts.append(f"covering {r['covering_ods']:.3f}/{r['covering_ois']:.3f} PRI {r['pri_ods']:.3f}/"
                     f"{r['pri_ois']:.3f} VI {r['vi_ods']:.3f}/{r['vi_ois']:.3f}")
    return "; ".join(parts)


STAGE = Stage("evaluate", EvaluateConfig, run, sources=("contours", "ucm"), output="eval",
              input_paths=("ground_truth",), optional=True, help="BSDS500 boundary and region benchmarks")
