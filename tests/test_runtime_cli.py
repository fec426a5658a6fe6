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


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, data_args, session_cache_dir):  # noqa: F811
    runs = tmp_path_factory.mktemp("runs")
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *data_args, "--budget", "3.0bits", "--method", "uniform",
                                "--uniform-tokens", "128", "--real", "--runs-dir", runs, "--name", "real"])
    assert rc == 0, err
    return runs / "real"


def test_search_real_runs_and_records_it(real_run):
    assert json.loads((real_run / "config.json").read_text())["real"] is True
    assert json.loads((real_run / "best_plan.json").read_text())["heldout_kl"] >= 0


def test_load_packed_export_into_the_runtime(real_run, tiny_sessions, tmp_path, session_cache_dir):
    """`planner export --format packed` + `planner.runtime.load_packed` = the plan's fake-quant model."""
    import torch

    from planner.model.load import load_model
    from planner.runtime import load_packed, packed_modules

    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["export", real_run, "--format", "packed", "--out", tmp_path / "packed", "--dtype", "fp32"])
    assert rc == 0, err
    model = load_packed(tmp_path / "packed", dtype=torch.float32)
    plan = Plan.load(real_run / "best_plan.json").as_dict()
    assert set(packed_modules(model)) == set(plan)
    session = tiny_sessions("fp32")
    fake = load_model(session.spec.model).model
    for u, level in plan.items():
        fake.get_submodule(u).weight.data = session.db.weight(u, level, torch.float32)
    ids = session.windows.ids[:2]
    with torch.no_grad():
        expect, got = fake(ids).logits, model(ids).logits
    assert float((got - expect).abs().max()) <= 1e-4 * float(expect.abs().max())
