"""The committed example run dir (schema v1, made with the tiny test model) must keep loading
and rendering as the code evolves: old runs stay readable."""

from __future__ import annotations

import shutil
from pathlib import Path

from planner.plan import Plan
from planner.rundir import RunDir

EXAMPLE = Path(__file__).parent / "data" / "example_run"


def test_example_run_loads():
    run = RunDir.open(EXAMPLE)
    problem = run.load_problem()
    rows = run.results()
    assert rows and all(len(r.x) == problem.n_units for r in rows)
    assert {r.method for r in rows} == {"uniform", "evo"}
    best = Plan.load(EXAMPLE / "best_plan.json")
    x = problem.encode(best)
    assert problem.feasible(x) and problem.cost(x).bits <= 3.0
    assert any(r.label == "best" for r in run.heldout())


def test_example_run_renders(tmp_path):
    from planner.cli import main

    copy = tmp_path / "example_run"
    shutil.copytree(EXAMPLE, copy)
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").stat().st_size > 10_000
