"""Expert levels: every expert matrix quantized with the Hessian of the tokens routed to it.

An expert sees only its routed tokens, so a Hessian hooked on a shared input would be wrong and
the fused 3-D tensors have no per-expert module to hook anyway. Here one pass over the calibration
windows reads the routing (`routing.capture_routing`) and accumulates, per expert, H = 2/n X^T X of
its routed inputs (gate/up) and of its down projection's inputs act(gate x) * up x. GPTQ (and any
other Hessian builder) then runs per expert matrix; RTN needs no Hessian.

`build_expert_levels` writes the expert units' files into the levels DB directory that
`planner.levels.db.build_levels` uses (same key, same file format), so that build finds them done,
collects Hessians only for the dense units, and writes the one manifest for all units.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from planner.levels.db import levels_key, write_unit
from planner.levels.registry import BUILDERS, BuildOptions, Stored
from planner.model.load import cache_root
from planner.moe.experts import MoeBlock, moe_blocks, refuse_fused_experts, unit_weight
from planner.moe.routing import capture_routing, expert_matrices, routed
from planner.space import SearchSpace
from planner.units import Unit


def _is_down(u: Unit) -> bool:
    return u.group.endswith(".down")


@torch.no_grad()
def expert_hessians(model: nn.Module, blocks: list[MoeBlock], calib_ids: torch.Tensor, progress=None,
                    usable: bool = True) -> dict[str, torch.Tensor]:
    """unit name -> H [in, in] of the tokens routed to its expert (float32, 2/n X^T X).

    `usable` (for GPTQ): an expert no calibration token reached gets the identity (GPTQ then rounds
    like RTN, with error feedback) and a column no routed token excites keeps its weight (GPTQ would
    zero it); without it such an H is zero where no token reached, as a hook on a module would see."""
    acc: dict[tuple[int, int], list] = {}    # (block, expert) -> [H_in, H_down, n]

    def fn(mb: MoeBlock, X: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        for j in range(mb.n_experts):
            tok, _ = routed(idx, w, j)
            if tok.numel() == 0 or not mb.units[j]:
                continue
            Xe = X[tok].float()
            h = expert_matrices(model, mb, j).hidden(Xe)
            key = (mb.block, j)
            if key not in acc:
                acc[key] = [torch.zeros(Xe.shape[1], Xe.shape[1]), torch.zeros(h.shape[1], h.shape[1]), 0]
            acc[key][0].addmm_(Xe.T, Xe)
            acc[key][1].addmm_(h.T, h)
            acc[key][2] += Xe.shape[0]

    capture_routing(model, blocks, calib_ids, fn, progress=progress)
    out: dict[str, torch.Tensor] = {}
    for mb in blocks:
        for j, units in enumerate(mb.units):
            H_in, H_down, n = acc.get((mb.block, j), (None, None, 0))
            for u in units:
                H = (H_down if _is_down(u) else H_in) if n else None
                if usable:
                    out[u.name] = _usable(H, u.shape[1], n)
                else:
                    out[u.name] = H * (2.0 / n) if n else torch.zeros(u.shape[1], u.shape[1])
    return out


def _usable(H: torch.Tensor | None, dim: int, n: int) -> torch.Tensor:
    if H is None:
        return torch.eye(dim)
    H = H * (2.0 / n)
    d = torch.diagonal(H)
    dead = d == 0
    if dead.any():
        d[dead] = d[~dead].mean() if (~dead).any() else 1.0
    return H


def _specs(space: SearchSpace, unit: Unit) -> tuple:
    return tuple(space.levels_for(unit))        # the space's levels, or an override's for this unit


def build_unit(W: torch.Tensor, H: torch.Tensor | None, space: SearchSpace, unit: Unit) -> dict[str, Stored]:
    """Every level of one expert matrix; each builder gets all its specs at once."""
    opt = BuildOptions(damp=space.damp, block_size=space.block_size)
    groups: dict[str, list] = {}
    for s in _specs(space, unit):
        groups.setdefault(s.builder, []).append(s)
    out: dict[str, Stored] = {}
    for name, specs in groups.items():
        out.update(BUILDERS[name].build(W, H if BUILDERS[name].needs_hessian else None, specs, opt))
    return out


def build_expert_levels(model: nn.Module, units: list[Unit], space: SearchSpace, calib_ids: torch.Tensor,
                        model_fingerprint: str, root: Path | None = None, progress_factory=None) -> int:
    """Write the unit files of the expert matrices among `units` (those not written yet) into the
    levels DB directory of (model, calibration, space); returns how many were built."""
    if space.sequential:     # the sequential pass swaps levels into modules, which fused expert slices are not
        refuse_fused_experts([u.name for u in units], "calibration: sequential", "remove calibration.sequential "
                             "from the search space (expert levels come from each expert's routed tokens)", model)
    path = (root or cache_root() / "levels") / levels_key(model_fingerprint, calib_ids, space)
    todo = [u for u in units if u.expert >= 0 and not (path / "units" / f"{u.name}.safetensors").is_file()]
    if not todo:
        return 0
    (path / "units").mkdir(parents=True, exist_ok=True)
    needs_h = any(BUILDERS[s.builder].needs_hessian for u in todo for s in _specs(space, u))
    hessians: dict[str, torch.Tensor] = {}
    if needs_h:
        blocks = moe_blocks(model, todo)
        with _bar(progress_factory, len(calib_ids), "expert hessians (windows)") as bar:
            hessians = expert_hessians(model, blocks, calib_ids, progress=bar)
    with _bar(progress_factory, len(todo), "expert levels (units)") as bar:
        for u in todo:
            write_unit(path, u, build_unit(unit_weight(model, u.name).detach().float(), hessians.get(u.name), space, u))
            if bar is not None:
                bar.update(1)
    return len(todo)


def _bar(factory, total: int, desc: str):
    from contextlib import nullcontext

    return factory(total=total, desc=desc) if factory else nullcontext()
