"""`planner sensitivity` and the proxy methods end to end on the tiny model: every proxy plan is
measured for real and journaled with its predicted damage; the accuracy target needs no budget."""

from __future__ import annotations

import json
import math

import pytest

from planner.rundir import RunDir
from planner.search.bisect import max_evaluations

from .test_cli import assert_one_error_line, run_cli

TOKENS = ["--uniform-tokens", "128"]


@pytest.fixture(scope="module")
def data_args(tiny_model_dir, tiny_text_file, tiny_space_file) -> list[str]:
    from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN

    return ["--model", str(tiny_model_dir), "--dataset", str(tiny_text_file), "--space", str(tiny_space_file),
            "--seqlen", str(TINY_SEQLEN), "--calib-tokens", str(TINY_CALIB_TOKENS),
            "--eval-tokens", str(TINY_EVAL_TOKENS), "--threads", "1", "-q"]


def proxy_rows(run: RunDir, method: str):
    rows = [r for r in run.results() if r.method == method]
    assert rows and all(r.error is None and math.isfinite(r.kl) for r in rows)
    assert all(isinstance(r.extra.get("predicted"), float) for r in rows)     # predicted next to measured
    return rows


def test_sensitivity_command_prints_every_score(data_args):
    rc, out, err = run_cli(["sensitivity", "--score", "all", "--top", "3", *data_args])
    assert rc == 0, err
    for score in ("hutchinson", "fisher", "noise", "proxy"):
        assert f"sensitivity {score}:" in out
    assert out.count("model.layers.") == 4 * 3


def test_ilp_plan_is_measured_with_its_prediction(data_args, tmp_path):
    rc, out, err = run_cli(["search", "--budget", "3.0bits", "--method", "ilp", "--score", "fisher", *TOKENS,
                            "--runs-dir", tmp_path, "--name", "ilp", *data_args])
    assert rc == 0, err
    run = RunDir.open(tmp_path / "ilp")
    (row,) = proxy_rows(run, "ilp")
    assert row.bits <= 3.0 + 1e-9 and row.label == "ilp fisher"
    best = json.loads((run.path / "best_plan.json").read_text())
    assert best["method"] == "ilp" and best["bits"] == pytest.approx(row.bits)
    sens = run.read("sensitivity.json")
    assert sens["score"] == "fisher" and len(sens["damage"]) == len(run.load_problem().units)


def test_accuracy_target_without_a_budget(data_args, tmp_path):
    rc, out, err = run_cli(["search", "--method", "hessian", "--max-kl", "0.02", "--score", "hutchinson", *TOKENS,
                            "--runs-dir", tmp_path, "--name", "target", *data_args])
    assert rc == 0, err
    run = RunDir.open(tmp_path / "target")
    rows = proxy_rows(run, "hessian")
    n = int(rows[0].label.split("/")[1])
    assert len(rows) <= max_evaluations(n)
    within = [r for r in rows if r.kl <= 0.02]
    best = json.loads((run.path / "best_plan.json").read_text())
    if within:                                  # the most compressed plan measured within the target
        assert best["bits"] == pytest.approx(min(r.bits for r in within))
    assert run.config["budget"] is None


def test_ppl_target_and_tied_lagrange_sweep(data_args, tmp_path):
    rc, _, err = run_cli(["search", "--method", "hessian", "--max-ppl-increase", "5%", "--budget", "4.0bits",
                          "--score", "noise", *TOKENS, "--runs-dir", tmp_path, "--name", "ppl", *data_args])
    assert rc == 0, err
    assert proxy_rows(RunDir.open(tmp_path / "ppl"), "hessian")
    rc, _, err = run_cli(["search", "--method", "lagrange", "--budget", "3.5bits", "--tie-fused", "--score", "proxy",
                          *TOKENS, "--runs-dir", tmp_path, "--name", "sweep", *data_args])
    assert rc == 0, err
    run = RunDir.open(tmp_path / "sweep")
    problem = run.load_problem()
    fused = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    for r in proxy_rows(run, "lagrange"):
        levels: dict[tuple[str, str], set[str]] = {}
        for name, level in problem.decode(r.x).as_dict().items():     # model units, however the problem groups them
            block, kind = name.split(".")[2], name.rsplit(".", 1)[-1]
            levels.setdefault((block, fused.get(kind, kind)), set()).add(level)
        assert all(len(v) == 1 for v in levels.values())
        assert r.bits <= 3.5 + 1e-9


@pytest.mark.parametrize("flags", [["--init", "hessian"], ["--screen", "3"], ["--schedule", "refine"]],
                         ids=["warm-start", "screen", "refine-schedule"])
def test_evo_takes_the_score_for_a_warm_start_or_a_screen(data_args, tmp_path, flags):
    rc, _, err = run_cli(["search", "--budget", "3.0bits", *flags, "--score", "proxy", *TOKENS,
                          "--generations", "1", "--offspring", "2", "--stages", "1@128",
                          "--runs-dir", tmp_path, "--name", "evo", *data_args])
    assert rc == 0, err
    run = RunDir.open(tmp_path / "evo")
    assert run.read("sensitivity.json")["score"] == "proxy"
    assert sum(r.method == "evo" and r.label != "parent" for r in run.results()) >= 2
    if "--init" not in flags:      # the screen, from the flag or the schedule, needed the score
        assert run.read("config.json")["method_config"]["screen"] == (3 if "--screen" in flags else 4)


@pytest.mark.parametrize("argv, match", [
    (["--budget", "3.0bits", "--max-kl", "0.1"], "--method hessian"),
    (["--method", "hessian", "--max-ppl-increase", "lots"], "malformed --max-ppl-increase"),
    (["--budget", "3.0bits", "--method", "ilp", "--score", "magic"], "unknown sensitivity score"),
    (["--method", "hessian"], "missing --budget"),
])
def test_bad_target_flags_are_one_line_errors(data_args, tmp_path, argv, match):
    rc, out, err = run_cli(["search", *argv, "--runs-dir", tmp_path, *data_args])
    assert_one_error_line(rc, out, err, match)
    assert not any(tmp_path.iterdir())
