"""`planner search --method nsga2|tpe` end to end on the tiny model: seeded from the uniform plans,
a held-out front merged over the run's methods, the optuna study in --storage, reports of both."""

from __future__ import annotations

import json

import optuna
import pytest

from planner.rundir import RunDir
from tests.conftest import cache_env
from tests.test_cli import assert_one_error_line, data_args, run_cli  # noqa: F401  (data_args: a fixture)

COMMON = ["--budget", "3.0bits", "--uniform-tokens", "128", "--tokens", "128"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_args, session_cache_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("moo")
    out = {}
    with cache_env(session_cache_dir):
        out["nsga2"] = run_cli(["search", *data_args, *COMMON, "--method", "nsga2", "--generations", "2",
                                "--pop-size", "6", "--runs-dir", root, "--name", "n"])
        out["tpe"] = run_cli(["search", *data_args, *COMMON, "--method", "tpe", "--trials", "6", "--objectives",
                              "kl,bits", "--storage", f"sqlite:///{root / 'study.db'}", "--runs-dir", root, "--name", "t"])
    return root, out


def test_nsga2_run_measures_a_merged_front_on_heldout(runs):
    root, out = runs
    rc, stdout, err = out["nsga2"]
    assert rc == 0, err
    run = RunDir.open(root / "n")
    rows = run.results()
    uniform = [r for r in rows if r.method == "uniform"]
    nsga2 = [r for r in rows if r.method == "nsga2"]
    assert uniform and 6 <= len(nsga2) <= 12
    feasible_uniform = {tuple(r.x) for r in uniform if r.bits <= 3.0 + 1e-9}
    assert feasible_uniform & {tuple(r.x) for r in nsga2 if r.generation == 0}      # seeded from the baselines
    labels = [r.label for r in run.heldout()]
    assert any(label.startswith("front 1/") for label in labels) and "best" in labels
    pareto = json.loads((root / "n" / "pareto.json").read_text())
    assert any(p["label"].startswith(("front", "best")) for p in pareto)       # held-out front: all methods
    hist = run.read("checkpoint.json")["searcher"]["history"]
    assert len(hist) == 2 and hist[1][2] >= hist[0][2] >= 0
    assert "best (nsga2) *" in stdout


def test_tpe_run_writes_its_study(runs):
    root, out = runs
    rc, _, err = out["tpe"]
    assert rc == 0, err
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{root / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    tpe_rows = [r for r in RunDir.open(root / "t").results() if r.method == "tpe"]
    assert len(complete) == len(tpe_rows) == 6 and len(study.directions) == 2


def test_resume_of_a_finished_tpe_run_changes_nothing(runs, data_args, session_cache_dir):  # noqa: F811
    root, _ = runs
    n_trials = len(optuna.load_study(study_name="t", storage=f"sqlite:///{root / 'study.db'}").trials)
    n_rows = len(RunDir.open(root / "t").results())
    with cache_env(session_cache_dir):
        rc, _, err = run_cli(["search", "--resume", root / "t", "--threads", "1", "-q"])
    assert rc == 0, err
    assert len(RunDir.open(root / "t").results()) == n_rows
    assert len(optuna.load_study(study_name="t", storage=f"sqlite:///{root / 'study.db'}").trials) == n_trials


def test_reports_of_both_runs(runs, tmp_path):
    root, _ = runs
    rc, stdout, err = run_cli(["report", root / "n", root / "t", "--format", "markdown", "--out", tmp_path])
    assert rc == 0, err
    assert "nsga2" in stdout and "tpe" in stdout
    rc, stdout, err = run_cli(["report", root / "n", root / "t", "--out", tmp_path / "both.html"])
    assert rc == 0 and (tmp_path / "both.html").stat().st_size > 1_000_000


def test_nsga2_seeded_with_the_hessian_hull(data_args, session_cache_dir, tmp_path):  # noqa: F811
    with cache_env(session_cache_dir):
        rc, _, err = run_cli(["search", *data_args, *COMMON, "--method", "nsga2", "--generations", "1", "--pop-size", "8",
                              "--init", "hessian", "--score", "proxy", "--runs-dir", tmp_path, "--name", "h"])
    assert rc == 0, err
    run = RunDir.open(tmp_path / "h")
    assert run.read("sensitivity.json")["score"] == "proxy"
    gen0 = [r for r in run.results() if r.method == "nsga2"]
    uniform = {tuple(r.x) for r in run.results() if r.method == "uniform"}
    assert len(gen0) == 8 and sum(tuple(r.x) not in uniform for r in gen0) >= 2   # hull plans lead the seeds
    assert len({round(r.bits, 2) for r in gen0}) >= 3                            # spread over sizes


def test_flags_of_another_method_are_errors(data_args, tmp_path):  # noqa: F811
    assert_one_error_line(*run_cli(["search", *data_args, *COMMON, "--method", "nsga2", "--trials", "5",
                                    "--runs-dir", tmp_path]), match="--trials applies to --method tpe, not nsga2")
    assert_one_error_line(*run_cli(["search", *data_args, "--budget", "3.0bits", "--objectives", "kl,size",
                                    "--runs-dir", tmp_path]), match="--objectives applies to --method nsga2 / tpe")
    assert_one_error_line(*run_cli(["search", *data_args, *COMMON, "--method", "nsga2", "--objectives", "size,kl",
                                    "--runs-dir", tmp_path]), match="objectives must start with kl")
