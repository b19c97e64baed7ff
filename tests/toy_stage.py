"""A toy stage for the registry test: one module with its config, ``run`` and ``STAGE`` (nothing else)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from segsort_unsup.config import StageConfig, run_only, setting
from segsort_unsup.io.images import list_images, read_image
from segsort_unsup.io.store import Item
from segsort_unsup.stages import Stage, StageRun


@dataclass(frozen=True)
class ToyConfig(StageConfig):
    stage = "toy"
    factor: float = setting(2.0, help="multiply each photo's mean brightness by this")
    channels: tuple[int, ...] = setting((0, 1, 2), help="colour channels averaged")
    shard_size: int = run_only(8, help="items per shard")

    def validate(self) -> None:
        if self.factor <= 0:
            raise self.bad_value("factor", "must be > 0")


@dataclass(frozen=True)
class _Job:
    key: str
    path: str
    config: ToyConfig


def process(job: _Job) -> Item:
    rgb = read_image(job.path)
    value = job.config.factor * rgb[..., list(job.config.channels)].mean()
    return Item(job.key, {"mean": np.array([value], np.float32)}, {"source": job.path})


def run(config: ToyConfig, inputs, output, *, executor, overwrite=False):
    jobs = [_Job(ref.key, os.path.abspath(ref.path), config) for ref in list_images(inputs)]
    with StageRun("toy", output, kind="toy", identity=config.identity(), overwrite=overwrite,
                  shard_size=config.shard_size) as stage_run:
        return stage_run.run_jobs(executor, process, jobs, desc="toy")


STAGE = Stage("toy", ToyConfig, run, sources=("input",), output="toy", optional=True,
              help="Mean brightness of every photo, times a factor.")
