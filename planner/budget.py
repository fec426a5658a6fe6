"""Budgets: `3.0bits`, `3.25bpw`, `1.2GB` / `800MB` / `123456B`, `50%sparsity`, and several
limits at once, comma-separated: `4.0bits,50%sparsity` (every limit must hold).

- bits: nominal code bits per planned weight, weighted by element count (GPTQ/EvoPress papers).
- bpw:  stored bits per planned weight, scales/zeros/masks included (llama.cpp convention).
- bytes: total stored bytes of the planned weights (units outside the plan are not counted).
- density: the kept (not pruned) fraction of the planned weights, at most this. Written as
  `60%sparsity` (= `40%density`, also `0.6sparsity` / `0.4density`): a cost, like the others,
  so lower is cheaper; a budget is always an upper limit on a cost.
- latency: seconds of one decode step predicted from a latency table measured on the evaluating
  device (planner/runtime/latency.py). Written `5ms`, `800us`, `0.005s` (`--max-latency`).
- memory: bytes of the whole packed model, the parts outside the plan included (embeddings,
  norms, lm_head at 16 bits). Given by `--max-memory 60MB` (`45MB` in a budget means `bytes`).
Latency and memory are hardware limits: the problem needs their costs attached
(`Problem.with_hardware`), which the CLI does when the flags are given.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from planner.errors import BadBudget


class Metric(str, enum.Enum):
    BITS = "bits"
    BPW = "bpw"
    BYTES = "bytes"
    DENSITY = "density"
    LATENCY = "latency"       # seconds (a latency table's prediction)
    MEMORY = "memory"         # bytes of the whole model


HARDWARE = (Metric.LATENCY, Metric.MEMORY)    # costs the levels DB cannot give: attached to a Problem


_UNITS = {"bits": (Metric.BITS, 1.0), "bpw": (Metric.BPW, 1.0), "b": (Metric.BYTES, 1.0),
          "kb": (Metric.BYTES, 1e3), "mb": (Metric.BYTES, 1e6), "gb": (Metric.BYTES, 1e9),
          "kib": (Metric.BYTES, 2**10), "mib": (Metric.BYTES, 2**20), "gib": (Metric.BYTES, 2**30),
          "density": (Metric.DENSITY, 1.0), "sparsity": (Metric.DENSITY, 1.0),
          "s": (Metric.LATENCY, 1.0), "ms": (Metric.LATENCY, 1e-3), "us": (Metric.LATENCY, 1e-6)}
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
        if self.metric is Metric.LATENCY:
            return f"{round(self.value * 1e3, 9):g}ms{extra}"
        if self.metric is Metric.MEMORY:
            return f"{self.value / 1e6:.3f}MB-memory{extra}"
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
    hint = "use e.g. 3.0bits, 3.25bpw, 1.2GB, 800MB, 50%sparsity, 4.0bits,50%sparsity or 3.0bits,5ms (latency)"
    if not m:
        raise BadBudget(f"malformed budget {text!r}: {hint}")
    number, percent, unit = float(m.group(1)), m.group(2), m.group(3).lower()
    if unit not in _UNITS:
        raise BadBudget(f"unknown budget unit {m.group(3)!r} in {text!r}: {hint}")
    metric, scale = _UNITS[unit]
    if percent and metric is not Metric.DENSITY:
        raise BadBudget(f"'%' only goes with sparsity or density (50%sparsity), got {text!r}: {hint}")
    if number <= 0 or not math.isfinite(number):
        raise BadBudget(f"budget must be positive, got {text!r}: {hint}")
    if metric is Metric.DENSITY:
        fraction = number / 100 if percent else number
        density = 1 - fraction if unit in _COMPLEMENT else fraction
        if not 0 < density <= 1:
            raise BadBudget(f"a sparsity must be below 100% and a density at most 100%, got {text!r}: {hint}")
        return Budget(density, metric)
    return Budget(number * scale, metric)


@dataclass(frozen=True)
class HardwareSpec:
    """What a search asks of the hardware (planner/runtime/hardware.py attaches it to a Problem):
    limits (None: none) and which hardware costs its objectives need."""

    max_latency: float | None = None      # seconds of one decode step
    max_memory: float | None = None       # bytes of the whole packed model
    batch: int = 1                        # tokens per decode step the latency is predicted for
    objectives: tuple[str, ...] = ()      # "latency" / "memory" when a multi-objective search wants them
    reps: int = 10                        # timed calls per table row

    def metrics(self) -> tuple[Metric, ...]:
        """The hardware costs the problem needs."""
        want = {Metric.LATENCY: self.max_latency is not None or "latency" in self.objectives,
                Metric.MEMORY: self.max_memory is not None or "memory" in self.objectives}
        return tuple(m for m, w in want.items() if w)

    def limits(self) -> tuple[Budget, ...]:
        return tuple(Budget(v, m) for v, m in ((self.max_latency, Metric.LATENCY), (self.max_memory, Metric.MEMORY))
                     if v is not None)


def parse_latency(text: str) -> Budget:
    """`--max-latency`: `5ms`, `800us`, `0.005s`, or a bare number of milliseconds."""
    t = (text or "").strip()
    hint = "use e.g. 5ms, 800us or 0.005s (a bare number is milliseconds)"
    try:
        b = parse_budget(t + "ms" if _NUMBER.match(t) else t)
    except BadBudget:
        raise BadBudget(f"malformed --max-latency {text!r}: {hint}") from None
    if b.metric is not Metric.LATENCY or b.also:
        raise BadBudget(f"--max-latency {text!r} is not a time: {hint}")
    return b


def parse_memory(text: str) -> Budget:
    """`--max-memory`: a size (`60MB`, `1.2GB`, `500MiB`, `123456B`) of the whole packed model."""
    hint = "use a size such as 60MB, 1.2GB or 500MiB"
    try:
        b = parse_budget(text)
    except BadBudget:
        raise BadBudget(f"malformed --max-memory {text!r}: {hint}") from None
    if b.metric is not Metric.BYTES or b.also:
        raise BadBudget(f"--max-memory {text!r} is not a size: {hint}")
    return Budget(b.value, Metric.MEMORY)


_NUMBER = re.compile(r"^[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?$")
