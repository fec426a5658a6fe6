"""Drop levels: a sub-block (attention or MLP) becomes the identity on the residual path.

    units: subblock                  # one unit per attention / MLP sub-block (see planner/units.py)
    levels:
      - method: drop                 # two levels: `keep` and `drop`

A sub-block adds its output to the residual stream through its last linear (o_proj, down_proj;
no bias in the supported families), so zeroing that weight removes the sub-block exactly: the
block's output equals its input plus the other sub-block's contribution. A sub-block unit is
named after that linear and stands for all of the sub-block's linears (`Unit.parts`), so its
costs are summed over them: `keep` = the sub-block as in the base model, counted as fp16
(16 bits per weight, no metadata); `drop` = nothing stored (0 bits, 0 kept weights). The stored
`keep` tensor is the output linear's weight as loaded (evaluation reproduces the base model
exactly); a `drop` level stores only its shape.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from planner.errors import BadSearchSpace
from planner.levels.registry import Builder, BuildOptions, register_builder


class Depth(str, enum.Enum):
    KEEP = "keep"
    DROP = "drop"


@dataclass(frozen=True)
class DropSpec:
    depth: Depth

    @property
    def id(self) -> str:
        return self.depth.value

    @property
    def builder(self) -> str:
        return "drop"

    def kept(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] if self.depth is Depth.KEEP else 0

    def code_bits(self, shape: tuple[int, int]) -> int:
        return 16 * self.kept(shape)

    def stored_bits(self, shape: tuple[int, int]) -> int:
        return 16 * self.kept(shape)

    def nbytes(self, shape: tuple[int, int]) -> int:
        return 2 * self.kept(shape)

    def to_json(self) -> dict:
        return {"method": "drop", "depth": self.depth.value}


@dataclass
class DropWeight:
    shape: tuple[int, int]
    weight: torch.Tensor | None      # the kept weight as loaded; None when dropped

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=dtype) if self.weight is None else self.weight.to(dtype)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        meta = {f"{prefix}.meta": torch.tensor([*self.shape, int(self.weight is not None)])}
        return meta if self.weight is None else {**meta, f"{prefix}.weight": self.weight.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> DropWeight:
        out, inp, kept = (int(v) for v in tensors[f"{prefix}.meta"].tolist())
        return cls((out, inp), tensors[f"{prefix}.weight"] if kept else None)


_KEYS = {"method", "levels"}


def parse_drop(fam: dict, at: str) -> list[DropSpec]:
    extra = set(fam) - _KEYS
    if extra:
        raise BadSearchSpace(f"{at}: unknown key(s) {sorted(extra)}; allowed: {', '.join(sorted(_KEYS))}")
    names = fam.get("levels", ["keep", "drop"])
    if not isinstance(names, list) or not names or not set(names) <= {d.value for d in Depth}:
        raise BadSearchSpace(f"{at}: levels must be a non-empty list of keep / drop, got {names!r}")
    return [DropSpec(Depth(n)) for n in dict.fromkeys(names)]


def build_drop(W: torch.Tensor, H: torch.Tensor | None, specs: list[DropSpec], opt: BuildOptions) -> dict:
    shape = (int(W.shape[0]), int(W.shape[1]))
    return {s.id: DropWeight(shape, W.detach().clone() if s.depth is Depth.KEEP else None) for s in specs}


register_builder(Builder("drop", parse_drop, build_drop, DropWeight.from_tensors))
