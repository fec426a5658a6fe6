"""Joint levels: SparseGPT pruning and GPTQ quantization of the kept weights in one OBS pass.

    levels:
      - method: joint
        bits: [3, 4]                 # code bits of the kept values (1..8)
        sparsity: [0.5, 0.6]         # unstructured fractions in [0, 1) ...
        nm: ["2:4"]                  # ... and/or N:M patterns (m must divide group_size)
        group_size: 128              # columns per scale/zero group; 0 = per output channel
        symmetric: false

Every (bits, pattern) pair is one level, id `joint-b4-s50-g128` (`-sym` when symmetric). Stored:
the pattern's positions (1-bit mask, or ceil(log2 m)-bit indices per kept value), `bits`-bit codes
of the kept values only, and per (row, group) an fp16 scale and a `bits`-bit zero point; so
code_bits = bits * kept and stored_bits adds the positions and the grid (`sparse_format.py`).
All levels of a unit come from one Hessian factorization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from planner.errors import BadSearchSpace
from planner.levels import sparse_format as fmt
from planner.levels.quant import QuantSpec
from planner.levels.quant_levels import parse_quant
from planner.levels.registry import Builder, BuildOptions, register_builder
from planner.levels.sparse import load_sparse, parse_patterns
from planner.levels.sparse_format import Pattern, SparseWeight
from planner.levels.sparsegpt import sparsegpt_prune


@dataclass(frozen=True)
class JointSpec:
    pattern: Pattern
    quant: QuantSpec

    @property
    def id(self) -> str:
        q = self.quant
        g = f"g{q.group_size}" if q.group_size > 0 else "pc"
        return f"joint-b{q.bits}-{self.pattern.id}-{g}" + ("-sym" if q.symmetric else "")

    @property
    def builder(self) -> str:
        return "joint"

    def kept(self, shape: tuple[int, int]) -> int:
        return self.pattern.kept(shape)

    def code_bits(self, shape: tuple[int, int]) -> int:
        return fmt.code_bits(shape, self.pattern, self.quant)

    def stored_bits(self, shape: tuple[int, int]) -> int:
        return fmt.stored_bits(shape, self.pattern, self.quant)

    def nbytes(self, shape: tuple[int, int]) -> int:
        return fmt.nbytes(shape, self.pattern, self.quant)

    def to_json(self) -> dict:
        q = self.quant
        return {"method": "joint", "bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric,
                **self.pattern.to_json()}


_KEYS = {"method", "bits", "sparsity", "nm", "steps", "step_weights", "group_size", "symmetric"}


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise BadSearchSpace(f"{where}: {msg}")


def parse_joint(fam: dict, at: str) -> list[JointSpec]:
    extra = set(fam) - _KEYS
    _need(not extra, at, f"unknown key(s) {sorted(extra)}; allowed: {', '.join(sorted(_KEYS))}")
    grid = parse_quant({"method": "gptq", **{k: fam[k] for k in ("bits", "group_size", "symmetric") if k in fam}}, at)
    patterns = parse_patterns(fam, at)
    for p in patterns:
        gs = grid[0].group_size
        _need(not p.is_nm or gs == 0 or gs % p.m == 0, at, f"nm {p.n}:{p.m} needs a group_size that is a multiple of {p.m}")
    return [JointSpec(p, QuantSpec(g.bits, g.group_size, g.symmetric)) for g in grid for p in patterns]


def build_joint(W: torch.Tensor, H: torch.Tensor | None, specs: list[JointSpec], opt: BuildOptions) -> dict:
    pruned = sparsegpt_prune(W, H, [(s.pattern, s.quant) for s in specs], percdamp=opt.damp, block_size=opt.block_size)
    return {s.id: SparseWeight.from_codes(p.codes, p.scale, p.zero, p.keep, s.pattern, s.quant)
            for s, p in zip(specs, pruned, strict=True)}


register_builder(Builder("joint", parse_joint, build_joint, load_sparse, needs_hessian=True))
