"""Dominated-level pruning (planner/levels/prune.py) on the tiny model's rich level set (format
and GGUF levels of tests/test_formats_pipeline.py): pruned ladders are monotone, the cheapest and
the least-error level of every unit survive, tied units share one ladder, plans decode to the
levels DB's ids, the proxy error table is the float64 trace, and a CLI search runs pruned."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from planner.budget import parse_budget
from planner.errors import BadSearchSpace
from planner.levels.prune import front, prune
from planner.rundir import RunDir
from planner.sensitivity import Score, SensitivityConfig, session_sensitivity
from planner.space import PruneLevels, parse_space

from . import test_formats_pipeline as formats
from .conftest import cache_env
from .test_cli import assert_one_error_line, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
args, session = formats.args, formats.session     # fixtures: the tiny rich level set's CLI args and session


@pytest.fixture(scope="module")
def proxy(session, session_cache_dir):
    with cache_env(session_cache_dir):
        return session_sensitivity(session, SensitivityConfig(score=Score.PROXY))


def _ladder(problem, errors, u):
    n = problem.n_levels[u]
    return problem.stored_bits[u, :n], np.asarray(errors[u][:n])


def test_front_and_hull_on_numbers():
    cost = np.array([1, 2, 3, 4, 5, 5, 6.0])
    err = np.array([10, 12, 5, 4, 1, 1, 2.0])
    assert front(cost, err) == [0, 2, 3, 4]              # 2 > 10 at more cost; a twin; more cost, more error
    assert front(cost, err, hull=True) == [0, 2, 4]      # (4, 4) lies above the chord (3, 5) - (5, 1)
    two = np.array([[1, 2, 3.0], [5, 1, 1.0]])          # a second limit can keep a level the first would drop
    assert front(two, np.array([1.0, 1.0, 0.5])) == [0, 1, 2]
    assert front(two[:1], np.array([1.0, 1.0, 0.5])) == [0, 2]


@pytest.mark.parametrize("mode", [PruneLevels.DOMINATED, PruneLevels.HULL])
def test_pruned_ladders_are_monotone_and_keep_both_ends(session, proxy, mode):
    full = session.problem(parse_budget("4.0bpw"))
    errors = proxy.rows(full)
    pruned = prune(full, errors, mode)
    kept_errors = proxy.rows(pruned)
    assert pruned.n_levels.sum() < full.n_levels.sum()                 # the mixed families do dominate each other
    for u in range(full.n_units):
        cost, err = _ladder(pruned, kept_errors, u)
        assert (np.diff(cost) > 0).all() and (np.diff(err) < 0).all(), (full.units[u], pruned.levels[u])
        fcost, ferr = _ladder(full, errors, u)
        assert cost[0] == fcost.min()
        assert err[-1] == ferr.min()
        assert set(pruned.levels[u]) <= set(full.levels[u])
        for j, lv in enumerate(full.levels[u]):       # every level dropped is beaten by one kept
            if lv not in pruned.levels[u] and mode is PruneLevels.DOMINATED:
                assert ((cost <= fcost[j]) & (err <= ferr[j])).any(), lv
        if mode is PruneLevels.HULL:
            slopes = np.diff(err) / np.diff(cost)
            assert (np.diff(slopes) >= -1e-9 * np.abs(slopes[:-1])).all()    # each rung buys less per bit
    hull = prune(full, errors, PruneLevels.HULL)
    assert all(set(h) <= set(d) for h, d in zip(hull.levels, prune(full, errors, PruneLevels.DOMINATED).levels,
                                                  strict=True))
    assert prune(full, errors, PruneLevels.NONE) is full


def test_pruned_plans_decode_to_the_db_level_ids(session, proxy):
    full = session.problem(parse_budget("4.0bpw"))
    pruned = prune(full, proxy.rows(full), PruneLevels.DOMINATED)
    assert pruned.units == full.units and pruned.kept is not None
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, pruned.n_levels)
        plan = pruned.decode(x)
        assert full.cost(full.encode(plan)) == pruned.cost(x)        # same plan, same costs in either problem
        assert all(lv in full.levels[full.unit_index(u)] for u, lv in plan.as_dict().items())


def test_tied_units_share_one_ladder(session, proxy):
    full = session.problem(parse_budget("4.0bpw"))
    tied = dataclasses.replace(full, ties=tuple(u.group for u in session.units), _index={})
    pruned = prune(tied, proxy.rows(tied), PruneLevels.DOMINATED)
    assert pruned.ties == tied.ties
    for group in tied.tie_groups():
        assert len({pruned.levels[i] for i in group}) == 1, [full.units[i] for i in group]
    fused = tied.fused()
    pruned_fused = prune(fused, proxy.rows(fused), PruneLevels.DOMINATED)     # errors summed over members
    assert pruned_fused.members == fused.members
    assert pruned_fused.levels == pruned.fused().levels          # pruning before or after fusing agrees
    plan = pruned_fused.decode(pruned_fused.n_levels - 1)
    assert set(plan.as_dict()) == set(full.units)


def test_error_table_is_the_float64_trace(session, proxy, one_thread):
    unit = next(u for u in session.units if u.kind == "down_proj" and u.block == 1)
    model = session.loaded.model
    assert next(model.parameters()).dtype is torch.float32
    xs = []
    handle = model.get_submodule(unit.name).register_forward_pre_hook(
        lambda _m, inputs: xs.append(inputs[0].reshape(-1, inputs[0].shape[-1]).double()))
    try:
        with torch.no_grad():
            model(session.windows.ids[session.windows.calib])
    finally:
        handle.remove()
    X = torch.cat(xs)
    H = 2.0 / len(X) * X.T @ X
    W = model.get_submodule(unit.name).weight.detach().double()
    for lv in session.db.levels(unit.name):
        D = W - session.db.load(unit.name, lv.id).dequantize(torch.float32).double()
        direct = float(torch.trace(D @ H @ D.T))
        assert proxy.damage[unit.name][lv.id] == pytest.approx(direct, rel=1e-4), lv.id
    cached = (session.db.path / "sensitivity").glob("proxy-*.json")
    assert json.loads(next(cached).read_text())["damage"][unit.name] == proxy.damage[unit.name]


def test_space_option_parses():
    levels = [{"method": "gptq", "bits": [2, 4], "group_size": 32}]
    assert parse_space({"levels": levels}).prune_levels is PruneLevels.NONE
    space = parse_space({"levels": levels, "prune_levels": "hull"})
    assert space.prune_levels is PruneLevels.HULL
    assert space.to_json() == parse_space({"levels": levels}).to_json()    # same levels DB key
    with pytest.raises(BadSearchSpace, match="prune_levels must be one of none, dominated, hull"):
        parse_space({"levels": levels, "prune_levels": "pareto"})


def test_search_with_pruned_ladders(args, tmp_path, session_cache_dir, session, proxy):
    cli = [*args, "--runs-dir", tmp_path]
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *cli, "--budget", "4.0bpw", "--prune-levels", "dominated",
                                "--generations", "2", "--offspring", "3", "--stages", "2@64,1@128",
                                "--uniform-tokens", "128", "--name", "pruned"])
        assert rc == 0, err
        assert_one_error_line(*run_cli(["search", *cli, "--budget", "4.0bpw", "--prune-levels", "all"]),
                              match="--prune-levels")
        rc, out, err = run_cli(["search", *cli, "--method", "hessian", "--max-kl", "0.01", "--prune-levels", "hull",
                                "--uniform-tokens", "128", "--name", "target"])   # no budget: the top plan's cost
        assert rc == 0, err
    run = RunDir.open(tmp_path / "pruned")
    assert run.config["prune_levels"] == "dominated"
    saved, full = run.load_problem(), session.problem(parse_budget("4.0bpw"))
    assert saved.levels == prune(full, proxy.rows(full), PruneLevels.DOMINATED).levels
    best = json.loads((tmp_path / "pruned" / "best_plan.json").read_text())
    assert best["bpw"] <= 4.0 + 1e-9
    assert all(r.bpw <= 4.0 + 1e-9 for r in run.results() if r.method == "evo")
    full.encode(saved.decode(run.results()[-1].x))         # plans name the DB's level ids
