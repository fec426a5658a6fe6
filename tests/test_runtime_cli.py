"""`planner eval --real` and `planner search --real` on the tiny model: the packed runtime behind the CLI."""

from __future__ import annotations

import json

import pytest

from planner.budget import Budget, Metric
from planner.plan import Plan
from tests.conftest import TINY_BITS, TINY_EVAL_TOKENS, cache_env
from tests.test_cli import data_args, run_cli  # noqa: F401  (data_args is a fixture)


@pytest.fixture(scope="module")
def plan_file(tiny_sessions, tmp_path_factory):
    session = tiny_sessions("fp32")
    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    plan = Plan.of({u: next(lv for lv in problem.levels[i] if f"-b{TINY_BITS[i % 4]}-" in lv)
                    for i, u in enumerate(problem.units)})
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    path.write_text(json.dumps(plan.to_json()))
    return path


def test_eval_real_matches_fake_quant(plan_file, data_args):  # noqa: F811
    results = {}
    for flag in ([], ["--real"]):
        rc, out, err = run_cli(["eval", plan_file, *data_args, *flag])
        assert rc == 0, err
        results[bool(flag)] = json.loads(out.strip().splitlines()[-1])
    fake, real = results[False], results[True]
    assert real["real"] is True and fake["real"] is False and real["tokens"] == TINY_EVAL_TOKENS
    assert real["kl"] == pytest.approx(fake["kl"], rel=1e-3, abs=1e-5)      # bf16: same dequantized numbers
    assert real["ppl"] == pytest.approx(fake["ppl"], rel=1e-3)


def test_search_real_runs_and_records_it(tmp_path, data_args, session_cache_dir):  # noqa: F811
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *data_args, "--budget", "3.0bits", "--method", "uniform",
                                "--uniform-tokens", "128", "--real", "--runs-dir", tmp_path, "--name", "real"])
    assert rc == 0, err
    assert json.loads((tmp_path / "real" / "config.json").read_text())["real"] is True
    assert json.loads((tmp_path / "real" / "best_plan.json").read_text())["heldout_kl"] >= 0
