"""Sensitivity per expert slice of fused 3-D expert tensors: the same numbers as the per-expert
modules of an older checkpoint with the same weights (Fisher traces, the routed-token Hessians of
`proxy`), Hutchinson within its error bars, noise injection restoring the tensors bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.moe.experts import unit_weight
from planner.sensitivity.curvature import fisher_trace, hutchinson_trace, unit_parameters, unit_slices
from planner.sensitivity.noise import noise_response
from planner.sensitivity.score import unit_hessians
from planner.units import find_units

from .test_moe_models import build, legacy_mixtral

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(3))


def _legacy_names(name: str) -> list[str]:
    """The per-expert modules a fused unit name stands for (Mixtral: gate_up = w1 + w3, down = w2)."""
    if name.endswith(".gate_up_proj"):
        return [name.replace("gate_up_proj", "w1"), name.replace("gate_up_proj", "w3")]
    return [name.replace("down_proj", "w2")] if ".experts." in name else [name]


def _traces(model, estimate, **kw):
    names = [u.name for u in find_units(model)]
    params = unit_parameters(model, names)
    est = estimate(model, params, IDS, slices=unit_slices(model, names), **kw)
    for p in params:
        p.requires_grad_(False)
    return names, est


@pytest.mark.parametrize("estimate", [fisher_trace, hutchinson_trace])
def test_traces_per_slice_match_per_expert_modules(estimate):
    fused, legacy = build("mixtral"), legacy_mixtral()
    kw = dict(tol=0.05, min_probes=16, max_probes=400, seed=0)
    names, f = _traces(fused, estimate, **kw)
    lnames, g = _traces(legacy, estimate, **kw)
    assert sum(s is not None for s in unit_slices(fused, names)) == 16
    at = {n: i for i, n in enumerate(lnames)}
    for i, n in enumerate(names):
        parts = [at[m] for m in _legacy_names(n)]
        want, err = g.trace[parts].sum(), np.sqrt((g.stderr[parts] ** 2).sum())
        if estimate is fisher_trace:      # the probe is over tokens: the same signs, the same numbers
            assert f.trace[i] == pytest.approx(want, rel=1e-4), n
        else:                             # independent probes over parameters: agree within error bars
            assert abs(f.trace[i] - want) <= 4 * np.hypot(f.stderr[i], err) + 1e-9, n


def test_proxy_hessians_are_the_routed_tokens_of_each_slice():
    fused, legacy = build("mixtral"), legacy_mixtral()
    units, lunits = find_units(fused), find_units(legacy)
    H, L = unit_hessians(fused, units, IDS), unit_hessians(legacy, lunits, IDS)
    assert set(H) == set(L) and any(".e3." in g for g in H)
    for g in H:
        torch.testing.assert_close(H[g], L[g], rtol=1e-4, atol=1e-5)


def test_noise_on_slices_restores_the_tensors():
    model = build("mixtral")
    units = [u for u in find_units(model) if u.expert >= 0][:3]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit = noise_response(model, units, "model.layers", IDS, levels=(0.001, 0.004), seed=0)
    assert np.all(fit.alpha > 0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert unit_weight(model, units[0].name).shape == units[0].shape
