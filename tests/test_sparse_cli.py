"""Pruning from the CLI on the tiny model: a joint search under bits and sparsity limits at once,
a sparsity budget, a depth search; every journaled plan of the search respects every limit and
the report carries the sparsity per layer."""

from __future__ import annotations

import json

import pytest

from planner.plan import Plan
from planner.rundir import RunDir

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN
from .test_cli import assert_one_error_line, run_cli

SEARCH = ["--generations", "2", "--offspring", "3", "--stages", "2@64,1@128", "--uniform-tokens", "128"]
SPACES = {
    "joint": "levels:\n  - method: joint\n    bits: [2, 4]\n    sparsity: [0.0, 0.5, 0.7]\n    group_size: 32\n"
             "gptq:\n  block_size: 32\n",
    "sparse": "levels:\n  - method: sparsegpt\n    sparsity: [0.0, 0.3, 0.5, 0.7]\n    nm: ['2:4']\n"
              "gptq:\n  block_size: 32\n",
    "depth": "units: subblock\nlevels:\n  - method: drop\n",
}


@pytest.fixture(scope="module")
def args(tiny_model_dir, tiny_text_file, tmp_path_factory):
    spaces = tmp_path_factory.mktemp("spaces")
    for name, text in SPACES.items():
        (spaces / f"{name}.yaml").write_text(text)

    def make(space: str, budget: str, name: str, runs) -> list[str]:
        return ["search", "--budget", budget, *SEARCH, "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file),
                "--space", str(spaces / f"{space}.yaml"), "--seqlen", str(TINY_SEQLEN), "--calib-tokens",
                str(TINY_CALIB_TOKENS), "--eval-tokens", str(TINY_EVAL_TOKENS), "--threads", "1", "-q",
                "--runs-dir", str(runs), "--name", name]
    return make


def _search(args, tmp_path, space: str, budget: str) -> RunDir:
    rc, out, err = run_cli(args(space, budget, space, tmp_path))
    assert rc == 0, err
    return RunDir.open(tmp_path / space)


def test_joint_search_under_bits_and_sparsity(args, tmp_path):
    run = _search(args, tmp_path, "joint", "3.0bits,50%sparsity")
    problem = run.load_problem()
    assert str(problem.budget) == "3bits,50%sparsity" and problem.kept is not None
    evo = [r for r in run.results() if r.method == "evo"]
    assert evo and all(problem.feasible(r.x) for r in evo)
    for r in evo:
        c = problem.cost(r.x)
        assert c.bits <= 3.0 + 1e-9 and c.sparsity >= 0.5 - 1e-9
    best = json.loads((run.path / "best_plan.json").read_text())
    x = problem.encode(Plan.from_json(best))
    assert problem.feasible(x)
    rc, out, _ = run_cli(["report", str(run.path)])
    assert rc == 0
    page = (run.path / "report.html").read_text()
    assert '"sparsity":[[' in page                      # per (unit, level) pruned fraction for the heatmap/table


def test_sparsity_budget_alone(args, tmp_path):
    run = _search(args, tmp_path, "sparse", "60%sparsity")
    problem = run.load_problem()
    assert all(problem.cost(r.x).sparsity >= 0.6 - 1e-9 for r in run.results() if r.method == "evo")


def test_depth_search_drops_subblocks(args, tmp_path):
    run = _search(args, tmp_path, "depth", "25%sparsity")
    problem = run.load_problem()
    assert problem.units[0].endswith("o_proj") and set(problem.kinds) == {"attn", "mlp"}
    for r in (r for r in run.results() if r.method == "evo"):
        assert problem.cost(r.x).sparsity >= 0.25 - 1e-9


def test_a_limit_no_plan_meets_is_one_line(args, tmp_path):
    rc, out, err = run_cli(args("sparse", "3.0bits,80%sparsity", "x", tmp_path))
    assert_one_error_line(rc, out, err, "beyond the cheapest plan")
