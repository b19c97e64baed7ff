"""The ``semantic`` stage of a pipeline: mIoU and pixel accuracy of predicted label maps.

``run`` scores a folder of label PNGs (the ``transfer`` stage's output, or a segments store with
``hungarian``) against a folder of ground-truth label PNGs into ``output``: ``semantic.json``,
``per_class.txt``, ``confusion.csv``. A result whose identity (settings + the predictions' own
identity) is unchanged is not recomputed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import StageConfig, config_hash
from ..errors import InputError, SegsortError
from ..io.sources import store_content
from ..io.store import StoreReader, is_store
from ..parallel import Executor
from ..stages import Stage, StageSummary
from .stage import previous_result, stamp_identity

RESULT = "semantic.json"


@dataclass(frozen=True)
class SemanticConfig(StageConfig):
    """Settings of the semantic evaluation.

    ground_truth : folder of ground-truth label PNGs, matched to the predictions by image id.
    num_classes : classes scored (default: 1 + the largest ground-truth label other than the ignore label).
    ignore_label : ground-truth value left out (CamVid: 11 for void); None for none.
    hungarian : predictions are cluster ids, mapped to classes one-to-one first.
    class_names : text file, one name per line (``Sky`` or ``0 Sky``).
    """

    stage = "semantic"

    ground_truth: str = ""
    num_classes: int | None = None
    ignore_label: int | None = 255
    hungarian: bool = False
    class_names: str | None = None

    def validate(self) -> None:
        if not self.ground_truth:
            raise self.bad_value("ground_truth", 'needs a folder of label PNGs, e.g. ground_truth = "camvid/valannot"')
        if self.num_classes is not None and self.num_classes < 1:
            raise self.bad_value("num_classes", "must be >= 1")


def _folder_listing(path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*.png"))


def _inputs_identity(predictions: Path, ground_truth: Path) -> str:
    """What is scored: the predictions (transfer manifest or store identity, and their files) and the
    ground-truth files; a label PNG added, removed or rewritten on either side changes it."""
    made_by = None
    manifest = predictions / "transfer.json"
    if manifest.is_file():
        try:
            made_by = json.loads(manifest.read_text(encoding="utf-8")).get("identity")
        except ValueError:
            made_by = "unreadable"
    elif is_store(predictions):
        with StoreReader(predictions) as reader:
            made_by = {"store": reader.config_hash, "keys": reader.keys(), "content": store_content(reader)}
    return config_hash({"made_by": made_by, "files": _folder_listing(predictions),
                        "ground_truth": _folder_listing(ground_truth)})


def run(config: SemanticConfig, inputs: str | os.PathLike, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Score the predictions ``inputs`` against ``config.ground_truth`` into ``output``."""
    from .semantic import infer_num_classes, read_class_names, run_semantic

    predictions, out = Path(inputs), Path(output)
    if not predictions.is_dir():
        raise InputError(f"{predictions}: no predictions to score (run the transfer stage first)")
    identity = config_hash({**config.identity(), "inputs": _inputs_identity(predictions, Path(config.ground_truth))})
    done = out / RESULT
    previous = previous_result(done) if overwrite is not True else {}
    if previous.get("identity") == identity:
        n = int(previous.get("images", 0))
        return StageSummary("semantic", total=n, skipped=n, output=str(out), identity_hash=identity,
                            note=_note(previous))
    if overwrite is False and previous:
        raise InputError(f"{out} holds results of other predictions or settings; pass --overwrite to replace them")
    try:
        num_classes = config.num_classes or infer_num_classes(config.ground_truth, ignore_label=config.ignore_label)
        names = (read_class_names(config.class_names, num_classes, config.ignore_label)
                 if config.class_names else None)
        report = run_semantic(predictions, config.ground_truth, out, num_classes=num_classes,
                              ignore_label=config.ignore_label, hungarian=config.hungarian, class_names=names,
                              executor=executor, overwrite=True)
    except SegsortError as exc:
        raise InputError(f"[semantic] {exc}") from None
    data = stamp_identity(done, identity)
    report.stage.stage = "semantic"
    report.stage.identity_hash = identity
    report.stage.note = _note(data)
    return report.stage


def _note(data: dict) -> str:
    return f"mIoU {100 * data['miou']:.1f}, pixel accuracy {100 * data['pixel_accuracy']:.1f}"


STAGE = Stage("semantic", SemanticConfig, run, sources=("transfer",), output="semantic",
              input_paths=("ground_truth", "class_names"), optional=True,
              help="mIoU and pixel accuracy of predicted label maps against label PNGs")
