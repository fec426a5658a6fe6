"""Sequential calibration: build the levels DB block by block, each block's Hessians measured on
the inputs that the already-compressed prefix produces (the sequential mode of GPTQ / SparseGPT).

    calibration:
      sequential: sparsegpt-s50     # the level every unit of the prefix takes while calibrating

For block i: run the calibration windows through block i (the blocks before it already hold the
`sequential` level), collect the Hessians of its linears with hooks, build every level of its
units, write their files; then swap the `sequential` level into block i, run it once more to get
block i+1's inputs, and restore the base weights. The model is the base model again at the end.
Only one block's Hessians exist at a time, so peak memory beyond the loaded model is

    2 * N * T * d * 4 B                   block inputs and outputs (N windows of T tokens, hidden d)
  + sum over the block's input groups of in_g^2 * 4 B      (Llama: (3 d^2 + d_ff^2) * 4 B)
  + one unit's build (~ (levels + 4) * out * in * 4 B)
  + one batch's attention scores (batch * heads * T^2 * 4 B)

instead of every block's Hessians at once (n_blocks times the second term) in the one-pass
build. Resumable: units whose files exist are not rebuilt, and a finished block propagates
through its stored `sequential` level, so a killed build continues at the block it was in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from planner.levels.hessian import hessian_hooks
from planner.levels.registry import BUILDERS
from planner.model.families import family_of
from planner.space import SearchSpace
from planner.units import Unit


class _Captured(Exception):
    pass


@torch.no_grad()
def block_inputs(model: nn.Module, layers: nn.ModuleList, calib_ids: torch.Tensor,
                 batch_size: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering block 0, per batch of windows, and the keyword arguments the decoder
    passes every block (causal mask, rotary embeddings), captured by stopping at block 0."""
    xs, kws = [], []

    def grab(_mod, args, kwargs):
        xs.append(args[0] if args else kwargs.pop("hidden_states"))
        kws.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for s in range(0, len(calib_ids), batch_size):
            try:
                model(calib_ids[s:s + batch_size], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return xs, kws


def _run(layer: nn.Module, xs: list[torch.Tensor], kws: list[dict]) -> list[torch.Tensor]:
    outs = []
    for x, kw in zip(xs, kws, strict=True):
        y = layer(x, **kw)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


@torch.no_grad()
def block_hessians(model: nn.Module, layer: nn.Module, units: list[Unit], xs: list[torch.Tensor],
                   kws: list[dict]) -> dict[str, torch.Tensor]:
    """H = 2/n sum X^T X of each fused group's input inside one block (every token counts)."""
    with hessian_hooks(model, units) as H:
        _run(layer, xs, kws)
    return H


def _unit_file(path: Path, u: Unit) -> Path:
    return path / "units" / f"{u.name}.safetensors"


@torch.no_grad()
def _propagate(model: nn.Module, layer: nn.Module, units: list[Unit], space: SearchSpace, path: Path,
               xs: list[torch.Tensor], kws: list[dict]) -> list[torch.Tensor]:
    """Block outputs with the block's units at the `sequential` level (read back from their files);
    the base weights are restored afterwards."""
    from safetensors.torch import load_file

    level, saved = space.sequential, {}
    try:
        for u in units:
            mod = model.get_submodule(u.name)
            builder = BUILDERS[next(s.builder for s in space.levels_for(u) if s.id == level)]
            saved[u.name] = mod.weight.data
            mod.weight.data = builder.load(load_file(_unit_file(path, u)), level).dequantize(mod.weight.dtype)
        return _run(layer, xs, kws)
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w


def build_sequential(model: nn.Module, units: list[Unit], space: SearchSpace, calib_ids: torch.Tensor, path: Path,
                     bar, needs_hessian: bool, batch_size: int = 4) -> None:
    """Write every missing unit file of `units`, block by block (see the module docstring)."""
    from planner.levels.db import _build_unit, write_unit

    fam = family_of(model.config.model_type)
    layers = model.get_submodule(fam.blocks)
    by_block: dict[int, list[Unit]] = {}
    for u in units:
        by_block.setdefault(u.block, []).append(u)
    last = max(b for b, us in by_block.items() if any(not _unit_file(path, u).is_file() for u in us))
    xs, kws = block_inputs(model, layers, calib_ids, batch_size)
    for b in range(last + 1):
        todo = [u for u in by_block.get(b, []) if not _unit_file(path, u).is_file()]
        if todo:
            if hasattr(bar, "set_postfix_str"):     # tqdm: the bar's ETA counts units; say which block
                bar.set_postfix_str(f"block {b + 1}/{last + 1}", refresh=False)
            H = block_hessians(model, layers[b], todo, xs, kws) if needs_hessian else {}
            for u in todo:
                W = model.get_submodule(u.name).weight.detach().float()
                write_unit(path, u, _build_unit(W, H.get(u.group), space, u))
                bar.update(1)
            del H
        if b < last:
            xs = _propagate(model, layers[b], by_block.get(b, []), space, path, xs, kws)
