"""Runs as tables: merged runs deduplicate identical plans, KL at a plan's highest fidelity, the three
tables in every format, and `planner report RUN1 RUN2 --format ...`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from planner.budget import Budget, Metric
from planner.cli import main
from planner.errors import PlannerError
from planner.report.tables import allocation, load_runs, methods, top_plans, write_tables
from planner.rundir import Row, RunDir
from planner.search import make_searcher, run_search
from tests.test_search_contract import evaluator, toy_problem

SMALL = {"nsga2": {"generations": 4, "pop_size": 10}, "evo": {"generations": 3, "offspring": 4,
                                                               "stages": [[2, 256], [1, 512]]}}


def make_run(path: Path, method: str = "nsga2", seed: int = 0, budget: Budget | None = None, ragged: bool = False,
             fail_every: int = 0) -> RunDir:
    """A toy run dir the way `planner search` lays it out: uniform baselines, then `method`."""
    p = toy_problem(budget, ragged=ragged)
    run = RunDir.create(path, {"name": path.name, "method": method, "budget": str(p.budget), "seed": seed})
    run.save_problem(p)
    ev = evaluator(p, fail_every=fail_every)
    run_search(make_searcher("uniform", p, {"include_over_budget": True}, seed), p, ev, run,
               checkpoint="checkpoint.uniform.json")
    run_search(make_searcher(method, p, SMALL.get(method, {}), seed), p, ev, run)
    return run


def test_merged_runs_deduplicate_identical_plans(tmp_path):
    a, same = make_run(tmp_path / "a"), make_run(tmp_path / "same")        # same seed: the same plans
    other = make_run(tmp_path / "evo", method="evo", seed=3, budget=Budget(2.5, Metric.BITS))
    one, merged = load_runs([a.path]), load_runs([a.path, same.path, other.path])
    ids = {r.plan_id for run in (a, same, other) for r in run.results()}
    assert len(merged.plans) == len(ids) < len(a.results()) * 2 + len(other.results())
    assert merged.plans.index.is_unique and len(merged.rows) == 2 * len(a.results()) + len(other.results())
    assert set(one.plans.index) <= set(merged.plans.index)
    assert (merged.plans.loc[one.plans.index, "evaluations"] >= 2 * one.plans.evaluations).all()
    assert merged.budget == Budget(3.0, Metric.BITS)                      # the largest of the runs' budgets
    shared = set(one.plans.index) & {r.plan_id for r in other.results()}   # uniform plans: found by both
    assert shared and all("uniform" in merged.plans.methods[i] for i in shared)


def test_a_plan_takes_its_kl_at_its_highest_fidelity(tmp_path):
    p = toy_problem()
    run = RunDir.create(tmp_path / "r", {"method": "evo"})
    run.save_problem(p)
    x = np.ones(p.n_units, dtype=int)
    c = p.cost(x)
    for tokens, kl, err in ((512, 9.0, None), (2048, 2.0, None), (2048, 4.0, None), (4096, float("inf"), "OOM")):
        run.append_result(Row(method="evo", generation=0, stage=0, tokens=tokens, seed=0, kl=kl, ppl=1.0, bits=c.bits,
                              bpw=c.bpw, bytes=c.nbytes, plan_id=p.decode(x).id, x=x.tolist(), error=err))
    plans = load_runs([run.path]).plans
    assert len(plans) == 1 and plans.kl.iloc[0] == 3.0 and plans.tokens.iloc[0] == 2048
    assert plans.evaluations.iloc[0] == 3 and bool(plans.front_bits.iloc[0])


def test_a_run_without_results_still_reports(tmp_path):
    run = RunDir.create(tmp_path / "new", {"method": "nsga2"})
    run.save_problem(toy_problem())
    runs = load_runs([run.path])
    assert runs.plans.empty and runs.best_id() is None and top_plans(runs).empty
    assert len(write_tables(runs, tmp_path / "t", "csv")) == 3


def test_runs_of_other_spaces_do_not_merge(tmp_path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", ragged=True)
    with pytest.raises(PlannerError, match="only runs of one model and search space merge"):
        load_runs([a.path, b.path])


def test_tables(tmp_path):
    runs = load_runs([make_run(tmp_path / "a").path, make_run(tmp_path / "e", method="evo").path])
    top = top_plans(runs, n=5)
    assert len(top) == 5 and list(top.kl) == sorted(top.kl) and (top.bits <= 3.0 + 1e-9).all()
    assert top.plan_id.iloc[0] == runs.best_id()
    alloc = allocation(runs)
    assert len(alloc) == runs.problem.n_units and {c.split()[0] for c in alloc.columns[4:]} == {"uniform", "nsga2", "evo"}
    m = methods(runs).set_index("method")
    assert set(m.index) == {"uniform", "nsga2", "evo"} and (m.hypervolume > 0).all()
    assert m.evaluations.sum() == len(runs.rows) and m.front_plans.sum() == runs.plans.front_bits.sum()
    for fmt, ext in (("csv", "csv"), ("parquet", "parquet"), ("markdown", "md")):
        files = write_tables(runs, tmp_path / fmt, fmt)
        assert [f.name for f in files] == [f"{n}.{ext}" for n in ("top_plans", "allocation", "methods")]
    assert pd.read_parquet(tmp_path / "parquet" / "methods.parquet").equals(methods(runs))
    assert "| method" in (tmp_path / "markdown" / "methods.md").read_text()


def test_cli_report_tables_and_merged_dashboard(tmp_path, capsys):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", method="evo", seed=1)
    assert main(["report", str(a.path), str(b.path), "--format", "csv", "--out", str(tmp_path / "t")]) == 0
    assert pd.read_csv(tmp_path / "t" / "methods.csv").method.tolist() == ["uniform", "nsga2", "evo"]
    assert main(["report", str(a.path), str(b.path), "--out", str(tmp_path / "m.html")]) == 0
    page = (tmp_path / "m.html").read_text()
    data = json.loads(page.split('id="planner-data">', 1)[1].split("</script>", 1)[0])
    assert len(data["plans"]["id"]) == len(load_runs([a.path, b.path]).plans)
    assert main(["report", str(a.path), "--format", "markdown"]) == 0 and "## top_plans" in capsys.readouterr().out
