"""The levels database: every unit's compressed forms at every level of a search space.

On disk under `$PLANNER_CACHE/levels/<key>/`, where key is a content hash of the model weights,
the calibration tokens and the search space, so a second run with the same inputs reuses it:

    manifest.json              written last: its presence means the build is complete
    units/<unit>.safetensors   one file per unit; tensors `<level id>.codes|scales|zeros|meta`

Each unit file is written atomically, so a build killed at any moment resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from planner.budget import Budget
from planner.levels.hessian import collect_hessians
from planner.levels.registry import BUILDERS, Builder, BuildOptions, Stored
from planner.model.load import cache_root
from planner.problem import Problem
from planner.rundir import write_json
from planner.space import SearchSpace
from planner.units import Unit, cost_shapes

DB_SCHEMA = 1
BUILDER_VERSION = "1"   # bump when a builder's numerics change: old databases stop matching


@dataclass(frozen=True)
class LevelInfo:
    id: str
    code_bits: int     # total nominal code bits of the unit at this level
    stored_bits: int   # total stored bits: codes + scales + zeros
    nbytes: int        # bytes of the packed tensors as stored
    builder: str       # which registered builder made it
    kept: int | None = None   # weights kept (not pruned); None in manifests from before pruning levels: all


def levels_key(model_fingerprint: str, calib_ids: torch.Tensor, space: SearchSpace) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_fingerprint, "space": space.to_json(), "builder": BUILDER_VERSION,
                         "schema": DB_SCHEMA}, sort_keys=True).encode())
    h.update(calib_ids.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


class LevelsDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self._dequantized: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}

    @property
    def units(self) -> list[str]:
        return list(self.manifest["units"])

    def levels(self, unit: str) -> list[LevelInfo]:
        # manifests written before the `builder` field held integer-grid levels named "<method>-..."
        return [LevelInfo(**{"builder": lv["id"].split("-")[0], **lv}) for lv in self.manifest["units"][unit]["levels"]]

    def _file(self, unit: str) -> Path:
        return self.path / "units" / f"{unit}.safetensors"

    def _builder(self, unit: str, level: str) -> Builder:
        info = next(lv for lv in self.levels(unit) if lv.id == level)
        return BUILDERS[info.builder]

    def load(self, unit: str, level: str) -> Stored:
        """The stored compressed form (a QuantizedWeight for integer-grid levels)."""
        return self._builder(unit, level).load(load_file(self._file(unit)), level)

    def weight(self, unit: str, level: str, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight, cached in memory (the evaluator swaps these in by reference)."""
        key = (unit, level, dtype)
        if key not in self._dequantized:
            tensors = load_file(self._file(unit))
            for lv in self.levels(unit):  # one file read fills every level of the unit
                stored = BUILDERS[lv.builder].load(tensors, lv.id)
                self._dequantized[(unit, lv.id, dtype)] = stored.dequantize(dtype)
        return self._dequantized[key]

    def problem(self, units: list[Unit], budget: Budget) -> Problem:
        """Ladders ordered by stored cost (cheapest first); costs exact per (unit, level)."""
        ladders = [sorted(self.levels(u.name), key=lambda lv: (lv.stored_bits, lv.code_bits)) for u in units]
        width = max(len(lad) for lad in ladders)
        code = np.full((len(units), width), np.nan)
        stored = np.full((len(units), width), np.nan)
        kept = np.full((len(units), width), np.nan)
        for i, lad in enumerate(ladders):
            code[i, :len(lad)] = [lv.code_bits for lv in lad]
            stored[i, :len(lad)] = [lv.stored_bits for lv in lad]
            kept[i, :len(lad)] = [units[i].numel if lv.kept is None else lv.kept for lv in lad]
        return Problem(units=tuple(u.name for u in units), numel=np.array([u.numel for u in units], dtype=np.int64),
                       levels=tuple(tuple(lv.id for lv in lad) for lad in ladders), code_bits=code, stored_bits=stored,
                       budget=budget, kinds=tuple(u.kind for u in units), blocks=tuple(u.block for u in units),
                       kept=kept)


