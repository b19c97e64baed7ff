"""What the CPU is, from /proc/cpuinfo (benchmarks print it; precision choices read its flags)."""

from __future__ import annotations

import platform


def _cpuinfo_value(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (e.g. "AMD EPYC"), or what the platform module knows."""
    return _cpuinfo_value("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    return frozenset((_cpuinfo_value("flags") or "").split())
