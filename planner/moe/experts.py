"""Expert discovery: the MoE blocks of a model, one unit per expert matrix, and how plans reach them.

Two layouts, both read from the family table (`Family.moe`):

- fused (transformers >= 5: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3): `experts.gate_up_proj`
  [E, 2I, H] and `experts.down_proj` [E, H, I]. There is no module per expert, so expert j's
  matrices are units named `<block>.experts.<j>.gate_up_proj` / `.down_proj` (the names older
  checkpoints give them); `unit_weight` resolves such a name to a 2-D view of the slice and
  `ExpertSlices` writes planned levels into a working copy of the 3-D tensor.
- per expert (older checkpoints, remote code): `experts` is a ModuleList of MLPs whose linears
  are ordinary modules, planned and applied like every dense linear.

Routers (`gate`, Qwen's `shared_expert_gate`) stay in full precision; shared experts are dense units.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from planner.errors import BadModel, PlannerError
from planner.model.families import FAMILIES, Family, family_of
from planner.units import Unit, module_at


@dataclass(frozen=True)
class MoeBlock:
    """One decoder block's MoE: where it is and which units are its experts' matrices."""

    block: int                         # decoder block index
    path: str                          # module path of the MoE block ("model.layers.3.mlp")
    experts: str                       # module path of its experts ("model.layers.3.mlp.experts")
    n_experts: int
    top_k: int
    fused: bool                        # 3-D expert tensors (else a ModuleList of MLPs)
    units: tuple[tuple[Unit, ...], ...]  # per expert, its matrices (gate_up or gate, up, then down)


def _moe_path(block: nn.Module, fam: Family) -> str | None:
    """Path of the MoE block inside a decoder block, None for a dense block."""
    for path in fam.moe.blocks:
        if module_at(block, f"{path}.{fam.moe.experts}") is not None:
            return path
    return None


def _expert_units(model: nn.Module, fam: Family, i: int, experts_path: str) -> list[Unit]:
    experts = model.get_submodule(experts_path)
    units = []
    fused = [(lk, getattr(experts, lk.path, None)) for lk in fam.moe.fused]
    if all(isinstance(p, nn.Parameter) and p.dim() == 3 for _, p in fused):
        for j in range(fused[0][1].shape[0]):
            for lk, p in fused:
                out_f, in_f = p.shape[1:]
                units.append(Unit(f"{experts_path}.{j}.{lk.path}", (out_f, in_f), out_f * in_f, i, lk.kind,
                                  f"{i}.e{j}.{lk.group}", expert=j))
        return units
    if not isinstance(experts, nn.ModuleList):
        raise BadModel(f"{experts_path} is a {type(experts).__name__} with neither 3-D expert tensors "
                       f"({', '.join(lk.path for lk in fam.moe.fused)}) nor a list of expert MLPs: layout not supported")
    for j, mlp in enumerate(experts):
        for lk in fam.moe.per_expert:
            mod = module_at(mlp, lk.path)
            if mod is None:
                continue
            if not isinstance(mod, nn.Linear):
                raise BadModel(f"{experts_path}.{j}.{lk.path} is a {type(mod).__name__}, not a Linear")
            out_f, in_f = mod.weight.shape
            units.append(Unit(f"{experts_path}.{j}.{lk.path}", (out_f, in_f), out_f * in_f, i, lk.kind,
                              f"{i}.e{j}.{lk.group}", expert=j))
    return units


def moe_block_units(model: nn.Module, fam: Family, i: int) -> list[Unit]:
    """Block i's expert matrices (expert-major), then its shared-expert linears; [] for a dense block."""
    blocks = model.get_submodule(fam.blocks)
    path = _moe_path(blocks[i], fam)
    if path is None:
        return []
    prefix = f"{fam.blocks}.{i}.{path}"
    units = _expert_units(model, fam, i, f"{prefix}.{fam.moe.experts}")
    if not units:
        raise BadModel(f"{prefix}.{fam.moe.experts} holds no expert linears this planner knows")
    for lk in fam.moe.shared:
        mod = module_at(model, f"{prefix}.{lk.path}")
        if mod is None:
            continue
        if not isinstance(mod, nn.Linear):
            raise BadModel(f"{prefix}.{lk.path} is a {type(mod).__name__}, not a Linear")
        out_f, in_f = mod.weight.shape
        units.append(Unit(f"{prefix}.{lk.path}", (out_f, in_f), out_f * in_f, i, lk.kind, f"{i}.{lk.group}"))
    return units


def moe_blocks(model: nn.Module, units: list[Unit]) -> list[MoeBlock]:
    """The MoE blocks whose experts are among `units` (the units of `find_units`)."""
    fam = family_of(model.config.model_type)
    if fam is None or fam.moe is None:
        return []
    blocks = model.get_submodule(fam.blocks)
    top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
    out = []
    for i in sorted({u.block for u in units if u.expert >= 0}):
        path = f"{fam.blocks}.{i}.{_moe_path(blocks[i], fam)}"
        experts = f"{path}.{fam.moe.experts}"
        mine = [u for u in units if u.block == i and u.expert >= 0]
        n = max(u.expert for u in mine) + 1
        per = tuple(tuple(u for u in mine if u.expert == j) for j in range(n))
        fused = not isinstance(model.get_submodule(experts), nn.ModuleList)
        out.append(MoeBlock(i, path, experts, n, top_k, fused, per))
    return out


