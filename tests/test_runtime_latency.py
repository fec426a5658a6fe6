"""The latency table: one row per (shape, kind, batch), JSON round trip, additive prediction; format
and GGUF-native levels get the rows of the module the runtime builds for them (a PackedLinear's
kernel scheme, or a DequantLinear's stored format), and hardware limits work on such a space."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from planner.budget import Budget, Metric
from planner.plan import Plan
from planner.rundir import RunDir
from planner.runtime.latency import DENSE, LatencyTable, latency_costs, measure_table, predict, unit_shape
from planner.runtime.packed import DequantLinear, PackedLinear, runtime_linear
from tests.conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, cache_env, torch_threads
from tests.test_cli import run_cli
from tests.test_export_levels import IQ4NL, NF4, tiny, wide  # noqa: F401  (module fixtures: format / GGUF DBs)


@pytest.fixture(scope="module")
def measured(tiny_sessions):
    session = tiny_sessions("fp32")
    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    table = measure_table(session.loaded.model, problem, session.db, batches=(1, 8), reps=2)
    return session, problem, table


def test_table_has_every_shape_scheme_and_batch(measured):
    session, problem, table = measured
    shapes = {unit_shape(session.db, u) for u in problem.units}
    assert set(table.kinds) == {f"{u}|{lv}" for u, lad in zip(problem.units, problem.levels, strict=True) for lv in lad}
    kinds = set(table.kinds.values()) | {DENSE}
    assert kinds == {f"b{b}-g48-asym" for b in (2, 3, 4, 8)} | {DENSE}   # gptq and rtn of one bitwidth share a row
    assert set(table.rows) == {LatencyTable.key(s, k, b) for s in shapes for k in kinds for b in (1, 8)}
    assert all(r["seconds"] > 0 and r["bytes"] > 0 for r in table.rows.values())
    shape = next(iter(shapes))
    b2, b8 = (table.rows[LatencyTable.key(shape, f"b{b}-g48-asym", 1)]["bytes"] for b in (2, 8))
    assert b2 < b8 < table.rows[LatencyTable.key(shape, DENSE, 1)]["bytes"] * 4   # packed is smaller than fp32
    assert set(table.rest) == {"1", "8"} and all(v >= 0 for v in table.rest.values())


def test_round_trip_and_additive_prediction(measured, tmp_path):
    session, problem, table = measured
    table.save(tmp_path / "latency.json")
    again = LatencyTable.load(tmp_path / "latency.json")
    assert again == table
    cost = latency_costs(again, problem, session.db, batch=1)
    assert cost.shape == (problem.n_units, max(len(lad) for lad in problem.levels)) and np.isfinite(cost).all()
    x = np.zeros(problem.n_units, dtype=int)
    assert math.isclose(predict(again, problem, session.db, x, batch=1), again.rest["1"] + cost[:, 0].sum())


# --- format and GGUF-native levels ----------------------------------------------------------------
def _full_problem(session):
    return session.db.problem(session.units, Budget(1e9, Metric.BITS))


@pytest.fixture(scope="module")
def mixed(tiny):  # noqa: F811
    """The table of a space mixing gptq, rtn, format and GGUF levels on the conftest model's rows."""
    session, _ = tiny
    problem = _full_problem(session)
    with torch_threads(1):
        table = measure_table(session.loaded.model, problem, session.db, batches=(1, 4), reps=2)
    return session, problem, table


def _kinds_by_level(table, problem, unit: int) -> dict[str, str]:
    return {lv: table.kinds[f"{problem.units[unit]}|{lv}"] for lv in problem.levels[unit]}


