"""Block-output damages (planner/moe/damage.py), the currency that moe-lp now weighs experts and
dense units in: each equals the block-output error the model's own forward shows with that unit
alone at the level; it agrees with the older linear-output currency where both measure the same
thing (a dense down_proj) and not where a gate scales the output (Qwen's shared expert); and on
tiny models of three classes it predicts whole plans' KL better and its plans measure better."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from planner.budget import parse_budget
from planner.errors import PlannerError
from planner.moe.experts import unit_weight
from planner.moe.stats import compute_stats, lp_data
from planner.search import make_config
from planner.search.moe_lp import MoeLpConfig, expert_costs, objective, solve

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, cache_env
from .test_moe_models import save
from .test_moe_units import MOE_SPACE

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("qwen2_moe", "mixtral", "deepseek_v3")
LOW = "gptq-b2-g16"


@pytest.fixture(scope="module")
def sessions(tmp_path_factory, tiny_model_dir, tiny_text_file, session_cache_dir):
    """kind -> (prepared fp32 session, its statistics on an fp32 copy of the model)."""
    from planner.pipeline import ModelData, prepare
    from planner.space import load_space

    root = tmp_path_factory.mktemp("moe-damage")
    (root / "space.yaml").write_text(MOE_SPACE)
    out = {}
    with cache_env(session_cache_dir):
        for kind in KINDS:
            md = ModelData(model=str(save(kind, root / kind, tiny_model_dir)), dataset=str(tiny_text_file),
                           seqlen=TINY_SEQLEN, calib_tokens=TINY_CALIB_TOKENS, eval_tokens=TINY_EVAL_TOKENS,
                           dtype="fp32")
            s = prepare(md, load_space(str(root / "space.yaml")), quiet=True)
            calib = s.windows.ids[s.windows.calib]
            model = copy.deepcopy(s.loaded.model).float()
            out[kind] = (s, model, compute_stats(model, s.units, s.db, calib, max_tokens=1024))
    return out


def _block_error(model, block: int, ids: torch.Tensor, units: dict[str, torch.Tensor]) -> float:
    """The model's own forward: squared error of block `block`'s output per token with `units` swapped in."""
    layer = model.model.layers[block]
    got = []
    handle = layer.register_forward_hook(lambda _m, _a, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
            saved = {n: unit_weight(model, n).clone() for n in units}
            for n, W in units.items():
                unit_weight(model, n).copy_(W)
            model(ids, use_cache=False)
            for n, W in saved.items():
                unit_weight(model, n).copy_(W)
    finally:
        handle.remove()
    return float((got[1].double() - got[0].double()).pow(2).sum()) / ids.numel()


@pytest.mark.parametrize("kind", ["qwen2_moe", "deepseek_v3"])
def test_damages_are_the_block_output_errors_of_the_models_forward(sessions, kind):
    s, model, st = sessions[kind]
    ids = s.windows.ids[s.windows.calib][:st.damage_tokens // TINY_SEQLEN]
    assert ids.numel() == st.damage_tokens
    dense = [u for u in s.units if u.expert < 0 and u.block == 1]
    for u in (dense[0], dense[-1]):           # attention (the MoE reacts too), a shared-expert linear
        want = _block_error(model, 1, ids, {u.name: s.db.weight(u.name, LOW, torch.float32)})
        assert st.block[u.name][LOW] == pytest.approx(want, rel=1e-4)
    e = max((e for e in st.experts if e.block == 1), key=lambda e: e.tokens)
    want = _block_error(model, 1, ids, {n: s.db.weight(n, LOW, torch.float32) for n in e.units})
    assert e.damage[LOW] == pytest.approx(want, rel=1e-4)     # routing weights (and DeepSeek's scaling) included


def test_currencies_agree_on_a_dense_down_proj_and_not_on_a_gated_shared_expert(sessions):
    _, _, ds = sessions["deepseek_v3"]
    u = "model.layers.0.mlp.down_proj"                        # DeepSeek's dense first layer: its output is the block's
    assert ds.block[u][LOW] == pytest.approx(ds.dense[u][LOW], rel=1e-4)
    _, _, qw = sessions["qwen2_moe"]
    u = "model.layers.1.mlp.shared_expert.down_proj"          # scaled by sigmoid(shared_expert_gate x) < 1
    assert qw.block[u][LOW] < 0.5 * qw.dense[u][LOW]


def _tied(x, experts):
    x = x.copy()
    for e in experts:
        x[list(e)] = x[e[0]]
    return x


@pytest.mark.parametrize("kind", KINDS)
def test_block_currency_predicts_plans_and_its_plans_measure_better(sessions, kind):
    s, _, st = sessions[kind]
    held = s.windows.heldout
    problem = s.problem(parse_budget("3.0bits"))
    ev = s.evaluator(problem)
    configs = {c: make_config("moe-lp", {**lp_data(st, problem, currency=c), "cost": "measured" if c == "block" else "full"})
               for c in ("block", "linear")}
    rng = np.random.default_rng(0)
    xs = [_tied(rng.integers(0, problem.n_levels), configs["block"].experts) for _ in range(16)]
    kl = [ev.score(problem.decode(x), held).kl for x in xs]
    rho = {c: spearmanr([objective(problem, cfg, x) for x in xs], kl)[0] for c, cfg in configs.items()}
    assert rho["block"] > max(0.85, rho["linear"]), rho
    low = s.problem(parse_budget("2.5bits"))
    ev = s.evaluator(low)
    measured = {c: ev.score(low.decode(solve(low, make_config("moe-lp", {**lp_data(st, low, currency=c), "cost": "full"}))),
                            held).kl for c in ("block", "linear")}
    assert measured["block"] < measured["linear"], measured


def test_measured_cost_and_expert_damage_in_the_program():
    base = dict(experts=((0,), (1,)), layers=(0, 0), frequency=(1.5, 0.5), weight=(0.5, 0.5), levels=("a", "b"),
                error=((4.0, 1.0), (4.0, 1.0)))
    physical = ((3.0, 0.5), (0.2, 0.1))
    measured = expert_costs(MoeLpConfig(**base, expert_damage=physical, cost="measured"))
    assert np.array_equal(measured, np.array(physical))
    full = expert_costs(MoeLpConfig(**base, expert_damage=physical))            # rescaled to the damage's layer total
    assert full[:, 0].sum() == pytest.approx(3.2) and full[0, 0] / full[1, 0] == pytest.approx(3.0)
    with pytest.raises(PlannerError, match="needs the experts' measured damage"):
        MoeLpConfig(**base, cost="measured")
    with pytest.raises(PlannerError, match="one row per expert"):
        MoeLpConfig(**base, expert_damage=physical[:1])
