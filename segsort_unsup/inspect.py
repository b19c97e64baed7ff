"""What a store, run folder or model file holds: ``segsort-unsup inspect PATH``.

:func:`describe` returns plain data (JSON-able): kind, producer, identity/config, items complete
and failed (with reasons), datasets with shapes and dtypes, disk size, and for a run folder the
last metrics. :func:`format_description` turns it into lines for a terminal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import InputError


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _describe_store(root: Path) -> dict[str, Any]:
    from .errors import StoreError
    from .io.store import StoreReader

    with StoreReader(root) as reader:
        keys = reader.keys()
        datasets: dict[str, dict[str, Any]] = {}
        if keys:  # one item shows the layout
            try:
                for ds_name, (dtype, shape) in reader.layout(keys[0]).items():
                    datasets[ds_name] = {"dtype": dtype, "shape": list(shape), "example": keys[0]}
            except (StoreError, OSError) as exc:
                datasets["?"] = {"dtype": "unreadable", "shape": [], "example": f"{keys[0]} ({exc})"}
        failures = reader.failures()
        quarantine = root / "quarantine" / "reasons.tsv"
        return {
            "path": str(root),
            "type": "store",
            "kind": reader.kind,
            "producer": reader.manifest.get("producer", ""),
            "created": reader.manifest.get("created", ""),
            "format_version": reader.manifest.get("format_version"),
            "identity_hash": reader.config_hash,
            "config": reader.config,
            "meta": reader.meta,
            "items_complete": len(keys),
            "items_failed": {k: reason for k, (_, reason) in sorted(failures.items())},
            "damaged_shards": [f"{p}: {why}" for p, why in reader.damaged],
            "quarantined_shards": quarantine.read_text().splitlines() if quarantine.is_file() else [],
            "datasets": datasets,
            "disk_bytes": _disk_size(root),
        }


def _readable_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """Provenance with models of older versions made readable (``train_config`` was a JSON string)."""
    out = dict(provenance)
    if isinstance(out.get("train_config"), str):
        try:
            parsed = json.loads(out["train_config"])
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            out["train_config"] = parsed
    return out


def _provenance_lines(provenance: dict[str, Any], pad: str) -> list[str]:
    """``key = value`` lines; a table's keys on lines of their own below its name."""
    lines = []
    for key, value in sorted(provenance.items()):
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.extend(f"{pad}  {k} = {json.dumps(v, default=str)}" for k, v in sorted(value.items()))
        else:
            lines.append(f"{pad}{key} = {json.dumps(value, default=str)}")
    return lines


def _describe_model(path: Path) -> dict[str, Any]:
    from .embed.model import load_model
    from .io.atomic import sha256_file

    model, provenance = load_model(path)
    return {
        "path": str(path),
        "type": "model",
        "sha256": sha256_file(path),
        "model_config": model.model_config(),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "provenance": _readable_provenance(provenance),
        "disk_bytes": path.stat().st_size,
    }


def _describe_run(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"path": str(root), "type": "run folder", "disk_bytes": _disk_size(root)}
    config = root / "config.toml"
    if config.is_file():
        import tomllib

        try:
            out["config"] = tomllib.loads(config.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            out["config_error"] = str(exc)
    metrics = root / "metrics.jsonl"
    if metrics.is_file():
        last = None
        lines = 0
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                last = json.loads(line)
                lines += 1
            except ValueError:
                continue
        out["metrics_lines"] = lines
        out["last_metrics"] = last
    checkpoints = sorted(p.name for p in root.glob("checkpoints/*.pt")) or sorted(p.name for p in root.glob("*.ckpt"))
    out["checkpoints"] = checkpoints
    if (root / "model.pt").is_file():
        out["model"] = _describe_model(root / "model.pt")
    stores = sorted(p.name for p in root.iterdir() if (p / "store.json").is_file())
    if stores:
        out["stores"] = {name: _describe_store(root / name) for name in stores}
    return out


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a store folder, a run folder (config.toml / metrics.jsonl / model.pt) or a model file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return _describe_model(path)
        raise InputError(f"{path}: not a store folder, run folder or model file (.pt)")
    if not path.is_dir():
        raise InputError(f"{path}: neither a file nor a folder (a device or a pipe); give a store folder, "
                         "run folder or model file (.pt)")
    if (path / "store.json").is_file():
        return _describe_store(path)
    if any((path / name).exists() for name in ("config.toml", "metrics.jsonl", "model.pt")) or any(
            (p / "store.json").is_file() for p in path.iterdir() if p.is_dir()):
        return _describe_run(path)
    raise InputError(f"{path}: holds no segsort-unsup store, run or model (no store.json, config.toml or model.pt)")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def format_description(info: dict[str, Any], indent: str = "") -> list[str]:
    """Readable lines for :func:`describe`'s result."""
    lines = [f"{indent}{info['path']}: {info['type']}" + (f" ({info['kind']})" if "kind" in info else "")]
    pad = indent + "  "
    if info["type"] == "store":
        lines.append(f"{pad}producer: {info['producer']} (format {info['format_version']}), created {info['created']}")
        lines.append(f"{pad}identity: {info['identity_hash']}")
        for key, value in sorted(info["config"].items()):
            lines.append(f"{pad}  {key} = {json.dumps(value)}")
        lines.append(f"{pad}items: {info['items_complete']} complete, {len(info['items_failed'])} failed")
        for key, reason in list(info["items_failed"].items())[:10]:
            lines.append(f"{pad}  failed {key}: {reason}")
        for text in info["damaged_shards"] + info["quarantined_shards"]:
            lines.append(f"{pad}  damaged: {text}")
        for name, ds in info["datasets"].items():
            lines.append(f"{pad}dataset {name}: {ds['dtype']} {tuple(ds['shape'])} (e.g. {ds['example']})")
    elif info["type"] == "model":
        lines.append(f"{pad}sha256: {info['sha256']}")
        lines.append(f"{pad}model: {json.dumps(info['model_config'])}, {info['parameters']:,} parameters")
        lines.extend(_provenance_lines(info["provenance"], pad + "  "))
    else:
        if "last_metrics" in info:
            lines.append(f"{pad}metrics: {info['metrics_lines']} lines, last: {json.dumps(info['last_metrics'])}")
        if info.get("checkpoints"):
            lines.append(f"{pad}checkpoints: {', '.join(info['checkpoints'])}")
        if "model" in info:
            lines.extend(format_description(info["model"], pad))
        for store in info.get("stores", {}).values():
            lines.extend(format_description(store, pad))
    lines.append(f"{pad}disk: {_size(info['disk_bytes'])}")
    return lines