def test_format_and_gguf_levels_get_the_rows_of_their_runtime_module(mixed):
    session, problem, table = mixed
    assert _kinds_by_level(table, problem, 0) == {
        "gptq-b4-g32": "b4-g32-asym", "gptq-b8-g32": "b8-g32-asym",
        # exact integer grids run on the kernels and share the row of their scheme
        "rtn-b8-g32-sym": "b8-g32-sym", "gguf-q8_0-diag": "b8-g32-sym",
        "int4-g32-sym-diag": "b4-g32-sym", "gguf-q4_0-diag": "b4-g32-sym",
        "gguf-q5_0-diag": "b5-g32-sym", "gguf-q4_k-diag": "b5-g32-sym",       # Q4_K stored as Q5_0 on 64-wide rows
        # the rest is dequantized per forward, one row per stored format
        NF4: "dequant:format nf4-g32", IQ4NL: "dequant:format iq4nl-g32",
        "gguf-q4_1-diag": "dequant:gguf Q4_1", "gguf-iq4_nl-diag": "dequant:gguf IQ4_NL"}
    shapes = {u: unit_shape(session.db, u) for u in problem.units}
    want = {LatencyTable.key(shapes[u], k, b) for u in problem.units for k in
            {*_kinds_by_level(table, problem, problem.units.index(u)).values(), DENSE} for b in (1, 4)}
    assert set(table.rows) == want and all(r["seconds"] > 0 for r in table.rows.values())
    for i, u in enumerate(problem.units[:7]):           # one layer: every shape
        dense = session.loaded.model.get_submodule(u)
        for lv, kind in _kinds_by_level(table, problem, i).items():
            mod = runtime_linear(session.db.load(u, lv), dense.bias, level=lv)
            assert isinstance(mod, DequantLinear if kind.startswith("dequant:") else PackedLinear), (u, lv)
            assert table.rows[LatencyTable.key(shapes[u], kind, 1)]["bytes"] == mod.weight_nbytes, (u, lv)
            assert mod.weight_nbytes < dense.weight.numel() * 4   # no dense fp32 copy kept


def test_predict_over_format_and_gguf_levels(mixed):
    session, problem, table = mixed
    for batch in (1, 4):
        cost = latency_costs(table, problem, session.db, batch)
        assert np.isfinite(cost[~np.isnan(problem.code_bits)]).all()
        x = np.random.default_rng(batch).integers(0, problem.n_levels)
        want = table.rest[str(batch)] + sum(cost[i, v] for i, v in enumerate(x))
        assert math.isclose(predict(table, problem, session.db, x, batch), want)
    again = LatencyTable(**json.loads(json.dumps(dataclasses.asdict(table))))
    assert again.kinds == table.kinds


def test_k_quants_and_iq4_xs_stored_as_themselves(wide):  # noqa: F811
    """256/512-wide rows: Q2_K..Q6_K and IQ4_XS are no integer grid, each its own dequantize row."""
    session, _ = wide
    problem = _full_problem(session)
    with torch_threads(1):
        table = measure_table(session.loaded.model, problem, session.db, batches=(1,), reps=1)
    kinds = set(table.kinds.values())
    assert {f"dequant:gguf {t}" for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")} <= kinds
    assert math.isfinite(predict(table, problem, session.db, np.zeros(problem.n_units, dtype=int), 1))


def test_search_under_hardware_limits_over_format_and_gguf_levels(tiny, tiny_model_dir, tiny_text_file,  # noqa: F811
                                                                   session_cache_dir, tmp_path):
    """--max-latency and --max-memory on a space of format and GGUF levels: the table is measured,
    the memory limit binds (some uniform levels are over it) and every feasible plan keeps both."""
    from planner.runtime.hardware import unplanned_bytes

    session, space = tiny
    problem = _full_problem(session)
    base = unplanned_bytes(session.loaded.model, problem)
    memory = sorted(base + problem.cost(np.minimum(v, problem.n_levels - 1)).nbytes for v in range(problem.n_levels.max()))
    limit = (memory[0] + memory[-1]) / 2
    args = ["--model", tiny_model_dir, "--dataset", tiny_text_file, "--space", space, "--seqlen", TINY_SEQLEN,
            "--calib-tokens", TINY_CALIB_TOKENS, "--eval-tokens", TINY_EVAL_TOKENS, "--threads", "1", "-q"]
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *args, "--method", "uniform", "--max-latency", "10s", "--max-memory",
                                f"{limit:.0f}B", "--uniform-tokens", "128", "--runs-dir", tmp_path, "--name", "hw"])
    assert rc == 0, err
    run = RunDir.open(tmp_path / "hw")
    p = run.load_problem()
    assert {b.metric for b in p.budget.also} == {Metric.LATENCY, Metric.MEMORY}
    rows = run.results()
    assert all(r.extra["latency"] == pytest.approx(p.cost(r.x).latency) for r in rows)
    feasible = [r for r in rows if p.feasible(r.x)]
    assert 0 < len(feasible) < len(rows)                 # uniform baselines over the memory limit are journaled too
    assert all(r.extra["memory"] <= limit * (1 + 1e-9) and r.extra["latency"] <= 10 for r in feasible)
    best = Plan.load(tmp_path / "hw" / "best_plan.json")
    assert p.cost(p.encode(best)).memory <= limit * (1 + 1e-9)
