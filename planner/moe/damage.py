"""Every unit's damage in one currency: the squared error its level adds to its decoder block's
output (the residual stream), per calibration token, with everything else exact.

Why one currency: `moe-lp` weighs experts against dense units (attention, shared experts, dense
MLPs) under one budget. Measured where each linear writes its output, the currencies differ: q/k
errors act through a softmax, gate/up errors through the activation and down_proj, and a Qwen
shared expert's down_proj output is scaled by its sigmoid gate (0.5 in the MoEfied SmolLM2, whose
shared down_proj is doubled to undo it: its error counted 4x what reaches the block output), while
an expert's error was already measured at its output times its routing weight. On the MoEfied
SmolLM2 at 2.5 bits the program then gave nearly every expert 2 bits and lost to uniform.

- dense unit u at level l: E_t ||block(x_t; W_u at l) - block(x_t)||^2, one forward of the block
  per (unit, level) on the cached block inputs (attention errors include the MLP's response);
- expert e at level l: E_t ||w_te (E_e,l(x_t) - E_e(x_t))||^2, summed over the tokens routed to it
  (w_te its routing weight, 0 elsewhere), which is exactly the block-output error of that expert
  alone at l (the router sees the block's input, which the expert does not change), computed
  without a block forward.

Both on the same calibration windows. The decoder blocks are run one after another on the base
model's hidden states (`planner.levels.sequential.block_inputs`), so the base weights are used
everywhere but in the unit being measured, and the model is unchanged afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from planner.levels.sequential import _run as _forward  # a block on cached inputs, as calibration runs it
from planner.levels.sequential import block_inputs
from planner.model.families import family_of
from planner.moe.experts import MoeBlock, unit_weight
from planner.moe.routing import expert_matrices, routed, routing_hooks
from planner.units import Unit


def _sq_error(ys: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    return float(sum((y.double() - r.double()).pow(2).sum() for y, r in zip(ys, refs, strict=True)))


def _level_ids(db, unit: str) -> list[str]:
    return [lv.id for lv in db.levels(unit)]


@torch.no_grad()
def block_damage(model: nn.Module, units: list[Unit], blocks: list[MoeBlock], db, ids: torch.Tensor,
                 batch_size: int = 4, progress=None) -> tuple[dict[str, dict[str, float]], dict[tuple[int, int], dict[str, float]]]:
    """(dense unit -> level -> damage, (block, expert) -> level -> damage) on the windows `ids`
    (model: fp32 base weights). An expert's levels are those all its matrices have."""
    layers = model.get_submodule(family_of(model.config.model_type).blocks)
    n_tokens = int(ids.numel())
    xs, kws = block_inputs(model, layers, ids, batch_size)
    dense: dict[str, dict[str, float]] = {}
    experts: dict[tuple[int, int], dict[str, float]] = {}
    last = max(u.block for u in units)
    for b in range(last + 1):
        mine = [mb for mb in blocks if mb.block == b]
        seen: list[tuple[MoeBlock, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with routing_hooks(model, mine, lambda mb, X, idx, w, seen=seen: seen.append((mb, X.float(), idx, w.float()))):
            refs = _forward(layers[b], xs, kws)
        for u in (u for u in units if u.block == b and u.expert < 0):
            W = unit_weight(model, u.name)
            base = W.clone()
            dense[u.name] = {}
            try:
                for lv in _level_ids(db, u.name):
                    W.copy_(db.load(u.name, lv).dequantize(torch.float32))
                    dense[u.name][lv] = _sq_error(_forward(layers[b], xs, kws), refs) / n_tokens
            finally:
                W.copy_(base)
            if progress is not None:
                progress.update(1)
        for mb in mine:
            experts.update(_expert_damage(model, mb, seen, db, n_tokens))
        if b < last:
            xs = refs
    return dense, experts


def _expert_damage(model: nn.Module, mb: MoeBlock, seen: list, db, n_tokens: int
                   ) -> dict[tuple[int, int], dict[str, float]]:
    """Per expert of `mb` and level: the summed squared routing-weighted output error over the
    tokens routed to it in the captured batches, per token of `n_tokens`."""
    out = {}
    for j, units in enumerate(mb.units):
        if not units:
            continue
        ids = [lv for lv in _level_ids(db, units[0].name) if all(lv in _level_ids(db, u.name) for u in units)]
        base = expert_matrices(model, mb, j)
        batches = []
        for m, X, idx, w in seen:
            if m is mb:
                tok, wj = routed(idx, w, j)
                if tok.numel():
                    batches.append((X[tok], wj[:, None], base.forward(X[tok])))
        out[(mb.block, j)] = {}
        for lv in ids:
            quant = expert_matrices(model, mb, j, {u.name: db.load(u.name, lv).dequantize(torch.float32) for u in units})
            err = sum(float((wj * (quant.forward(X) - ref)).double().pow(2).sum()) for X, wj, ref in batches)
            out[(mb.block, j)][lv] = err / n_tokens
    return out
