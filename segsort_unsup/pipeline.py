"""Staged pipelines from TOML: ``segsort-unsup run pipelines/<name>.toml``.

A pipeline file names its inputs and an output folder, how to execute per-image work, and one
section per stage of the registry (:func:`segsort_unsup.stages.registry`), whose keys are that
stage's config fields. Stages run in registry order into ``output/<stage folder>``; optional
stages (train, embed, transfer, semantic, discover, evaluate) run only when their section is
present. Every stage resumes its store; a stage whose settings (or whose input) changed is
recomputed, and so is everything downstream of it, while unchanged upstream stages are kept.
Paths of inputs (weights, ground truth) are relative to the TOML file's folder;
``png_dir``/``mat_dir`` are relative to the output folder. Unknown sections or keys, wrong types
and missing paths are errors naming file, section and key::

    [pipeline]
    input = "photos"            # folder, glob or list file
    output = "runs/photos"      # contours/, segments/, eval/ go here
    executor = "local"          # local | dask | dask-local
    workers = 2                 # processes (local) or Dask workers (dask-local); default: one per core
    # scheduler = "tcp://host:8786"   # with executor = "dask"

    [contours]
    model = "pidinet"
    png_dir = "png/contours"

    [ucm]
    threshold = 0.5

    [evaluate]                  # optional: BSDS ground truth -> boundary and region benchmarks
    ground_truth = "BSDS500/groundTruth/test"

A stage may run several times with other settings: sub-sections ``[train.unsup]``,
``[train.sup]`` are instances of ``train`` (the keys of ``[train]`` itself are their shared
defaults), each writing ``output/<stage folder>/<instance>``. A section takes its inputs from
the stages before it as the registry says (``embed`` reads ``train`` and the input); ``from =
[...]`` names them instead: earlier sections (``"train.sup"``) or named inputs. Named inputs are
declared in ``[pipeline.inputs]`` (``input`` is the default one), can be given as ``"@name"`` to
path keys (``labels = "@labelled_annotations"``), and are replaced on the command line with
``run --input name=PATH``. A path key may also name an earlier section, ``"@ucm.scored"``: that
section's output folder (``segments = "@ucm.scored"`` for embed's ``units = "ucm:T"``), and keys
that take several paths take a list (``labels = ["@train_labels", "@extra_labels"]``)::

    [pipeline.inputs]
    scored = "camvid/val"
    scored_labels = "camvid/valannot"

    [embed.unsup-scored]
    from = ["train.unsup", "scored"]

    [semantic.unsup]
    from = ["transfer.unsup"]
    ground_truth = "@scored_labels"
"""

from __future__ import annotations

import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SEED_MAX, StageConfig, did_you_mean
from .errors import InputError
from .io.images import excluding_outputs
from .io.outdir import UnsafeNameError, safe_relative_name
from .log import get_logger
from .parallel import EXECUTORS, available_cores, make_executor
from .stages import Stage, StageSummary, registry, run_stage

log = get_logger("pipeline")

_HEAD_KEYS = {"input": str, "output": str, "name": str, "description": str, "executor": str, "workers": int,
              "scheduler": str, "seed": int, "inputs": dict}
_OUTPUT_PATHS = ("png_dir", "mat_dir", "features_dir")  # relative to the output folder
_SECTION_KEYS = ("from",)  # per-section keys of the pipeline, not of the stage's config


@dataclass
class Section:
    """One stage run of a pipeline: ``train`` or an instance such as ``train.sup``."""

    name: str
    stage: Stage
    config: StageConfig
    sources: tuple[str, ...]  # section names or input names
    output: Path


@dataclass
class Pipeline:
    """A parsed pipeline file: where from, where to, how to execute, and each section's config."""

    path: Path
    output: Path
    sections: list[Section] = field(default_factory=list)
    executor: str = "local"
    workers: int = 1
    scheduler: str = ""
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def input(self) -> str:
        """The default input (``[pipeline] input``), or "" when only named inputs are declared."""
        return self.inputs.get("input", "")

    def source_paths(self, section: Section) -> str | list[str]:
        """The paths a section reads: named inputs, or the folders of earlier sections."""
        outputs = {s.name: str(s.output) for s in self.sections}
        paths = [self.inputs[n] if n in self.inputs else outputs[n] for n in section.sources]
        return paths[0] if len(paths) == 1 else paths


