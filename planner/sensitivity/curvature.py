"""Per-unit curvature of the calibration loss: Hutchinson traces of the Hessian (HVPs through
autograd) and the empirical Fisher trace (squared gradients), every unit from one pass per probe.

The loss of the Hutchinson trace is the mean per-token KL to the model's own predictions at its
current weights: its gradient there is zero and its Hessian is the Fisher information (positive
semi-definite), so 0.5 * dW^T H dW predicts the KL a perturbation dW causes. With one joint
Rademacher vector v over all units, v_u . (H v)_u has expectation tr(H_uu) (cross terms vanish
because blocks of v are independent), so one HVP per probe serves every unit.

The Fisher score is the trace of (1/N) sum_t g_t g_t^T, g_t the gradient of token t's next-token
NLL. Per-token gradients are not materialized: with random signs s_t, E||sum_t s_t g_t||^2 =
sum_t ||g_t||^2, one backward per probe through a graph kept from one forward.

A unit may be a slice of a parameter: MoE experts stored as one fused 3-D tensor (transformers >= 5)
have no module per expert, so expert j's unit is the slice [j] of the tensor's gradient (and of the
probe vector, whose slices are independent like whole parameters are). Each distinct parameter is
differentiated once and its elementwise products are summed per unit.

Both stop when every unit's standard error is at most `tol` times its trace (or at `max_probes`).
A unit whose trace is below `floor` (1%) of the largest one gets an absolute bar instead, `tol`
times `floor` times the largest trace: its predicted damage is negligible next to the large ones,
and with a joint probe vector the cross terms of the large blocks would need thousands of probes
to pin it down relatively.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TraceEstimate:
    trace: np.ndarray      # [U] estimated trace per unit
    stderr: np.ndarray     # [U] standard error of each estimate
    probes: int


def unit_parameters(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """Per unit, the parameter holding its weight (a fused expert's: the whole 3-D tensor, see
    `unit_slices`), gradients enabled, everything else frozen; eager attention and experts, since
    the fused CPU kernels have no second derivative."""
    from planner.moe.experts import expert_slice

    model.requires_grad_(False)
    for name in ("set_attn_implementation", "set_experts_implementation"):
        if hasattr(model, name):
            getattr(model, name)("eager")
    params = []
    for n in names:
        hit = expert_slice(model, n)
        params.append(model.get_submodule(n).weight if hit is None else hit[0])
    for p in params:
        p.requires_grad_(True)
    return params


def unit_slices(model: nn.Module, names: list[str]) -> list[int | None]:
    """Per unit, the expert index of its slice in a fused 3-D expert tensor; None for a whole weight."""
    from planner.moe.experts import expert_slice

    return [None if hit is None else hit[1] for hit in (expert_slice(model, n) for n in names)]


class _Units:
    """Units over distinct parameters: several units may share one (the experts of a fused tensor)."""

    def __init__(self, params: list[nn.Parameter], slices: Sequence[int | None] | None):
        self.params = list({id(p): p for p in params}.values())
        pos = {id(p): i for i, p in enumerate(self.params)}
        self.index = [pos[id(p)] for p in params]
        self.slices = list(slices) if slices is not None else [None] * len(params)

    def sums(self, per_param: Sequence[torch.Tensor]) -> np.ndarray:
        """Per unit, the float64 sum of its part of an elementwise product over the distinct parameters."""
        return np.array([float((per_param[i] if s is None else per_param[i][s]).sum(dtype=torch.float64))
                         for i, s in zip(self.index, self.slices, strict=True)])


def rademacher(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.float32).mul_(2).sub_(1)


def mean_kl_to(logits: torch.Tensor, p_ref: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_ref || softmax(logits)), up to a constant (the entropy of p_ref)."""
    return -(p_ref * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


FLOOR = 0.01


def tolerance_met(mean: np.ndarray, stderr: np.ndarray, tol: float, floor: float = FLOOR) -> np.ndarray:
    """Per unit: stderr <= tol * max(|trace|, floor * largest |trace|)."""
    scale = np.maximum(np.abs(mean), floor * np.abs(mean).max())
    return stderr <= tol * scale


def _converged(samples: list[np.ndarray], tol: float, min_probes: int) -> bool:
    if len(samples) < max(min_probes, 2):
        return False
    s = np.array(samples)
    return bool(np.all(tolerance_met(s.mean(0), s.std(0, ddof=1) / np.sqrt(len(s)), tol)))


def _estimate(samples: list[np.ndarray]) -> TraceEstimate:
    s = np.array(samples)
    err = s.std(0, ddof=1) / np.sqrt(len(s)) if len(s) > 1 else np.full(s.shape[1], np.inf)
    return TraceEstimate(s.mean(0), err, len(s))


def _probe_loop(probe: Callable[[torch.Generator], np.ndarray], tol: float, min_probes: int, max_probes: int,
                seed: int, progress) -> TraceEstimate:
    gen = torch.Generator().manual_seed(seed)
    samples: list[np.ndarray] = []
    for _ in range(max_probes):
        samples.append(probe(gen))
        if progress is not None:
            progress.update(1)
        if _converged(samples, tol, min_probes):
            break
    return _estimate(samples)


def hutchinson_trace(model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor, tol: float = 0.1,
                     min_probes: int = 8, max_probes: int = 64, seed: int = 0, progress=None,
                     slices: Sequence[int | None] | None = None) -> TraceEstimate:
    """tr(H_uu) per unit of the Hessian of the mean per-token KL on `ids` ([B, T]) at the current weights
    (`slices`: per unit, its expert index in a shared 3-D parameter, see `unit_slices`)."""
    units = _Units(params, slices)
    with torch.no_grad():
        p_ref = torch.softmax(model(ids, use_cache=False).logits.float(), dim=-1)
    loss = mean_kl_to(model(ids, use_cache=False).logits, p_ref)
    grads = torch.autograd.grad(loss, units.params, create_graph=True)
    del p_ref

    def probe(gen: torch.Generator) -> np.ndarray:
        v = [rademacher(p.shape, gen) for p in units.params]
        hv = torch.autograd.grad(grads, units.params, grad_outputs=v, retain_graph=True)
        return units.sums([h * vi for h, vi in zip(hv, v, strict=True)])

    return _probe_loop(probe, tol, min_probes, max_probes, seed, progress)


def fisher_trace(model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor, tol: float = 0.1,
                 min_probes: int = 8, max_probes: int = 64, seed: int = 0, progress=None,
                 slices: Sequence[int | None] | None = None) -> TraceEstimate:
    """tr of the empirical Fisher (1/N) sum_t g_t g_t^T per unit, g_t = grad of token t's NLL on `ids`."""
    units = _Units(params, slices)
    logits = model(ids, use_cache=False).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    n = nll.numel()

    def probe(gen: torch.Generator) -> np.ndarray:
        g = torch.autograd.grad(nll, units.params, grad_outputs=rademacher(nll.shape, gen), retain_graph=True)
        return units.sums([gi.double().pow(2) for gi in g]) / n

    return _probe_loop(probe, tol, min_probes, max_probes, seed, progress)
