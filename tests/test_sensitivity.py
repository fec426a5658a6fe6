"""Sensitivity scores on tiny random Llamas: the Hutchinson trace against the exact Hessian trace,
the sign-trick Fisher against per-token gradients, HIGGS noise coefficients, damage tables and
their cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.budget import parse_budget
from planner.sensitivity.curvature import (
    FLOOR,
    fisher_trace,
    hutchinson_trace,
    mean_kl_to,
    tolerance_met,
    unit_parameters,
)
from planner.sensitivity.noise import _Runner, noise_response
from planner.sensitivity.score import Score, SensitivityConfig, calibration_batch
from planner.units import find_units

from .conftest import torch_threads


@pytest.fixture(scope="module")
def micro():
    """hidden 32, 2 layers, 2 heads / 1 KV head, vocab 96: units of 512..2048 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    with torch_threads(1):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, find_units(model), ids


def exact_block_trace(model, params, ids, which: list[int]) -> dict[int, float]:
    """tr(H_uu) of the mean-KL Hessian, one second-derivative row per weight (exact, slow)."""
    with torch.no_grad():
        p_ref = torch.softmax(model(ids).logits.float(), -1)
    grads = torch.autograd.grad(mean_kl_to(model(ids).logits, p_ref), params, create_graph=True)
    out = {}
    for u in which:
        g = grads[u].reshape(-1)
        out[u] = sum(float(torch.autograd.grad(g[i], params[u], retain_graph=True)[0].reshape(-1)[i])
                     for i in range(g.numel()))
    return out


def test_hutchinson_matches_the_exact_hessian_trace(micro, one_thread):
    model, units, ids = micro
    params = unit_parameters(model, [u.name for u in units])
    which = [1, 2, 3, 7 + 2]      # block 0 k_proj (512, a tiny trace), v_proj (512), o_proj (1024); block 1 v_proj
    exact = exact_block_trace(model, params, ids, which)
    tol = 0.05
    est = hutchinson_trace(model, params, ids, tol=tol, min_probes=16, max_probes=3000, seed=0)
    assert est.probes < 3000                                   # stopped on its tolerance
    assert np.all(tolerance_met(est.trace, est.stderr, tol))
    big = np.abs(est.trace).max()
    for u in which:
        assert exact[u] > 0                                     # the KL Hessian is PSD at the base model
        bar = tol * max(exact[u], FLOOR * big)                  # the tolerance, in the exact trace's terms
        assert abs(est.trace[u] - exact[u]) <= 3 * bar, (units[u].name, est.trace[u], exact[u], est.stderr[u])
        assert abs(est.trace[u] - exact[u]) <= 4 * est.stderr[u], (units[u].name, est.trace[u], exact[u])
    assert exact[1] < FLOOR * big < exact[2]                    # both kinds of bar are exercised


def test_fisher_sign_trick_matches_per_token_gradients(micro, one_thread):
    model, units, ids = micro
    params = unit_parameters(model, [u.name for u in units])
    logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1), reduction="none")
    exact = np.zeros(len(units))
    for t in range(nll.numel()):
        g = torch.autograd.grad(nll[t], params, retain_graph=True)
        exact += np.array([float(gi.double().pow(2).sum()) for gi in g])
    exact /= nll.numel()
    est = fisher_trace(model, params, ids, tol=0.05, min_probes=16, max_probes=3000, seed=0)
    assert est.probes < 3000 and np.all(tolerance_met(est.trace, est.stderr, 0.05))
    assert np.all(np.abs(est.trace - exact) <= 4 * est.stderr + 1e-12)


def test_noise_coefficients(micro, one_thread):
    model, units, ids = micro
    model.requires_grad_(False)
    run = _Runner(model, "model.layers", ids)
    assert run.sliced                                           # mid-stack forwards reproduce the full one
    before = {u.name: model.get_submodule(u.name).weight.clone() for u in units}
    fit = noise_response(model, units, "model.layers", ids, levels=(0.001, 0.004), seed=0)
    assert np.all(fit.alpha > 0) and np.all(np.isfinite(fit.residual))
    for u in units:
        assert torch.equal(model.get_submodule(u.name).weight, before[u.name])
    again = noise_response(model, units, "model.layers", ids, levels=(0.001, 0.004), seed=0)
    assert np.array_equal(fit.alpha, again.alpha)
    # along one noise direction the KL is quadratic in its size: linear in the relative MSE
    u = units[3]
    W = model.get_submodule(u.name).weight
    direction = torch.randn(W.shape, generator=torch.Generator().manual_seed(5)) * W.pow(2).mean().sqrt()
    kl = []
    for t in (0.01, 0.02):
        W.data = before[u.name] + t * direction
        kl.append(run.kl(u.block))
        W.data = before[u.name]
    assert kl[1] == pytest.approx(4 * kl[0], rel=0.05)


def test_calibration_batch_shapes():
    ids = torch.arange(4 * 8).view(4, 8)
    assert calibration_batch(ids, 5).shape == (1, 5)
    assert calibration_batch(ids, 16).shape == (2, 8)
    assert calibration_batch(ids, 1000).shape == (4, 8)


def test_cache_key_ignores_settings_a_score_does_not_use():
    a = SensitivityConfig(score=Score.PROXY, tokens=256)
    assert a.key() == SensitivityConfig(score=Score.PROXY, tokens=512, tol=0.5).key()
    h = SensitivityConfig(score=Score.HUTCHINSON)
    assert h.key() != SensitivityConfig(score=Score.HUTCHINSON, tol=0.05).key()
    assert h.key() == SensitivityConfig(score=Score.HUTCHINSON, noise=(0.5,)).key()


@pytest.mark.parametrize("score", list(Score))
def test_every_score_gives_a_damage_table_and_is_cached(tiny_sessions, score, monkeypatch):
    import planner.sensitivity.plans as plans

    session = tiny_sessions("fp32")
    problem = session.problem(parse_budget("3.0bits"))
    config = SensitivityConfig(score=score, tokens=64, tol=0.5, min_probes=2, max_probes=6, noise=(0.01,))
    with torch_threads(1):
        sens = plans.session_sensitivity(session, config)
    rows = np.array(sens.rows(problem))
    assert rows.shape == (problem.n_units, 8) and np.all(np.isfinite(rows)) and np.all(rows >= 0)
    for u, ladder in enumerate(problem.levels):              # more bits, less predicted damage
        for method in ("gptq", "rtn"):
            d = [rows[u, ladder.index(f"{method}-b{b}-g48")] for b in (2, 3, 4, 8)]
            assert d[0] > d[1] > d[2] > d[3], (problem.units[u], d)
    if score is not Score.PROXY:
        assert np.all(np.array(sens.value) > 0)

    def boom(*a, **k):
        raise AssertionError("a cached score must not be recomputed")

    monkeypatch.setattr(plans, "compute_sensitivity", boom)
    again = plans.session_sensitivity(session, config)
    assert again.damage == sens.damage and again.rows(problem) == sens.rows(problem)
    assert np.array_equal(again.value, sens.value, equal_nan=True) and again.probes == sens.probes
