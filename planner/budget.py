"""Budgets: `3.0bits`, `3.25bpw`, `1.2GB` / `800MB` / `123456B`, `50%sparsity`, and several
limits at once, comma-separated: `4.0bits,50%sparsity` (every limit must hold).

- bits: nominal code bits per planned weight, weighted by element count (GPTQ/EvoPress papers).
- bpw:  stored bits per planned weight, scales/zeros/masks included (llama.cpp convention).
- bytes: total stored bytes of the planned weights (units outside the plan are not counted).
- density: the kept (not pruned) fraction of the planned weights, at most this. Written as
  `60%sparsity` (= `40%density`, also `0.6sparsity` / `0.4density`): a cost, like the others,
  so lower is cheaper; a budget is always an upper limit on a cost.
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
    DENSITY = "density"


_UNITS = {"bits": (Metric.BITS, 1.0), "bpw": (Metric.BPW, 1.0), "b": (Metric.BYTES, 1.0),
          "kb": (Metric.BYTES, 1e3), "mb": (Metric.BYTES, 1e6), "gb": (Metric.BYTES, 1e9),
          "kib": (Metric.BYTES, 2**10), "mib": (Metric.BYTES, 2**20), "gib": (Metric.BYTES, 2**30),
          "density": (Metric.DENSITY, 1.0), "sparsity": (Metric.DENSITY, 1.0)}
_COMPLEMENT = {"sparsity"}    # given as the pruned fraction: the density limit is 1 - it
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*([a-zA-Z]+)\s*$")


@dataclass(frozen=True)
class Budget:
    value: float
    metric: Metric
    also: tuple[Budget, ...] = ()    # further limits that must hold too (`4.0bits,50%sparsity`)

    def __str__(self) -> str:
        extra = "".join(f",{b}" for b in self.also)
        if self.metric is Metric.BYTES:
            return f"{self.value / 1e6:.3f}MB{extra}"
        if self.metric is Metric.DENSITY:
            return f"{round((1 - self.value) * 100, 10):g}%sparsity{extra}"
        return f"{self.value:g}{self.metric.value}{extra}"

    @property
    def limits(self) -> tuple[Budget, ...]:
        """Every limit, this one first, each without `also`."""
        return (Budget(self.value, self.metric), *self.also)


def parse_budget(text: str) -> Budget:
    """Parse a budget string; raise BadBudget with a fix-it hint on anything else."""
    parts = (text or "").split(",")
    if len(parts) > 1:
        limits = [parse_budget(p) for p in parts]
        metrics = [b.metric for b in limits]
        if len(set(metrics)) < len(metrics):
            raise BadBudget(f"budget {text!r} limits one metric twice: give each of bits, bpw, size, sparsity/density once")
        return Budget(limits[0].value, limits[0].metric, tuple(limits[1:]))
    m = _PATTERN.match(text or "")
    hint = "use e.g. 3.0bits, 3.25bpw, 1.2GB, 800MB, 50%sparsity or 4.0bits,50%sparsity"
    if not m:
        raise BadBudget(f"malformed budget {text!r}: {hint}")
    number, percent, unit = float(m.group(1)), m.group(2), m.group(3).lower()
    if unit not in _UNITS:
        raise BadBudget(f"unknown budget unit {m.group(3)!r} in {text!r}: {hint}")
    metric, scale = _UNITS[unit]
    if percent and metric is not Metric.DENSITY:
        raise BadBudget(f"'%' only goes with sparsity or density (50%sparsity), got {text!r}: {hint}")
    if number <= 0:
        raise BadBudget(f"budget must be positive, got {text!r}: {hint}")
    if metric is Metric.DENSITY:
        fraction = number / 100 if percent else number
        density = 1 - fraction if unit in _COMPLEMENT else fraction
        if not 0 < density <= 1:
            raise BadBudget(f"a sparsity must be below 100% and a density at most 100%, got {text!r}: {hint}")
        return Budget(density, metric)
    return Budget(number * scale, metric)