def _by_builder(space: SearchSpace, specs: tuple | None = None) -> dict[str, list]:
    groups: dict[str, list] = {}
    for s in space.all_levels if specs is None else specs:
        groups.setdefault(s.builder, []).append(s)
    return groups


def _build_unit(W: torch.Tensor, H: torch.Tensor | None, space: SearchSpace, unit: Unit | None = None) -> dict[str, Stored]:
    """Every level of one unit; each builder gets all its specs at once (one factorization each)."""
    opt = BuildOptions(damp=space.damp, block_size=space.block_size)
    out: dict[str, Stored] = {}
    for name, specs in _by_builder(space, space.levels if unit is None else space.levels_for(unit)).items():
        out.update(BUILDERS[name].build(W, H, specs, opt))
    return out


def _level_entry(spec, unit: Unit) -> dict:
    """A level's manifest entry: exact costs, summed over a sub-block unit's linears."""
    shapes = cost_shapes(unit)
    kept = sum(spec.kept(sh) for sh in shapes) if hasattr(spec, "kept") else unit.numel
    return {"id": spec.id, "builder": spec.builder, "code_bits": sum(spec.code_bits(sh) for sh in shapes),
            "stored_bits": sum(spec.stored_bits(sh) for sh in shapes), "nbytes": sum(spec.nbytes(sh) for sh in shapes),
            "kept": kept}


def write_unit(path: Path, unit: Unit, stored: dict[str, Stored]) -> None:
    """One unit file, atomically: a killed build never leaves a partial file under the final name."""
    tensors: dict[str, torch.Tensor] = {}
    for level_id, q in stored.items():
        tensors.update(q.to_tensors(level_id))
    tmp = path / "units" / f"{unit.name}.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / "units" / f"{unit.name}.safetensors")


def build_levels(model: nn.Module, units: list[Unit], space: SearchSpace, calib_ids: torch.Tensor,
                 model_fingerprint: str, root: Path | None = None, progress_factory=None) -> LevelsDB:
    """Build (or reuse, or finish) the levels DB of `units` under `space`, calibrated on `calib_ids`.
    With `space.sequential` the units are built block by block (planner/levels/sequential.py)."""
    path = (root or cache_root() / "levels") / levels_key(model_fingerprint, calib_ids, space)
    if (path / "manifest.json").is_file():
        if all((path / "units" / f"{u.name}.safetensors").is_file() for u in units):
            return LevelsDB(path)
        (path / "manifest.json").unlink()   # a unit file was lost: rebuild just the missing ones
    (path / "units").mkdir(parents=True, exist_ok=True)
    todo = [u for u in units if not (path / "units" / f"{u.name}.safetensors").is_file()]
    needs_h = any(BUILDERS[b].needs_hessian for b in _by_builder(space)) and todo
    if space.sequential and todo:
        from planner.levels.sequential import build_sequential

        with _bar(progress_factory, len(units), "levels (units, sequential)", initial=len(units) - len(todo)) as bar:
            build_sequential(model, units, space, calib_ids, path, bar, needs_h)
        todo = []
    hessians: dict[str, torch.Tensor] = {}
    if needs_h and todo:
        with _bar(progress_factory, len(calib_ids), "hessians (windows)") as bar:
            hessians = collect_hessians(model, [u for u in units if u in todo], calib_ids, progress=bar)
    with _bar(progress_factory, len(units), "levels (units)", initial=len(units) - len(todo)) as bar:
        for u in todo:
            W = model.get_submodule(u.name).weight.detach().float()
            write_unit(path, u, _build_unit(W, hessians.get(u.group), space, u))
            bar.update(1)
    manifest = {"schema": DB_SCHEMA, "space": space.to_json(), "units": {
        u.name: {"shape": list(u.shape), "levels": [_level_entry(s, u) for s in space.levels_for(u)]} for u in units}}
    write_json(path / "manifest.json", manifest)
    return LevelsDB(path)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _bar(factory, total: int, desc: str, initial: int = 0):
    return factory(total=total, desc=desc, initial=initial) if factory else _NullBar()
