"""A pipeline's local worker processes side by side: started afresh for every stage, or shared.

    python benchmarks/pipeline_workers.py [--labelled 3] [--scored 2] [--steps 4] [--work DIR]

Runs ``pipelines/camvid.toml`` (all its 35 sections, two local workers) twice from nothing on the
same few CamVid frames at half size: once with a process pool started for each stage and shut down
after it (every stage's workers import torch and their stage's modules again), and once with the
pipeline's one pool, whose workers serve every stage (the default). The table gives the seconds of
each stage with work and of the whole run, and checks that both runs score the same. The CPU is
printed in the header.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segsort_unsup.parallel import ProcessPool  # noqa: E402
from segsort_unsup.sysinfo import cpu_model  # noqa: E402


class PoolPerStage(ProcessPool):
    """The behaviour before shared workers: a fresh pool for every map, shut down after it."""

    def map(self, *args, **kwargs):
        try:
            yield from super().map(*args, **kwargs)
        finally:
            self.close()


def _frames(camvid: Path, work: Path, labelled: int, scored: int) -> dict[str, Path]:
    from PIL import Image

    # the labels in two folders, as camvid.toml's train + extra
    sets = {"tr": ("train", 0, labelled), "tra": ("trainannot", 0, labelled - 1),
            "tra2": ("trainannot", labelled - 1, labelled), "va": ("val", 0, scored), "vaa": ("valannot", 0, scored)}
    for name, (split, first, end) in sets.items():
        (work / name).mkdir(parents=True, exist_ok=True)
        for f in sorted((camvid / split).glob("*.png"))[first:end]:
            if not (work / name / f.name).exists():
                image = Image.open(f)
                nearest = Image.Resampling.NEAREST if split.endswith("annot") else Image.Resampling.BILINEAR
                image.resize((image.width // 2, image.height // 2), nearest).save(work / name / f.name)
    return {"input": work / "tr", "labelled": work / "tr", "train_labels": work / "tra", "extra_labels": work / "tra2",
            "scored": work / "va", "scored_labels": work / "vaa", "class_names": camvid / "classes.txt"}


def _run(output: Path, inputs: dict[str, Path], sections: dict, executor_class) -> tuple[float, dict[str, float]]:
    import segsort_unsup.pipeline as pipeline_module
    from segsort_unsup.parallel import make_executor

    def executor(name="local", *, workers=1, scheduler=None):
        return executor_class(workers) if name == "local" and workers > 1 else make_executor(
            name, workers=workers, scheduler=scheduler)

    shutil.rmtree(output, ignore_errors=True)
    pipe = pipeline_module.load_pipeline(REPO / "pipelines" / "camvid.toml", output=output, sections=sections,
                                         inputs={k: str(v) for k, v in inputs.items()})
    original, pipeline_module.make_executor = pipeline_module.make_executor, executor
    try:
        started = time.perf_counter()
        summaries = pipeline_module.run_pipeline(pipe)
        total = time.perf_counter() - started
    finally:
        pipeline_module.make_executor = original
    return total, {s.stage: s.seconds for s in summaries if s.seconds is not None and s.done}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=int, default=3)
    parser.add_argument("--scored", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    shared = Path(os.environ.get("SEGSORT_SHARED", REPO.parent / "shared"))
    parser.add_argument("--shared", type=Path, default=shared)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench-pipeline-workers")
    args = parser.parse_args()

    from segsort_unsup.log import setup_logging

    setup_logging(-1)
    inputs = _frames(args.shared / "data" / "camvid", args.work, args.labelled, args.scored)
    weights = args.shared / "weights"
    sections = {"contours": {"model": "pidinet-tiny", "weights": str(weights / "pidinet" / "table5_pidinet-tiny.pth")},
                "train": {"steps": args.steps, "batch_size": 2, "feature_scales": [1.0],
                          "backbone_weights": str(weights / "hed-bsds500" / "hed_bsds500.weights.h5")}}
    runs = {}
    for label, executor_class in (("a pool per stage", PoolPerStage), ("shared workers", ProcessPool)):
        runs[label] = _run(args.work / label.replace(" ", "-"), inputs, sections, executor_class)
    scores = [{f.parent.name: json.loads(f.read_text())["miou"]
               for f in sorted((args.work / label.replace(" ", "-") / "semantic").glob("*/semantic.json"))}
              for label in runs]

    print(f"# camvid.toml on {args.labelled} labelled + {args.scored} scored CamVid frames (half size), "
          f"{args.steps} steps, 2 local workers; CPU: {cpu_model()}")
    (before, stages_before), (after, stages_after) = runs.values()
    print("| stage | a pool per stage (s) | shared workers (s) | ratio |")
    print("|---|---|---|---|")
    for stage in stages_before:
        a, b = stages_before[stage], stages_after.get(stage, float("nan"))
        print(f"| {stage} | {a:.1f} | {b:.1f} | {a / b:.1f}× |")
    print(f"| **whole run** | **{before:.1f}** | **{after:.1f}** | **{before / after:.2f}×** |")
    print(f"same mIoU in all {len(scores[0])} semantic rows: {scores[0] == scores[1]}")


if __name__ == "__main__":
    main()
