"""Collect the GPTQ Hessian H = 2/n * sum X^T X of every unit's input, in one pass over the
calibration windows. Units of one fused group (q/k/v, gate/up) read the same input, so they
share one H. Statistics only: the solvers live in gptq.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from planner.units import Unit


@contextmanager
def hessian_hooks(model: nn.Module, units: list[Unit]):
    """While open, every forward through the units' fused groups adds X^T X of their input; yields
    the dict unit.group -> H [in, in] (float32), scaled to 2/n * sum X^T X when the block exits."""
    first_of_group: dict[str, Unit] = {}
    for u in units:
        first_of_group.setdefault(u.group, u)
    H = {g: torch.zeros(u.shape[1], u.shape[1]) for g, u in first_of_group.items()}
    count = {g: 0 for g in H}

    def hook(group: str):
        def fn(_mod, args):
            X = args[0].reshape(-1, args[0].shape[-1]).float()
            H[group].addmm_(X.T, X)
            count[group] += X.shape[0]
        return fn

    handles = [model.get_submodule(u.name).register_forward_pre_hook(hook(g)) for g, u in first_of_group.items()]
    try:
        yield H
    finally:
        for h in handles:
            h.remove()
    for g in H:
        H[g].mul_(2.0 / max(count[g], 1))


@torch.no_grad()
def collect_hessians(model: nn.Module, units: list[Unit], calib_ids: torch.Tensor, batch_size: int = 4,
                     progress=None) -> dict[str, torch.Tensor]:
    """Map unit.group -> H [in, in] (float32). Every token of every window counts, the first
    included: attention-sink positions carry the largest activations and GPTQ must see them."""
    with hessian_hooks(model, units) as H:
        for start in range(0, len(calib_ids), batch_size):
            model(calib_ids[start:start + batch_size], use_cache=False)
            if progress is not None:
                progress.update(min(batch_size, len(calib_ids) - start))
    return H
