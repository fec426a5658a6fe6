"""Hardware limits (`--max-latency`, `--max-memory`) and the latency objective.

On the toy problem with a latency table written in code (2- and 3-bit kernels slower than 4-bit
ones, as the CPU's unpack path is) every registered searcher keeps every limit; repair finds a
feasible plan where no step down helps; costs survive fusing and problem.json. On the tiny model:
the latency table is measured once and cached next to the levels DB, what the runtime cannot run is
one clear error, bad flags are one line and exit 2, and a search with --max-latency journals only
plans under the limit (and their predicted latency).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.budget import Budget, HardwareSpec, Metric, parse_latency, parse_memory
from planner.errors import BadBudget, PlannerError
from planner.plan import Plan
from planner.rundir import RunDir, problem_from_json, problem_to_json
from planner.search import make_searcher
from planner.search.operators import repair
from tests.conftest import cache_env
from tests.test_cli import assert_no_run_dir, assert_one_error_line, data_args, run_cli  # noqa: F401  (a fixture)
from tests.test_search_contract import (
    BITS,
    FAST,
    METHODS,
    drive,
    evaluator,
    make,
    tied_toy_problem,
    ties_kept,
    toy_problem,
)

NS_PER_WEIGHT = {2.0: 1.4, 3.0: 1.3, 4.0: 0.6, 6.0: 1.0, 8.0: 0.8}    # not monotone along the ladder
BASE_S, BASE_BYTES = 1e-4, 1e5


def hw_problem(limits: tuple[str, ...] = ("latency",), ragged: bool = True, ties: bool = False):
    """The contract tests' toy problem at 3.0 bits with latency and memory attached. The latency limit
    needs about a third of the weights on the fast 4-bit kernel (no uniform plan within 3.0 bits
    meets it); the memory limit (3.25 stored bits per weight) binds below the bits budget."""
    p = tied_toy_problem(Budget(3.0, Metric.BITS)) if ties else toy_problem(Budget(3.0, Metric.BITS), ragged=ragged)
    per_weight = np.vectorize(lambda b: NS_PER_WEIGHT.get(b, np.nan))(p.code_bits / p.numel[:, None])
    p = p.with_hardware(Metric.LATENCY, per_weight * p.numel[:, None] * 1e-9, BASE_S)
    p = p.with_hardware(Metric.MEMORY, p.stored_bits / 8, BASE_BYTES)
    values = {"latency": BASE_S + 1.15e-9 * p.total_numel, "memory": BASE_BYTES + 3.25 * p.total_numel / 8}
    also = tuple(Budget(values[k], Metric(k)) for k in limits)
    return dataclasses.replace(p, budget=Budget(3.0, Metric.BITS, also), _index={})


def _uniform_plans(p):
    return [np.minimum(lv, p.n_levels - 1) for lv in range(len(BITS))]


# --- the problem -------------------------------------------------------------------------------
def test_hardware_costs_limits_and_round_trip():
    p = hw_problem(("latency", "memory"))
    x = np.zeros(p.n_units, dtype=int)
    c = p.cost(x)
    assert c.latency == pytest.approx(BASE_S + 1.4e-9 * p.total_numel)
    assert c.memory == pytest.approx(BASE_BYTES + c.nbytes, abs=1)
    assert c.hardware() == {"latency": c.latency, "memory": c.memory}
    assert not p.feasible(x)                         # uniform 2-bit: within 3.0 bits, too slow
    assert not any(p.feasible(u) for u in _uniform_plans(p))
    assert p.limit(p.budget.also[0]) == pytest.approx(p.budget.also[0].value - BASE_S)
    q = problem_from_json(json.loads(json.dumps(problem_to_json(p))))
    assert q.budget == p.budget and q.cost(x) == c and set(q.hardware) == {Metric.LATENCY, Metric.MEMORY}
    assert math.isnan(toy_problem().cost(x).latency) and toy_problem().cost(x).hardware() == {}
    with pytest.raises(BadBudget, match="no latency costs"):
        toy_problem().unit_cost(Metric.LATENCY)


def test_fused_problem_sums_hardware_costs():
    p = hw_problem(ties=True)
    f = p.fused()
    assert f.n_units == p.n_units - 6 and set(f.hardware) == {Metric.LATENCY, Metric.MEMORY}
    x = np.full(f.n_units, 1)
    plan = f.decode(x)
    assert f.cost(x).latency == pytest.approx(p.cost(p.encode(plan)).latency)
    assert f.cost(x).memory == pytest.approx(p.cost(p.encode(plan)).memory)


def test_check_budget_names_an_unreachable_latency():
    p = hw_problem()
    fastest = p.extent(Metric.LATENCY)[0]
    too_fast = dataclasses.replace(p, budget=Budget(3.0, Metric.BITS, (Budget(fastest * 0.9, Metric.LATENCY),)),
                                   _index={})
    with pytest.raises(BadBudget, match=r"beyond the cheapest plan \(.*ms\)") as e:
        too_fast.check_budget()
    assert "\n" not in str(e.value)


def test_joint_limits_can_be_unreachable_although_each_is_not():
    from planner.runtime.hardware import check_limits

    p = hw_problem()
    check_limits(p)
    # 2.2 bits leaves too few 4-bit weights for the latency limit, though each limit alone is reachable
    tight = dataclasses.replace(p, budget=Budget(2.2, Metric.BITS, p.budget.also), _index={})
    tight.check_budget()
    with pytest.raises(BadBudget, match="no plan meets every limit"):
        check_limits(tight)


@pytest.mark.parametrize(("text", "seconds"), [("5ms", 5e-3), ("5", 5e-3), ("800us", 8e-4), ("0.002s", 2e-3)])
def test_parse_latency(text, seconds):
    b = parse_latency(text)
    assert b.metric is Metric.LATENCY and b.value == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "5bits", "-1", "0ms", "5ms,6ms", "inf"])
def test_parse_latency_rejects(text):
    with pytest.raises(BadBudget):
        parse_latency(text)


def test_parse_memory():
    assert parse_memory("60MB") == Budget(60e6, Metric.MEMORY)
    for bad in ("5ms", "3bits", "lots"):
        with pytest.raises(BadBudget):
            parse_memory(bad)


# --- operators and every searcher ------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.sampled_from([("latency",), ("memory",), ("latency", "memory")]), st.integers(0, 2**32 - 1), st.booleans())
def test_repair_meets_non_monotone_limits(limits, seed, fill):
    p = hw_problem(limits)
    rng = np.random.default_rng(seed)
    y = repair(rng.integers(0, p.n_levels), p, rng, fill=fill)
    assert ((y >= 0) & (y < p.n_levels)).all() and p.feasible(y)


def test_repair_raises_units_when_no_step_down_helps():
    """All 2-bit is too slow and nothing can go lower: the nearest feasible plan raises units to 4 bits."""
    from planner.search.operators import nearest_feasible

    p = hw_problem()
    x = np.zeros(p.n_units, dtype=np.int64)
    y = nearest_feasible(x, p)
    assert p.feasible(y) and (y >= x).all() and (p.levels[0][2] == "b4") and (y == 2).any()
    assert p.feasible(repair(x, p, np.random.default_rng(0), fill=False))
    impossible = dataclasses.replace(p, budget=Budget(2.0, Metric.BITS, p.budget.also), _index={})
    assert (nearest_feasible(x, impossible) == x).all()          # no plan at all: x back, unchanged


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("limits", [("latency",), ("memory",), ("latency", "memory")])
def test_every_searcher_keeps_hardware_limits(name, limits):
    p = hw_problem(limits)
    s = make(name, p)
    asked = [c for b in drive(s, p, evaluator(p)) for c in b]
    for c in asked:
        assert p.feasible(c.x), (name, c.label, p.cost(c.x))
    if name == "uniform" and "latency" in limits:
        assert asked == [] and s.best() is None       # no uniform plan or mix is fast enough here
    else:
        assert asked and s.best() is not None and p.feasible(s.best())


@pytest.mark.parametrize("name", METHODS)
def test_tied_problem_under_a_latency_limit(name):
    p = hw_problem(("latency",), ties=True)
    s = make(name, p)
    asked = [c for b in drive(s, p, evaluator(p)) for c in b]
    assert all(p.feasible(c.x) and ties_kept(p, c.x) for c in asked)
    assert name == "uniform" or (s.best() is not None and ties_kept(p, s.best()))


@pytest.mark.parametrize("name", ["nsga2", "tpe"])
def test_latency_objective(name):
    p = hw_problem(("memory",))
    config = {**FAST[name], "objectives": ["kl", "latency"]}
    s = make_searcher(name, p, config, seed=0)
    asked = [c for b in drive(s, p, evaluator(p)) for c in b]
    assert asked and all(p.feasible(c.x) for c in asked)
    lat = sorted({round(p.cost(c.x).latency, 12) for c in asked})
    assert len(lat) > 3                       # the front spreads over latency
    assert s.hypervolume() > 0
    with pytest.raises(PlannerError, match="objective latency needs"):
        make_searcher(name, toy_problem(), config, seed=0)


# --- the tiny model: measured table, cache, CLI ------------------------------------------------------
def test_table_is_measured_once_and_cached_next_to_the_db(tiny_sessions, one_thread, monkeypatch):
    import planner.runtime.latency as latency
    from planner.runtime.hardware import attach_hardware, table_path

    session = tiny_sessions("fp32")
    problem = session.problem(Budget(3.0, Metric.BITS))
    calls = []
    real = latency.median_seconds
    monkeypatch.setattr(latency, "median_seconds", lambda fn, reps: calls.append(1) or real(fn, 1))
    spec = HardwareSpec(objectives=("latency",), reps=1, batch=2)
    path = table_path(session.db.path, session.loaded.model)
    path.unlink(missing_ok=True)
    a = attach_hardware(session, problem, spec)
    assert path.is_file() and path.parent.parent == session.db.path and calls
    assert len(latency.LatencyTable.load(path).kinds) == sum(map(len, problem.levels))   # kept: no DB reads again
    n = len(calls)
    b = attach_hardware(session, problem, spec)                 # cached: nothing timed again
    assert len(calls) == n
    assert np.array_equal(a.unit_cost(Metric.LATENCY), b.unit_cost(Metric.LATENCY))
    assert np.isfinite(a.unit_cost(Metric.LATENCY)[~np.isnan(a.code_bits)]).all()
    assert a.budget == problem.budget                          # an objective adds costs, not limits


def test_what_the_runtime_cannot_run_is_one_clear_error(tiny_sessions):
    """Format and GGUF levels get rows (tests/test_runtime_latency.py); a level the DB lacks and a
    unit that is no Linear (a block, a fused 3-D expert tensor) do not."""
    from planner.runtime.latency import LatencyTable, NoKernel, latency_costs, measure_table

    session = tiny_sessions("fp32")
    p = session.problem(Budget(3.0, Metric.BITS))
    unknown = dataclasses.replace(p, levels=tuple(("sparsegpt-s50", *lad[1:]) for lad in p.levels), _index={})
    block = dataclasses.replace(p, units=("model.layers.0.mlp", *p.units[1:]), _index={})
    for call, match in ((lambda: measure_table(session.loaded.model, unknown, session.db, reps=1), "has no level"),
                        (lambda: latency_costs(LatencyTable("cpu", "float32", 1), unknown, session.db, 1), "has no level"),
                        (lambda: measure_table(session.loaded.model, block, session.db, reps=1),
                         "model.layers.0.mlp is a LlamaMLP, not a Linear")):
        with pytest.raises(NoKernel, match=match) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(("flags", "match"), [
    (["--budget", "3.0bits", "--max-latency", "fast"], "malformed --max-latency"),
    (["--budget", "3.0bits", "--max-latency", "3bits"], "is not a time"),
    (["--budget", "3.0bits", "--max-memory", "5ms"], "is not a size"),
    (["--budget", "3.0bits", "--max-memory", "0MB"], "malformed --max-memory"),
    (["--budget", "3.0bits", "--latency-batch", "4"], "--latency-batch applies to"),
    (["--budget", "3.0bits", "--max-latency", "5ms", "--latency-batch", "0"], "must be a positive integer"),
    (["--budget", "3.0bits,5ms"], "give it as --max-latency"),
    (["--budget", "3.0bits", "--objectives", "kl,speed", "--method", "nsga2"], "unknown objective"),
    (["--budget", "3.0bits", "--max-latency", "1us", "--method", "uniform"], "beyond the cheapest plan"),
    (["--budget", "3.0bits", "--max-memory", "1kB", "--method", "uniform"], "beyond the cheapest plan"),
])
def test_bad_hardware_flags_are_one_line(flags, match, data_args, tmp_path):  # noqa: F811
    runs = tmp_path / "runs"
    rc, out, err = run_cli(["search", *data_args, *flags, "--runs-dir", runs])
    assert_one_error_line(rc, out, err, match)
    assert_no_run_dir(runs)


@pytest.fixture(scope="module")
def latency_runs(tmp_path_factory, data_args, session_cache_dir):  # noqa: F811
    """A uniform run that measures the table (generous limit), then evo under a limit that binds:
    halfway between the fastest and the slowest measured plan within 3.0 bits (so one plan meets it)."""
    root = tmp_path_factory.mktemp("latency")
    common = [*data_args, "--budget", "3.0bits", "--uniform-tokens", "128", "--runs-dir", root]
    with cache_env(session_cache_dir):
        first = run_cli(["search", *common, "--method", "uniform", "--max-latency", "10s", "--name", "probe"])
        assert first[0] == 0, first[2]
        p = RunDir.open(root / "probe").load_problem()
        within = [r.extra["latency"] for r in RunDir.open(root / "probe").results() if p.feasible(r.x)]
        limit = (min(within) + max(within)) / 2
        evo = run_cli(["search", *common, "--max-latency", f"{limit * 1e3:.6f}ms", "--max-memory", "100MB",
                       "--generations", "3", "--offspring", "4", "--stages", "2@64,1@128", "--name", "evo"])
    return root, limit, first, evo


def test_search_under_a_latency_limit_end_to_end(latency_runs):
    root, limit, first, (rc, out, err) = latency_runs
    assert rc == 0, err
    header = next(line for line in out.splitlines() if line.startswith("plan "))
    assert "ms" in header and "mem MB" in header          # the summary shows both hardware costs
    run = RunDir.open(root / "evo")
    cfg = run.config["hardware"]
    assert cfg["max_latency"] == pytest.approx(limit, rel=1e-5) and cfg["max_memory"] == 100e6 and cfg["batch"] == 1
    p = run.load_problem()
    assert {b.metric for b in p.budget.also} == {Metric.LATENCY, Metric.MEMORY}
    evo = [r for r in run.results() if r.method == "evo"]
    assert evo and all(r.extra["latency"] <= limit * (1 + 1e-9) and r.extra["memory"] <= 100e6 for r in evo)
    assert all(p.feasible(r.x) for r in evo)
    best = json.loads((root / "evo" / "best_plan.json").read_text())
    assert p.cost(p.encode(Plan.from_json(best))).latency <= limit * (1 + 1e-9)
    assert "ms" in best["budget"] and "MB-memory" in best["budget"]
    held = {r.label: r for r in run.heldout()}
    assert held["best"].extra["latency"] <= limit * (1 + 1e-9)


def test_a_latency_limit_alone_needs_no_budget(latency_runs, data_args, session_cache_dir):  # noqa: F811
    root, limit, _, _ = latency_runs
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *data_args, "--max-latency", f"{limit * 1e3:.6f}ms", "--method", "uniform",
                                "--uniform-tokens", "128", "--runs-dir", root, "--name", "alone"])
    assert rc == 0, err
    p = RunDir.open(root / "alone").load_problem()
    assert p.budget.metric is Metric.BITS and p.budget.value == p.cost(p.n_levels - 1).bits   # no size limit
    assert [b.metric for b in p.budget.also] == [Metric.LATENCY]
    best = Plan.load(root / "alone" / "best_plan.json")
    assert p.cost(p.encode(best)).latency <= limit * (1 + 1e-9)


def test_resume_keeps_the_saved_latency_costs(latency_runs, session_cache_dir, tmp_path):
    """A resumed run takes its latency costs from problem.json: with the cached table gone, nothing
    is measured again (a fresh table would differ a little and change the search under it)."""
    import shutil

    root, _, _, _ = latency_runs
    copy = tmp_path / "evo"
    shutil.copytree(root / "evo", copy)
    for table in (session_cache_dir / "levels").glob("*/latency/*.json"):
        table.unlink()
    with cache_env(session_cache_dir):
        rc, _, err = run_cli(["search", "--resume", copy, "--threads", "1", "-q"])
    assert rc == 0, err
    assert not list((session_cache_dir / "levels").glob("*/latency/*.json"))


# --- the dashboard: latency on an axis -------------------------------------------------------------
@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    """A toy run dir of nsga2 on KL and latency under a memory limit (its journal records latency)."""
    from planner.search import run_search

    p = hw_problem(("memory",))
    run = RunDir.create(tmp_path_factory.mktemp("dash") / "lat", {"method": "nsga2", "budget": str(p.budget)})
    run.save_problem(p)
    run_search(make_searcher("nsga2", p, {**FAST["nsga2"], "objectives": ["kl", "latency"]}, 0), p, evaluator(p), run)
    return run


def test_journal_and_dashboard_data_carry_latency(latency_run):
    from planner.report.dashboard import dashboard_data
    from planner.report.tables import load_runs

    p = latency_run.load_problem()
    rows = latency_run.results()
    assert all(r.extra["latency"] == pytest.approx(p.cost(r.x).latency) for r in rows)
    data = dashboard_data(load_runs([latency_run.path]))
    ms = data["plans"]["ms"]
    assert all(v is not None for v in ms) and len(set(ms)) > 3
    assert any(data["plans"]["front_ms"]) and json.dumps(data, allow_nan=False)


def test_latency_axis_in_chromium(latency_run, tmp_path):
    from planner.report.dashboard import write_dashboard
    from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, _open

    if CHROMIUM is None:
        pytest.skip("no chromium found (apt-get install chromium, or set PLANNER_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    out = write_dashboard([latency_run.path], tmp_path / "d.html")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page, errors = _open(browser, out.as_uri())
        page.select_option("#axis", "ms")
        xs = page.evaluate("document.getElementById('scatter').data.filter(t => t.meta === 'plans')"
                           ".flatMap(t => t.x)")
        title = page.evaluate("document.getElementById('scatter')._fullLayout.xaxis.title.text")
        browser.close()
    p = latency_run.load_problem()
    lo, hi = (v * 1e3 for v in p.extent(Metric.LATENCY))
    assert xs and all(lo - 1e-9 <= x <= hi + 1e-9 for x in xs) and "latency" in title
    assert errors == []


def test_nsga2_on_kl_and_latency_end_to_end(data_args, session_cache_dir, tmp_path):  # noqa: F811
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *data_args, "--budget", "3.0bits", "--method", "nsga2", "--objectives",
                                "kl,latency", "--generations", "2", "--pop-size", "6", "--tokens", "128",
                                "--uniform-tokens", "128", "--runs-dir", tmp_path, "--name", "n"])
    assert rc == 0, err
    run = RunDir.open(tmp_path / "n")
    p = run.load_problem()
    assert Metric.LATENCY in p.hardware and p.budget.also == ()       # an objective, not a limit
    rows = [r for r in run.results() if r.method == "nsga2"]
    assert rows and all(r.extra["latency"] == pytest.approx(p.cost(r.x).latency) for r in rows)
    front = sorted(r.extra["latency"] for r in run.heldout() if r.label.startswith("front"))
    assert len(front) >= 2 and front[0] < front[-1]                   # held-out front spread over latency
