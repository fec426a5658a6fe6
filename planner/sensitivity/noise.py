"""HIGGS-style noise-injection coefficients: how much KL one unit's relative error costs.

For each unit, Gaussian noise of known relative size t^2 = ||noise||^2 / ||W||^2 is added to its
weight alone and the KL to the unperturbed model is measured on a fixed batch; the response is
linear in t^2 for small noise (HIGGS, Malinovskii et al. 2024), so alpha_u is the least-squares
slope through the origin over the noise levels, and alpha_u * relative_mse(level) predicts the KL
of that level.

Only the blocks from the perturbed one onward are re-run: the input of every block is cached from
one unperturbed forward and fed back as `inputs_embeds` to the block list sliced from there (the
family table says where the blocks live). The slicing is checked against a full forward first and
abandoned (full forwards) if a model's forward does not allow it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from planner.moe.experts import unit_weight
from planner.units import Unit


@dataclass(frozen=True)
class NoiseFit:
    alpha: np.ndarray      # [U] KL per unit of relative MSE
    residual: np.ndarray   # [U] relative rms residual of the linear fit (0 with one noise level)


@contextlib.contextmanager
def _blocks_from(model: nn.Module, blocks_path: str, start: int):
    parent_path, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    full = getattr(parent, attr)
    setattr(parent, attr, full[start:])
    try:
        yield
    finally:
        setattr(parent, attr, full)


class _Runner:
    """log-probs of the model on a fixed batch, optionally re-running only blocks >= b."""

    def __init__(self, model: nn.Module, blocks_path: str, ids: torch.Tensor):
        self.model, self.blocks_path, self.ids = model, blocks_path, ids
        blocks = model.get_submodule(blocks_path)
        inputs: list[torch.Tensor] = [None] * len(blocks)  # type: ignore[list-item]

        def keep(i):
            def fn(_mod, args, kwargs):
                inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            return fn

        handles = [blk.register_forward_pre_hook(keep(i), with_kwargs=True) for i, blk in enumerate(blocks)]
        try:
            self.base = self._logp(None)
        finally:
            for h in handles:
                h.remove()
        self.inputs = inputs
        self.sliced = len(blocks) > 1
        if self.sliced:     # a forward that cannot start mid-stack falls back to full forwards
            self.sliced = torch.allclose(self._logp(1), self.base, atol=1e-5, rtol=1e-5)

    @torch.no_grad()
    def _logp(self, start: int | None) -> torch.Tensor:
        if start is None or start == 0:
            logits = self.model(self.ids, use_cache=False).logits
        else:
            with _blocks_from(self.model, self.blocks_path, start):
                logits = self.model(inputs_embeds=self.inputs[start], use_cache=False).logits
        return torch.log_softmax(logits.double(), dim=-1)     # float64: a small KL is a small difference

    def kl(self, start: int) -> float:
        """Mean per-token KL(base || current model)."""
        logq = self._logp(start if self.sliced else None)
        return float((self.base.exp() * (self.base - logq)).sum(-1).mean())


@torch.no_grad()
def noise_response(model: nn.Module, units: list[Unit], blocks_path: str, ids: torch.Tensor,
                   levels: tuple[float, ...] = (0.01, 0.04), seed: int = 0, progress=None) -> NoiseFit:
    """alpha_u per unit: the KL response to Gaussian noise of relative MSE `levels` in unit u alone."""
    run = _Runner(model, blocks_path, ids)
    alpha, resid = np.zeros(len(units)), np.zeros(len(units))
    for i, u in enumerate(units):
        W = unit_weight(model, u.name)      # a module's weight, or a view of a fused expert's slice
        base = W.clone()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        rel, kl = [], []
        for t2 in levels:
            noise = torch.randn(W.shape, generator=gen, dtype=torch.float32).to(W.dtype)
            noise *= float(np.sqrt(t2 * float(base.double().pow(2).mean())))
            W.add_(noise)
            try:
                kl.append(run.kl(u.block))
            finally:
                W.copy_(base)
            rel.append(float(noise.double().pow(2).sum() / base.double().pow(2).sum()))
        r, k = np.array(rel), np.array(kl)
        alpha[i] = float((r * k).sum() / (r * r).sum())
        resid[i] = float(np.sqrt(np.mean((k - alpha[i] * r) ** 2)) / max(np.abs(k).mean(), 1e-30))
        if progress is not None:
            progress.update(1)
    return NoiseFit(alpha, resid)