def expert_ties(units: list[Unit]) -> tuple[str, ...]:
    """Per unit, its expert's tie id ("3.e5"; "" outside any expert), for `tie: expert`: an
    expert's matrices then take one level, and `Problem.fused` makes each expert one unit."""
    return tuple(f"{u.block}.e{u.expert}" if u.expert >= 0 else "" for u in units)


def expert_slice(model: nn.Module, name: str) -> tuple[nn.Parameter, int] | None:
    """(3-D parameter, expert index) for a fused expert unit name; None for a unit that is a module."""
    if module_at(model, name) is not None:
        return None
    prefix, j, attr = name.rsplit(".", 2)
    p = getattr(module_at(model, prefix), attr, None)
    if not j.isdigit() or not isinstance(p, nn.Parameter) or p.dim() != 3 or int(j) >= p.shape[0]:
        raise BadModel(f"{name!r} is neither a module nor a slice of a 3-D expert tensor of this model")
    return p, int(j)


def unit_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The 2-D weight [out, in] of a unit: a module's weight, or a view of a fused expert's slice."""
    hit = expert_slice(model, name)
    return model.get_submodule(name).weight if hit is None else hit[0][hit[1]]


class ExpertSlices:
    """Plans for fused expert tensors. Each touched 3-D parameter gets one working copy (made on
    first use) that is swapped in while a plan names any of its experts; applying a plan rewrites
    only the slices whose level changed since the last plan, so a searcher's offspring, which
    differ from their parent in a few units, cost a few slice copies, not a tensor copy each."""

    def __init__(self, model: nn.Module, names: list[str], weight: Callable[[str, str], torch.Tensor]):
        self._weight = weight                         # (unit, level) -> dequantized [out, in]
        self._slot = {n: expert_slice(model, n) for n in names}
        self._params = {id(p): p for p, _ in self._slot.values()}
        self._base = {k: p.data for k, p in self._params.items()}
        self._work: dict[int, torch.Tensor] = {}
        self._current: dict[str, str | None] = {n: None for n in names}

    @property
    def names(self) -> list[str]:
        return list(self._slot)

    def apply(self, chosen: dict[str, str | None]) -> None:
        """Swap in the levels of `chosen` (unit -> level id; None or absent: the base weights)."""
        by_param: dict[int, list[str]] = {}
        for n, (p, _) in self._slot.items():
            by_param.setdefault(id(p), []).append(n)
        for k, names in by_param.items():
            p = self._params[k]
            if all(chosen.get(n) is None for n in names) and k not in self._work:
                p.data = self._base[k]
                continue
            if k not in self._work:
                self._work[k] = self._base[k].clone()
            work = self._work[k]
            for n in names:
                level, j = chosen.get(n), self._slot[n][1]
                if level != self._current[n]:
                    work[j].copy_(self._weight(n, level) if level else self._base[k][j])
                    self._current[n] = level
            p.data = work if any(self._current[n] for n in names) else self._base[k]


class FusedExpertsUnsupported(PlannerError):
    """A verb that cannot handle slices of fused 3-D expert tensors yet (CLI: one line, exit 2)."""


# matrices only the fused layout has (the per-expert ModuleLists split gate and up): a plan naming
# `<experts>.<j>.gate_up_proj` is a fused model's, and so are the other slices under those experts
_FUSED_ONLY = ({lk.path for f in FAMILIES if f.moe for lk in f.moe.fused}
               - {lk.path for f in FAMILIES if f.moe for lk in f.moe.per_expert})
_SLICE = re.compile(r"^(.*)\.(\d+)\.([A-Za-z_0-9]+)$")


def fused_slices(names: Iterable[str], model: nn.Module | None = None) -> list[str]:
    """The names among `names` that are slices of fused 3-D expert tensors: exactly, from the model,
    or (no model: a run dir before anything is loaded) from the names the family table gives them."""
    names = list(names)
    if model is not None:
        return [n for n in names if expert_slice(model, n) is not None]
    parts = [(n, _SLICE.match(n)) for n in names]
    fused = {m.group(1) for _, m in parts if m and m.group(3) in _FUSED_ONLY}
    fused_paths = {lk.path for f in FAMILIES if f.moe for lk in f.moe.fused}
    return [n for n, m in parts if m and m.group(1) in fused and m.group(3) in fused_paths]


def refuse_fused_experts(names: Iterable[str], what: str, instead: str, model: nn.Module | None = None) -> None:
    """Raise one clear line when `what` would meet slices of fused 3-D expert tensors, which it
    does not handle (it would crash, or silently leave the experts at full precision)."""
    hit = fused_slices(names, model)
    if hit:
        raise FusedExpertsUnsupported(
            f"{what} does not support MoE experts stored as fused 3-D tensors (transformers' layout; "
            f"{len(hit)} planned expert slices such as {hit[0]!r}): {instead}")
