"""The exporter interface, its registry, and what every exporter is handed.

    exporter = EXPORTERS["compressed-tensors"]          # one module per format, one line to register
    result = exporter.export(ctx)                       # writes into ctx.out (a fresh temp dir)

An exporter knows one deployment format; the plan, the levels DB (packed codes/scales/zeros per
unit and level), the model and the model-family table reach it through `ExportContext`. The
driver (`planner.export.export_run`) checks deployability first, writes into a temp dir and
renames it into place, so a failed export never leaves half a directory behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import nn

from planner.errors import PlannerError
from planner.levels.db import LevelsDB
from planner.levels.quant import QuantizedWeight
from planner.levels.registry import Stored
from planner.model.families import Family, LinearKind, family_of
from planner.plan import Plan
from planner.problem import Problem
from planner.space import LevelSpec, SearchSpace
from planner.units import Unit


class NotDeployable(PlannerError):
    """The plan uses something the target engine cannot serve (CLI: one line, exit 2)."""


class BadExport(PlannerError):
    """The export cannot be written (output exists, missing package, unsupported model)."""


@dataclass
class ExportContext:
    plan: Plan
    problem: Problem
    space: SearchSpace
    model: nn.Module              # the base model (float32, unmodified): exporters copy, never mutate
    tokenizer: object
    source: str                   # folder the model was loaded from (config, tokenizer files)
    units: list[Unit]
    db: LevelsDB
    out: Path                     # an empty directory that becomes the export
    dtype: torch.dtype = torch.float16   # dtype of the unquantized tensors written
    run_info: dict = field(default_factory=dict)   # plan id, costs, held-out KL/ppl (for manifests)
    dest: Path | None = None      # where `out` will be renamed to (for the commands printed to the user)

    @property
    def shown(self) -> Path:
        return self.dest or self.out

    @property
    def family(self) -> Family:
        fam = family_of(self.model.config.model_type)
        if fam is None:
            raise BadExport(f"model type {self.model.config.model_type!r} has no entry in the family table")
        return fam

    def level_of(self, unit: str) -> str:
        return self.plan.as_dict()[unit]

    def spec_of(self, unit: str) -> LevelSpec:
        return level_specs(self.space)[self.level_of(unit)]

    def stored(self, unit: str) -> Stored:
        """The unit's planned level exactly as the DB holds it (any kind: QuantizedWeight, FormatWeight,
        GGUFWeight, ...)."""
        return self.db.load(unit, self.level_of(unit))

    def quantized(self, unit: str) -> QuantizedWeight:
        """The unit's packed codes/scales/zeros at its planned (integer) level, exactly as the DB holds them."""
        return self.stored(unit)

    def linear_kind(self, unit: Unit) -> LinearKind:
        return next(lk for lk in self.family.linears if lk.kind == unit.kind)


@dataclass
class ExportResult:
    format: str
    out: Path
    files: list[str]                          # relative to out
    lines: list[str] = field(default_factory=list)   # human summary printed by the CLI
    manifest: dict = field(default_factory=dict)     # written to out/planner-export.json

    def write_manifest(self, ctx: ExportContext) -> None:
        data = {"format": self.format, "plan_id": ctx.plan.id, **ctx.run_info, **self.manifest,
                "files": sorted(self.files + ["planner-export.json"])}
        (self.out / "planner-export.json").write_text(json.dumps(data, indent=1))


class Exporter(Protocol):
    name: ClassVar[str]            # the --format value
    target: ClassVar[str]          # the Target whose rules a plan must satisfy (planner.export.targets)
    description: ClassVar[str]

    def export(self, ctx: ExportContext) -> ExportResult: ...


EXPORTERS: dict[str, Exporter] = {}


def register(cls: type) -> type:
    """Class decorator: one registration line per exporter."""
    EXPORTERS[cls.name] = cls()
    return cls


def level_specs(space: SearchSpace) -> dict[str, LevelSpec]:
    """Every spec of the space by id, the overrides' levels included."""
    return {s.id: s for s in space.all_levels}


def planned_units(ctx: ExportContext) -> list[Unit]:
    """Units the plan names, in model order."""
    chosen = ctx.plan.as_dict()
    return [u for u in ctx.units if u.name in chosen]


def state_dict_without(model: nn.Module, skip: Callable[[str], bool], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the model except those `skip` names, floats cast to `dtype`, tied copies once."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if skip(name) or t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    return out
