"""Budgets: `3.0bits`, `3.25bpw`, `1.2GB` / `800MB` / `123456B`.

- bits: nominal code bits per planned weight, weighted by element count (GPTQ/EvoPress papers).
- bpw:  stored bits per planned weight, scales/zeros/masks included (llama.cpp convention).
- bytes: total stored bytes of the planned weights (units outside the plan are not counted).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from planner.errors import BadBudget


class Metric(str, enum.Enum):
    BITS = "bits"
    BPW = "bpw"
    BYTES = "bytes"


_UNITS = {"bits": (Metric.BITS, 1.0), "bpw": (Metric.BPW, 1.0), "b": (Metric.BYTES, 1.0),
          "kb": (Metric.BYTES, 1e3), "mb": (Metric.BYTES, 1e6), "gb": (Metric.BYTES, 1e9),
          "kib": (Metric.BYTES, 2**10), "mib": (Metric.BYTES, 2**20), "gib": (Metric.BYTES, 2**30)}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]+)\s*$")


@dataclass(frozen=True)
class Budget:
    value: float
    metric: Metric

    def __str__(self) -> str:
        if self.metric is Metric.BYTES:
            return f"{self.value / 1e6:.3f}MB"
        return f"{self.value:g}{self.metric.value}"


def parse_budget(text: str) -> Budget:
    """Parse a budget string; raise BadBudget with a fix-it hint on anything else."""
    m = _PATTERN.match(text or "")
    hint = "use e.g. 3.0bits, 3.25bpw, 1.2GB or 800MB"
    if not m:
        raise BadBudget(f"malformed budget {text!r}: {hint}")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise BadBudget(f"unknown budget unit {m.group(2)!r} in {text!r}: {hint}")
    metric, scale = _UNITS[unit]
    if number <= 0:
        raise BadBudget(f"budget must be positive, got {text!r}: {hint}")
    return Budget(number * scale, metric)
