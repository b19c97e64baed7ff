"""What every stage reports when it finishes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageSummary:
    """Counts of one stage run: items done now, skipped (already complete), failed (with reasons)."""

    stage: str
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        """One line for the terminal."""
        text = f"{self.stage}: {self.done} done, {self.skipped} already complete, {len(self.failed)} failed of {self.total}"
        if self.output:
            text += f" -> {self.output}"
        return text
