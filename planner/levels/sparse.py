"""Pruning levels: SparseGPT, Wanda and magnitude, unstructured and N:M, kept values in fp16.

    levels:
      - method: sparsegpt            # sparsegpt | wanda | magnitude
        sparsity: [0.0, 0.5, 0.6]    # unstructured fractions in [0, 1); 0 = the dense fp16 weight
        nm: ["2:4"]                  # N:M patterns: keep n of every m consecutive input columns
        steps: 4                     # optional, EvoPress's levels: around each sparsity s, levels that
        step_weights: 16384          # prune k * step_weights more weights, k = -steps..steps

Ids: `sparsegpt-s50`, `wanda-2of4`, `magnitude-s0` (dense), `sparsegpt-s60-32768w`. With `steps`,
adjacent levels of every unit differ by exactly `step_weights` pruned weights (clamped at 0 and at
the unit's size), so a level switch that raises one unit and lowers another keeps the total
exactly (EvoPress uses step_weights = 0.5 * min(s, 1 - s) / steps * hidden^2). Format and exact costs: `sparse_format.py`
(unstructured: 1-bit mask + fp16 values = 1 + 16 * density bits per weight; 2:4: fp16 values +
a 2-bit index per kept value = 9 bpw). SparseGPT builds every level of a unit from one Hessian
factorization; Wanda reads only diag(H); magnitude needs no calibration.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from planner.errors import BadSearchSpace
from planner.levels import sparse_format as fmt
from planner.levels.registry import Builder, BuildOptions, register_builder
from planner.levels.sparse_format import Pattern, SparseWeight
from planner.levels.sparsegpt import magnitude_prune, sparsegpt_prune, wanda_prune


class PruneMethod(str, enum.Enum):
    SPARSEGPT = "sparsegpt"
    WANDA = "wanda"
    MAGNITUDE = "magnitude"


@dataclass(frozen=True)
class SparseSpec:
    method: PruneMethod
    pattern: Pattern

    @property
    def id(self) -> str:
        return f"{self.method.value}-{self.pattern.id}"

    @property
    def builder(self) -> str:
        return self.method.value

    def kept(self, shape: tuple[int, int]) -> int:
        return self.pattern.kept(shape)

    def code_bits(self, shape: tuple[int, int]) -> int:
        return fmt.code_bits(shape, self.pattern, None)

    def stored_bits(self, shape: tuple[int, int]) -> int:
        return fmt.stored_bits(shape, self.pattern, None)

    def nbytes(self, shape: tuple[int, int]) -> int:
        return fmt.nbytes(shape, self.pattern, None)

    def to_json(self) -> dict:
        return {"method": self.method.value, **self.pattern.to_json()}


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise BadSearchSpace(f"{where}: {msg}")


def parse_patterns(fam: dict, at: str) -> list[Pattern]:
    """The `sparsity` and `nm` keys of a level family (shared with joint levels)."""
    sp = fam.get("sparsity", [])
    sp = [sp] if isinstance(sp, (int, float)) and not isinstance(sp, bool) else sp
    _need(isinstance(sp, list) and all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1
                                       for s in sp), at, "sparsity must be a number or list of numbers in [0, 1)")
    nm = fam.get("nm", [])
    nm = [nm] if isinstance(nm, str) else nm
    _need(isinstance(nm, list), at, "nm must be a pattern like '2:4' or a list of them")
    steps, step = fam.get("steps", 0), fam.get("step_weights", 0)
    for v, key in ((steps, "steps"), (step, "step_weights")):
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, at, f"{key} must be a positive integer")
    _need(bool(steps) == bool(step), at, "steps and step_weights go together (levels at s + k * step_weights weights)")
    patterns = [Pattern(sparsity=float(s), offset=k * step) for s in sp for k in range(-steps, steps + 1)]
    for text in nm:
        parts = str(text).split(":")
        ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
        n, m = (int(p) for p in parts) if ok else (0, 0)
        _need(ok and 1 <= n < m <= 256, at, f"nm pattern {text!r} must be 'n:m' with 1 <= n < m <= 256, e.g. '2:4'")
        patterns.append(Pattern(n=n, m=m))
    _need(patterns, at, "give at least one level: sparsity: [0.5, ...] and/or nm: ['2:4']")
    return patterns


_KEYS = {"method", "sparsity", "nm", "steps", "step_weights"}


def parse_sparse(fam: dict, at: str) -> list[SparseSpec]:
    extra = set(fam) - _KEYS
    _need(not extra, at, f"unknown key(s) {sorted(extra)}; allowed: {', '.join(sorted(_KEYS))}")
    return [SparseSpec(PruneMethod(fam["method"]), p) for p in parse_patterns(fam, at)]


def _stored(levels: dict[str, object]) -> dict[str, SparseWeight]:
    return {i: SparseWeight.from_dense(p.W, p.keep, spec.pattern) for i, (spec, p) in levels.items()}


def build_sparsegpt(W: torch.Tensor, H: torch.Tensor | None, specs: list[SparseSpec], opt: BuildOptions) -> dict:
    pruned = sparsegpt_prune(W, H, [(s.pattern, None) for s in specs], percdamp=opt.damp, block_size=opt.block_size)
    return _stored({s.id: (s, p) for s, p in zip(specs, pruned, strict=True)})


def build_wanda(W: torch.Tensor, H: torch.Tensor | None, specs: list[SparseSpec], opt: BuildOptions) -> dict:
    return _stored({s.id: (s, wanda_prune(W, H, s.pattern)) for s in specs})


def build_magnitude(W: torch.Tensor, H: torch.Tensor | None, specs: list[SparseSpec], opt: BuildOptions) -> dict:
    return _stored({s.id: (s, magnitude_prune(W, s.pattern)) for s in specs})


def load_sparse(tensors: dict[str, torch.Tensor], level: str) -> SparseWeight:
    return SparseWeight.from_tensors(tensors, level)


register_builder(Builder("sparsegpt", parse_sparse, build_sparsegpt, load_sparse, needs_hessian=True))
register_builder(Builder("wanda", parse_sparse, build_wanda, load_sparse, needs_hessian=True))
register_builder(Builder("magnitude", parse_sparse, build_magnitude, load_sparse))
