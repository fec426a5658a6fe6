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
from planner.levels.gptq import gptq_quantize
from planner.levels.hessian import collect_hessians
from planner.levels.pack import packed_nbytes
from planner.levels.quant import QuantizedWeight, QuantSpec, code_bits, n_groups, rtn_quantize, stored_bits
from planner.model.load import cache_root
from planner.problem import Problem
from planner.rundir import write_json
from planner.space import LevelSpec, Method, SearchSpace
from planner.units import Unit

DB_SCHEMA = 1
BUILDER_VERSION = "1"   # bump when a builder's numerics change: old databases stop matching


@dataclass(frozen=True)
class LevelInfo:
    id: str
    code_bits: int     # total nominal code bits of the unit at this level
    stored_bits: int   # total stored bits: codes + scales + zeros
    nbytes: int        # bytes of the packed tensors as stored


def levels_key(model_fingerprint: str, calib_ids: torch.Tensor, space: SearchSpace) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_fingerprint, "space": space.to_json(), "builder": BUILDER_VERSION,
                         "schema": DB_SCHEMA}, sort_keys=True).encode())
    h.update(calib_ids.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def _quant_spec(spec: LevelSpec) -> QuantSpec:
    return QuantSpec(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)


class LevelsDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self._dequantized: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}

    @property
    def units(self) -> list[str]:
        return list(self.manifest["units"])

    def levels(self, unit: str) -> list[LevelInfo]:
        return [LevelInfo(**lv) for lv in self.manifest["units"][unit]["levels"]]

    def _file(self, unit: str) -> Path:
        return self.path / "units" / f"{unit}.safetensors"

    def load(self, unit: str, level: str) -> QuantizedWeight:
        return QuantizedWeight.from_tensors(load_file(self._file(unit)), level)

    def weight(self, unit: str, level: str, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight, cached in memory (the evaluator swaps these in by reference)."""
        key = (unit, level, dtype)
        if key not in self._dequantized:
            tensors = load_file(self._file(unit))
            for lv in self.levels(unit):  # one file read fills every level of the unit
                self._dequantized[(unit, lv.id, dtype)] = QuantizedWeight.from_tensors(tensors, lv.id).dequantize(dtype)
        return self._dequantized[key]

    def problem(self, units: list[Unit], budget: Budget) -> Problem:
        """Ladders ordered by stored cost (cheapest first); costs exact per (unit, level)."""
        ladders = [sorted(self.levels(u.name), key=lambda lv: (lv.stored_bits, lv.code_bits)) for u in units]
        width = max(len(lad) for lad in ladders)
        code = np.full((len(units), width), np.nan)
        stored = np.full((len(units), width), np.nan)
        for i, lad in enumerate(ladders):
            code[i, :len(lad)] = [lv.code_bits for lv in lad]
            stored[i, :len(lad)] = [lv.stored_bits for lv in lad]
        return Problem(units=tuple(u.name for u in units), numel=np.array([u.numel for u in units], dtype=np.int64),
                       levels=tuple(tuple(lv.id for lv in lad) for lad in ladders), code_bits=code, stored_bits=stored,
                       budget=budget, kinds=tuple(u.kind for u in units), blocks=tuple(u.block for u in units))


def _quantize_unit(W: torch.Tensor, H: torch.Tensor | None, space: SearchSpace) -> dict[str, QuantizedWeight]:
    out: dict[str, QuantizedWeight] = {}
    gptq = [s for s in space.levels if s.method is Method.GPTQ]
    if gptq:  # one factorization of H serves every bitwidth
        qws = gptq_quantize(W, H, [_quant_spec(s) for s in gptq], percdamp=space.damp, block_size=space.block_size)
        out.update({s.id: q for s, q in zip(gptq, qws, strict=True)})
    for s in space.levels:
        if s.method is Method.RTN:
            out[s.id] = rtn_quantize(W, _quant_spec(s))
    return out


def build_levels(model: nn.Module, units: list[Unit], space: SearchSpace, calib_ids: torch.Tensor,
                 model_fingerprint: str, root: Path | None = None, progress_factory=None) -> LevelsDB:
    """Build (or reuse, or finish) the levels DB of `units` under `space`, calibrated on `calib_ids`."""
    path = (root or cache_root() / "levels") / levels_key(model_fingerprint, calib_ids, space)
    if (path / "manifest.json").is_file():
        if all((path / "units" / f"{u.name}.safetensors").is_file() for u in units):
            return LevelsDB(path)
        (path / "manifest.json").unlink()   # a unit file was lost: rebuild just the missing ones
    (path / "units").mkdir(parents=True, exist_ok=True)
    todo = [u for u in units if not (path / "units" / f"{u.name}.safetensors").is_file()]
    needs_h = any(s.method is Method.GPTQ for s in space.levels) and todo
    hessians: dict[str, torch.Tensor] = {}
    if needs_h:
        with _bar(progress_factory, len(calib_ids), "hessians (windows)") as bar:
            hessians = collect_hessians(model, [u for u in units if u in todo], calib_ids, progress=bar)
    with _bar(progress_factory, len(units), "levels (units)", initial=len(units) - len(todo)) as bar:
        for u in todo:
            W = model.get_submodule(u.name).weight.detach().float()
            qws = _quantize_unit(W, hessians.get(u.group), space)
            tensors: dict[str, torch.Tensor] = {}
            for level_id, q in qws.items():
                tensors.update(q.to_tensors(level_id))
            tmp = path / "units" / f"{u.name}.safetensors.tmp"
            save_file(tensors, str(tmp))
            os.replace(tmp, path / "units" / f"{u.name}.safetensors")
            bar.update(1)
    manifest = {"schema": DB_SCHEMA, "space": space.to_json(), "units": {
        u.name: {"shape": list(u.shape), "levels": [
            {"id": s.id, "code_bits": code_bits(u.shape, _quant_spec(s)), "stored_bits": stored_bits(u.shape, _quant_spec(s)),
             "nbytes": _stored_nbytes(u.shape, _quant_spec(s))} for s in space.levels]} for u in units}}
    write_json(path / "manifest.json", manifest)
    return LevelsDB(path)


def _stored_nbytes(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Bytes of the packed tensors as written: two bitstreams rounded up to bytes, fp16 scales."""
    groups = shape[0] * n_groups(shape[1], spec.group_size)
    zeros = 0 if spec.symmetric else packed_nbytes(groups, spec.bits)
    return packed_nbytes(shape[0] * shape[1], spec.bits) + 2 * groups + zeros


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _bar(factory, total: int, desc: str, initial: int = 0):
    return factory(total=total, desc=desc, initial=initial) if factory else _NullBar()
