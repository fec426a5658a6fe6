"""MoE expert units on tiny random models of every supported class: discovery and counts, routers
kept out, shared experts as dense units, per-expert Hessians from routed tokens, the levels DB,
and the evaluator's slice application (fused 3-D tensors) and dense path (per-expert modules)."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from planner.budget import parse_budget
from planner.moe.experts import expert_slice, moe_blocks, unit_weight
from planner.moe.levels import expert_hessians
from planner.moe.routing import capture_routing, routed
from planner.units import find_units

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN
from .test_moe_models import CLASSES, build, config, legacy_mixtral, save

pytestmark = pytest.mark.usefixtures("one_thread")

MOE_SPACE = """\
name: tiny-moe
units: linear
levels:
  - method: gptq
    bits: [2, 3, 4, 8]
    group_size: 16
  - method: rtn
    bits: [2, 4]
    group_size: 16
gptq:
  block_size: 16
"""


def expected_counts(kind: str) -> Counter:
    """Units per kind from the config alone: what the table must find."""
    c = config(kind)
    L, E = c.num_hidden_layers, 4
    dense_layers = getattr(c, "first_k_dense_replace", 0)
    moe = L - dense_layers
    out = Counter({"experts.gate_up_proj": E * moe, "experts.down_proj": E * moe})
    if kind.startswith("deepseek"):
        attn = ("q_a_proj", "q_b_proj") if c.q_lora_rank else ("q_proj",)
        out.update({k: L for k in (*attn, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")})
        out.update({k: dense_layers for k in ("gate_proj", "up_proj", "down_proj")})
        out.update({f"shared.{k}": moe for k in ("gate_proj", "up_proj", "down_proj")})
    else:
        out.update({k: L for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
    if kind == "qwen2_moe":
        out.update({f"shared.{k}": moe for k in ("gate_proj", "up_proj", "down_proj")})
    return out


@pytest.mark.parametrize("kind", CLASSES)
def test_units_per_class(kind):
    model = build(kind)
    units = find_units(model)
    assert Counter(u.kind for u in units) == expected_counts(kind)
    names = {u.name for u in units}
    assert not any(n.endswith((".gate", "shared_expert_gate")) for n in names)     # routers stay in full precision
    for u in units:
        W = unit_weight(model, u.name)
        assert tuple(W.shape) == u.shape and W.numel() == u.numel
        assert (u.expert >= 0) == u.kind.startswith("experts.")
    blocks = moe_blocks(model, units)
    assert [mb.n_experts for mb in blocks] == [4] * len(blocks) and all(mb.fused and mb.top_k == 2 for mb in blocks)
    assert all(len(per) == 2 for mb in blocks for per in mb.units)                # gate_up, down per expert
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("_proj", "_proj.weight", "_mqa.weight")))
    assert sum(u.numel for u in units) == total          # every projection planned once, nothing else


def test_legacy_per_expert_modules():
    model = legacy_mixtral()
    units = find_units(model)
    assert Counter(u.kind for u in units)["experts.w1"] == 8
    assert expert_slice(model, units[-1].name) is None                          # real modules: the dense path
    fused = build("mixtral")
    x = torch.randint(0, 384, (2, 16))
    torch.testing.assert_close(model(x).logits, fused(x).logits)


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_routing_and_expert_hessians_match_the_router(kind):
    """Per-expert H = 2/n X^T X over exactly the tokens the router sends to the expert."""
    model = build(kind)
    model.set_experts_implementation("eager")
    units = find_units(model)
    blocks = moe_blocks(model, units)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    seen = []
    capture_routing(model, blocks, ids, lambda mb, X, idx, w: seen.append((mb.block, X.clone(), idx.clone(), w.clone())))
    H = expert_hessians(model, blocks, ids)
    for block, X, idx, w in seen:
        mb = next(b for b in blocks if b.block == block)
        gate = model.get_submodule(mb.path).gate
        _, w_ref, idx_ref = gate(X)
        assert torch.equal(idx.sort(-1).values, idx_ref.sort(-1).values)
        for j in range(4):
            tok, _ = routed(idx, w, j)
            if tok.numel():
                Xe = X[tok]
                H_ref = 2 / len(tok) * Xe.T @ Xe
                torch.testing.assert_close(H[mb.units[j][0].name], H_ref, rtol=1e-4, atol=1e-5)
    assert sum(len(idx) for _, _, idx, _ in seen) == 2 * 24 * len(blocks)


def test_legacy_routing_matches_fused():
    fused, legacy = build("mixtral"), legacy_mixtral()
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    out = {}
    for name, m in (("fused", fused), ("legacy", legacy)):
        rows = []
        capture_routing(m, moe_blocks(m, find_units(m)), ids, lambda mb, X, idx, w, rows=rows: rows.append((idx, w)))
        out[name] = rows
    for (i1, w1), (i2, w2) in zip(out["fused"], out["legacy"], strict=True):
        assert torch.equal(i1, i2)
        torch.testing.assert_close(w1, w2)


# --- levels DB and the evaluator ---------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_sessions(tmp_path_factory, tiny_model_dir, tiny_text_file, session_cache_dir):
    """kind -> prepared fp32 Session of a tiny MoE (mixtral fused,
    deepseek_v3 with a shared expert and a dense first layer, legacy per-expert modules)."""
    from planner.pipeline import ModelData, prepare
    from planner.space import load_space

    from .conftest import cache_env

    root = tmp_path_factory.mktemp("moe")
    space_file = root / "space.yaml"
    space_file.write_text(MOE_SPACE)
    out = {}
    with cache_env(session_cache_dir):
        for kind in ("mixtral", "deepseek_v3", "legacy"):
            model = legacy_mixtral() if kind == "legacy" else None
            folder = save("mixtral" if kind == "legacy" else kind, root / kind, tiny_model_dir, model)
            md = ModelData(model=str(folder), dataset=str(tiny_text_file), seqlen=TINY_SEQLEN,
                           calib_tokens=TINY_CALIB_TOKENS, eval_tokens=TINY_EVAL_TOKENS, dtype="fp32")
            if kind == "legacy":   # a folder cannot hold the legacy class: swap it in after loading
                out[kind] = _legacy_session(md, load_space(str(space_file)))
            else:
                out[kind] = prepare(md, load_space(str(space_file)), quiet=True)
    return out


def _legacy_session(md, space):
    import planner.pipeline as pl

    real = pl.load_model

    def load(*a, **kw):
        loaded = real(*a, **kw)
        for layer in loaded.model.model.layers:
            from .test_moe_models import LegacyExperts

            layer.mlp.experts = LegacyExperts(layer.mlp.experts)
        return loaded

    pl.load_model = load
    try:
        return pl.prepare(md, space, quiet=True)
    finally:
        pl.load_model = real


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3", "legacy"])
def test_levels_db_holds_every_unit(moe_sessions, kind):
    s = moe_sessions[kind]
    assert sorted(s.db.units) == sorted(u.name for u in s.units)
    e = next(u for u in s.units if u.expert >= 0 and u.kind.endswith(("down_proj", "w2")))
    W = unit_weight(s.loaded.model, e.name).float()
    errs = {lv.id: float((s.db.weight(e.name, lv.id, torch.float32) - W).pow(2).mean().detach()) for lv in s.db.levels(e.name)}
    assert errs["gptq-b8-g16"] < errs["gptq-b4-g16"] < errs["gptq-b2-g16"]
    assert errs["gptq-b2-g16"] != errs["rtn-b2-g16"]        # GPTQ saw the expert's own routed tokens


def _manual_logits(s, plan, ids):
    """Reference: a deep copy of the model with every planned weight written in by hand."""
    model = copy.deepcopy(s.loaded.model).float()
    for u, level in plan.as_dict().items():
        unit_weight(model, u).data.copy_(s.db.weight(u, level, torch.float32))
    return model(ids).logits


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3", "legacy"])
def test_evaluator_applies_expert_levels(moe_sessions, kind):
    s = moe_sessions[kind]
    problem = s.problem(parse_budget("3.0bits"))
    ev = s.evaluator(problem)
    rng = np.random.default_rng(0)
    ids = s.windows.ids[s.windows.pool[:2]]
    base = s.loaded.model(ids).logits.clone()
    plans = [problem.decode(rng.integers(0, problem.n_levels)) for _ in range(3)]
    for plan in plans:           # applied one after another: only changed slices are rewritten
        ev.apply(plan)
        torch.testing.assert_close(s.loaded.model(ids).logits, _manual_logits(s, plan, ids), rtol=1e-5, atol=1e-5)
    ev.apply(None)
    assert torch.equal(s.loaded.model(ids).logits, base)
    low = problem.decode(np.zeros(problem.n_units, dtype=int))
    experts_only = {u: (lv if any(x.name == u and x.expert >= 0 for x in s.units) else None)
                    for u, lv in low.as_dict().items()}
    from planner.plan import Plan

    ev.apply(Plan.of({u: lv for u, lv in experts_only.items() if lv}))
    assert not torch.allclose(s.loaded.model(ids).logits, base)                # the experts really changed
    ev.apply(None)


def test_prefix_cache_matches_full_forward_with_expert_changes(moe_sessions):
    s = moe_sessions["deepseek_v3"]
    problem = s.problem(parse_budget("3.0bits"))
    ev = s.evaluator(problem)
    rng = np.random.default_rng(1)
    parent = rng.integers(0, problem.n_levels)
    experts = [i for i, u in enumerate(problem.units) if ".experts." in u]
    xs = [tuple(parent)]
    for i in experts[:3]:
        x = parent.copy()
        x[i] = (x[i] + 1) % problem.n_levels[i]
        xs.append(tuple(x))
    w = s.windows.draw(128, 3)
    cached = ev.score_many(xs, w)
    full = [ev.score(problem.decode(x), w) for x in xs]
    for a, b in zip(cached, full, strict=True):
        assert a.kl == pytest.approx(b.kl, rel=1e-5, abs=1e-7) and a.nll == pytest.approx(b.nll, rel=1e-6)
    assert len({round(c.kl, 9) for c in cached}) > 1


def test_bf16_evaluation_runs(moe_sessions):
    s = moe_sessions["mixtral"]
    md = dataclasses.replace(s.spec, dtype="bf16")
    from planner.evaluate.evaluator import InProcessEvaluator

    model = copy.deepcopy(s.loaded.model)
    problem = s.problem(parse_budget("3.0bits"))
    ev = InProcessEvaluator(model, s.db, problem, s.windows, dtype=torch.bfloat16)
    sc = ev.score(problem.decode(np.ones(problem.n_units, dtype=int)), s.windows.draw(128, 0))
    assert np.isfinite(sc.kl) and sc.kl > 0 and md.dtype == "bf16"