def _resolve(base: Path, value: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(base / os.path.expanduser(value))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such pipeline file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; give a pipeline .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None


def _check_tables(path: Path, data: dict[str, Any], stages: dict[str, Stage]) -> None:
    """Every top-level name must be a section (``train = 5`` is not), every sub-section a table."""
    for name, value in data.items():
        if not isinstance(value, dict):
            hint = f"write [{name}] with its keys below it" if name in stages or name == "pipeline" else \
                "keys belong inside a section such as [pipeline]"
            raise InputError(f"{path}: {name} = {value!r} is not a section; {hint}")


def _instances(stage: Stage, raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(section name, keys)]`` of a stage's section: itself, or its sub-sections over its own keys."""
    subs = {k: v for k, v in raw.items() if isinstance(v, dict)}
    if not subs:
        return [(stage.name, dict(raw))]
    shared = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    return [(f"{stage.name}.{name}", {**shared, **keys}) for name, keys in subs.items()]


def load_pipeline(path: str | os.PathLike, *, input: str | None = None,  # noqa: A002
                  output: str | os.PathLike | None = None, sections: dict[str, dict[str, Any]] | None = None,
                  inputs: dict[str, str] | None = None) -> Pipeline:
    """Parse and validate a pipeline TOML file (a clear error names the file, section and key).

    ``input``/``output`` replace the file's (the demo points its packaged pipeline at a folder of
    its own); ``inputs`` replace named inputs (``run --input name=PATH``); ``sections`` update
    stage sections key by key (e.g. the contour model the demo found).
    """
    path = Path(path)
    data = _read_toml(path)
    stages = {stage.name: stage for stage in registry()}
    _check_tables(path, data, stages)
    head = data.setdefault("pipeline", {})
    _check_head_types(path, head)
    named = _apply_overrides(path, data, head, input=input, output=output, inputs=inputs, sections=sections)
    _check_head(path, data, head, named, stages)
    base = path.absolute().parent  # a linked pipeline file's paths are relative to the link
    out = Path(_resolve(base, head["output"]))
    if out.exists() and not out.is_dir():
        raise InputError(f"{path}: [pipeline] output {out} is a file, not a folder")
    all_inputs = _resolve_inputs(path, data, head, named, base)
    pipeline = Pipeline(path, out, executor=head.get("executor", "local"),
                        workers=int(head.get("workers") or available_cores()), scheduler=head.get("scheduler", ""),
                        inputs=all_inputs)
    for stage in stages.values():
        raw = data.get(stage.name)
        if raw is None:
            if stage.optional:
                continue
            raw = {}
        instances = _instances(stage, raw)
        for name, section in instances:
            pipeline.sections.append(_section(pipeline, stage, name, section, head, base, single=len(instances) == 1))
    return pipeline


def _check_head_types(path: Path, head: dict[str, Any]) -> None:
    """Each ``[pipeline]`` key has its type (a bool is no int)."""
    for key, tp in _HEAD_KEYS.items():
        if key in head and not isinstance(head[key], tp) or (tp is int and isinstance(head.get(key), bool)):
            raise InputError(f"{path}: [pipeline] key {key!r} expects {'table' if tp is dict else tp.__name__}, "
                             f"got {head[key]!r}")


def _apply_overrides(path: Path, data: dict[str, Any], head: dict[str, Any], *, input: str | None,  # noqa: A002
                     output: str | os.PathLike | None, inputs: dict[str, str] | None,
                     sections: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """Put the caller's input, output, named inputs and section keys over the file's; return the
    named inputs (``[pipeline.inputs]``) as replaced."""
    named = dict(head.get("inputs", {}))
    if input is not None:
        head["input"] = os.path.abspath(input)
    if output is not None:
        head["output"] = os.path.abspath(output)
    for name, value in (inputs or {}).items():
        if name == "input":
            head["input"] = os.path.abspath(value)
        elif name not in named:
            raise InputError(f"{path}: no input named {name!r} to replace; its inputs: "
                             f"{', '.join(['input', *named]) if 'input' in head else ', '.join(named) or 'none'}")
        else:
            named[name] = os.path.abspath(value)
    for name, values in (sections or {}).items():
        data.setdefault(name, {}).update(values)
    return named


def _check_head(path: Path, data: dict[str, Any], head: dict[str, Any], named: dict[str, Any],
                stages: dict[str, Stage]) -> None:
    """Known sections, the ``[pipeline]`` keys that must be there, and their values in range."""
    unknown = sorted(set(data) - {"pipeline", *stages})
    if unknown:
        raise InputError(f"{path}: unknown section(s) {unknown}{did_you_mean(unknown, ['pipeline', *stages])}; "
                         f"known: pipeline, {', '.join(stages)}")
    if not isinstance(head.get("output"), str):
        raise InputError(f"{path}: [pipeline] needs output = \"...\" (a path)")
    if not isinstance(head.get("input"), str) and not named:
        raise InputError(f"{path}: [pipeline] needs input = \"...\" (a path)")
    extra = sorted(set(head) - set(_HEAD_KEYS))
    if extra:
        raise InputError(f"{path}: unknown key(s) in [pipeline]: {extra}{did_you_mean(extra, _HEAD_KEYS)}; "
                         f"known: {', '.join(sorted(_HEAD_KEYS))}")
    if head.get("workers", 1) < 1:
        raise InputError(f"{path}: [pipeline] workers = {head['workers']}: give 1 or more (processes or Dask workers)")
    if not 0 <= head.get("seed", 0) <= SEED_MAX:
        raise InputError(f"{path}: [pipeline] seed = {head['seed']}: give a seed between 0 and {SEED_MAX}")
    executor = head.get("executor", "local")
    if executor not in EXECUTORS:
        raise InputError(f"{path}: [pipeline] executor {executor!r}: choose one of {', '.join(EXECUTORS)}")


def _resolve_inputs(path: Path, data: dict[str, Any], head: dict[str, Any], named: dict[str, Any],
                    base: Path) -> dict[str, str]:
    """The default and named inputs as paths, relative ones from the pipeline file's folder."""
    all_inputs: dict[str, str] = {}
    if isinstance(head.get("input"), str):
        all_inputs["input"] = _resolve(base, head["input"])
    for name, value in named.items():
        if not isinstance(value, str):
            raise InputError(f"{path}: [pipeline.inputs] {name!r} expects a path string, got {value!r}")
        all_inputs[name] = _resolve(base, value)
    clash = sorted(set(all_inputs) & {n for n in data if n != "pipeline"})
    if clash:
        raise InputError(f"{path}: input name(s) {clash} are also stage names; rename the input(s)")
    return all_inputs


def _section(pipeline: Pipeline, stage: Stage, name: str, keys: dict[str, Any], head: dict[str, Any],
             base: Path, *, single: bool) -> Section:
    """One section of ``stage`` (``single``: the stage runs once, into its own folder): its sources,
    its paths resolved, the pipeline's seed as its default, its config checked."""
    path, output = pipeline.path, pipeline.output
    where = f"{path} [{name}]"
    if name != stage.name:  # the instance name becomes a folder under the output
        try:
            safe_relative_name(name.split(".", 1)[1], what="section name", subfolders=False)
        except UnsafeNameError as exc:
            raise InputError(f"{path}: {exc}") from None
    sources = _section_sources(stage, keys.pop("from", None), pipeline, where)
    for key in stage.input_paths:
        value, what = keys.get(key), f"{where}: key {key!r}"
        if isinstance(value, str):
            keys[key] = _input_path(value, base, pipeline.inputs, pipeline, what)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            keys[key] = [_input_path(v, base, pipeline.inputs, pipeline, what) for v in value]
    for key in _OUTPUT_PATHS:
        if isinstance(keys.get(key), str):
            keys[key] = _resolve(output, keys[key])
    if "seed" in head and "seed" in stage.config.keys():
        keys.setdefault("seed", head["seed"])  # [pipeline] seed: every seeded stage's default
    config = stage.config.from_mapping(keys, where=where)
    folder = output / stage.output if single and name == stage.name else \
        output / stage.output / name.split(".", 1)[1]
    return Section(name, stage, config, sources, folder)


def _input_path(value: str, base: Path, inputs: dict[str, str], pipeline: Pipeline, where: str) -> str:
    """A path key's value: ``@input`` (a named input), ``@section`` (the output folder of an earlier
    section, written by this run) or a path relative to the pipeline file; inputs must exist."""
    if value.startswith("@"):
        name = value[1:]
        earlier = {s.name: s.output for s in pipeline.sections}
        if name in earlier:
            return str(earlier[name])
        if name not in inputs:
            raise InputError(f"{where}: no input named {name!r} (declare it in [pipeline.inputs]) nor a section "
                             f"before this one (known: {', '.join([*inputs, *earlier]) or 'none'})")
        path = inputs[name]
    else:
        path = _resolve(base, value)
    if not os.path.exists(path):
        raise InputError(f"{where}: {path} does not exist")
    return path


def _section_sources(stage: Stage, given: Any, pipeline: Pipeline, where: str) -> tuple[str, ...]:
    """A section's sources: ``from`` (checked) or the registry's, mapped to the sections before it."""
    earlier = {s.name for s in pipeline.sections}
    if given is not None:
        if isinstance(given, str):
            given = [given]
        if not isinstance(given, list) or not all(isinstance(g, str) for g in given):
            raise InputError(f"{where}: key 'from' expects a list of section or input names, got {given!r}")
        if len(given) != len(stage.sources):
            raise InputError(f"{where}: key 'from' needs {len(stage.sources)} name(s) ({', '.join(stage.sources)}), "
                             f"got {len(given)}")
        for name in given:
            if name not in earlier and name not in pipeline.inputs:
                raise InputError(f"{where}: key 'from': {name!r} is neither an input nor a section before this one "
                                 f"(known: {', '.join([*pipeline.inputs, *earlier]) or 'none'})")
        return tuple(given)
    sources = []
    for source in stage.sources:
        if source == "input":
            if "input" not in pipeline.inputs:
                raise InputError(f"{where}: reads the pipeline's input, but [pipeline] has no input; "
                                 "name one with from = [...]")
            sources.append("input")
            continue
        candidates = [s.name for s in pipeline.sections if s.stage.name == source]
        if len(candidates) > 1:
            raise InputError(f"{where}: reads '{source}', which runs {len(candidates)} times "
                             f"({', '.join(candidates)}); say which with from = [...]")
        if not candidates:
            raise InputError(f"{where}: reads '{source}', which this pipeline does not run; add a [{source}] "
                             "section, or name what to read with from = [...]")
        sources.append(candidates[0])
    return tuple(sources)


def _span(pipeline: Pipeline, from_stage: str | None, until_stage: str | None) -> list[Section]:
    sections = pipeline.sections
    names = [s.name for s in sections]

    def position(bound: str, last: bool) -> int:
        hits = [i for i, s in enumerate(sections) if bound in (s.name, s.stage.name)]
        if not hits:
            raise InputError(f"no stage {bound!r} in {pipeline.path}; its stages: {', '.join(names)}")
        return hits[-1] if last else hits[0]

    lo = position(from_stage, False) if from_stage else 0
    hi = position(until_stage, True) if until_stage else len(sections) - 1
    return sections[lo:hi + 1]


def written_folders(pipeline: Pipeline) -> list[Path]:
    """Every folder the pipeline writes: each section's output and its picture/feature folders.

    Input folders never yield images from them, so an input that holds the output folder (or is
    it: the stages write into sub-folders) is not re-read as new photos on the next run.
    """
    folders = []
    for section in pipeline.sections:
        folders.append(section.output)
        for key in _OUTPUT_PATHS:
            value = getattr(section.config, key, None)
            if value:
                folders.append(Path(value))
    return folders


def run_pipeline(pipeline: Pipeline, *, overwrite: bool = False, from_stage: str | None = None,
                 until_stage: str | None = None) -> list[StageSummary]:
    """Run the configured sections in order; each resumes its store, changed ones are recomputed.

    ``from_stage``/``until_stage`` (a stage or section name) limit the run to a span (upstream
    outputs must then exist). Stops at a stage that cannot go on (its error names it).
    """
    span = _span(pipeline, from_stage, until_stage)
    summaries: list[StageSummary] = []
    scheduler = pipeline.scheduler or None
    with excluding_outputs(*written_folders(pipeline)), \
            make_executor(pipeline.executor, workers=pipeline.workers, scheduler=scheduler) as executor:
        for section in span:
            started = time.perf_counter()
            if not section.stage.executor:
                executor.release_idle()
            try:
                results = run_stage(section.stage, section.config, pipeline.source_paths(section), section.output,
                                    executor=executor, overwrite=True if overwrite else "changed")
            except InputError as exc:
                raise InputError(f"{pipeline.path} [{section.name}]: {exc}") from None
            if section.name != section.stage.name:
                for summary in results:
                    summary.stage = summary.stage.replace(section.stage.name, section.name, 1)
            results[-1].seconds = time.perf_counter() - started
            summaries.extend(results)
    return summaries
