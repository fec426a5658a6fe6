"""The CLI in-process on the tiny model: every bad input is exit 2 with one 'planner: error:' line and
no run dir; a search runs end to end, `eval` and `report` read its run dir, and `--resume` neither
re-evaluates nor duplicates anything."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import planner.rundir
from planner.cli import main
from planner.plan import Plan
from planner.rundir import RunDir

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, cache_env

BUDGET = 3.0
SEARCH = ["--budget", "3.0bits", "--generations", "2", "--offspring", "3", "--stages", "2@64,1@128",
          "--uniform-tokens", "128"]


@pytest.fixture(scope="module")
def data_args(tiny_model_dir, tiny_text_file, tiny_space_file) -> list[str]:
    return ["--model", str(tiny_model_dir), "--dataset", str(tiny_text_file), "--space", str(tiny_space_file),
            "--seqlen", str(TINY_SEQLEN), "--calib-tokens", str(TINY_CALIB_TOKENS),
            "--eval-tokens", str(TINY_EVAL_TOKENS), "--threads", "1", "-q"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """planner.cli.main in-process with stdout/stderr captured (usable from module fixtures too)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        mp.setenv("TQDM_DISABLE", "1")          # main() setdefault()s it under -q; keep it from leaking
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_one_error_line(rc: int, out: str, err: str, match: str | None = None) -> str:
    lines = err.strip("\n").splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("planner: error: "), err
    assert out == ""
    if match is not None:
        assert match in lines[0], lines[0]
    return lines[0]


def assert_no_run_dir(runs: Path) -> None:
    assert not runs.exists() or not any(runs.iterdir()), sorted(p.name for p in runs.iterdir())


# --- bad inputs to `planner search` ------------------------------------------------------------

def _replace(args: list[str], flag: str, value: str | None) -> list[str]:
    """args with `flag`'s value replaced (or the flag dropped when value is None)."""
    out, i = [], 0
    while i < len(args):
        if args[i] == flag:
            if value is not None:
                out += [f"{flag}={value}"] if value.startswith("-") else [flag, value]
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def bad_search_cases(tmp: Path) -> dict[str, tuple[dict[str, str | None], str]]:
    """case -> ({flag: new value or None to drop}, text the error line must contain)."""
    (tmp / "no-config").mkdir()
    (tmp / "data.csv").write_text("text\nhello world\n")
    (tmp / "short.txt").write_text("too short to cut into windows. " * 5)
    (tmp / "bad-space.yaml").write_text("levels:\n  - method: rtn\n    bits: [9]\n")
    return {
        "unknown model name": ({"--model": "no-such-model"}, "unknown model 'no-such-model'"),
        "missing gguf file": ({"--model": str(tmp / "missing.gguf")}, "does not exist"),
        "folder without config.json": ({"--model": str(tmp / "no-config")}, "no config.json"),
        "unknown dataset": ({"--dataset": "no-such-dataset"}, "unknown dataset 'no-such-dataset'"),
        "dataset of unsupported type": ({"--dataset": str(tmp / "data.csv")}, "unsupported dataset file type '.csv'"),
        "dataset too short": ({"--dataset": str(tmp / "short.txt")}, "windows"),
        "malformed budget": ({"--budget": "3"}, "malformed budget '3'"),
        "unknown budget unit": ({"--budget": "3.0bitz"}, "unknown budget unit"),
        "negative budget": ({"--budget": "-1bits"}, "malformed budget"),
        "missing --budget": ({"--budget": None}, "missing --budget"),
        "unknown search space": ({"--space": "no-such-space"}, "unknown search space 'no-such-space'"),
        "malformed search space": ({"--space": str(tmp / "bad-space.yaml")}, "bits must be"),
        "budget below the cheapest plan": ({"--budget": "1.5bits"}, "below the cheapest plan"),
        "budget above the dearest plan": ({"--budget": "9bits"}, "above the most expensive plan"),
        "bytes budget too small": ({"--budget": "1kB"}, "below the cheapest plan"),
        "bpw budget too large": ({"--budget": "12bpw"}, "above the most expensive plan"),
        "unknown --method": ({"--method": "annealing"}, "unknown search method 'annealing'"),
        "malformed --stages (text)": ({"--stages": "abc"}, "malformed --stages"),
        "malformed --stages (missing tokens)": ({"--stages": "2@64,1@"}, "malformed --stages"),
        "malformed --stages (three parts)": ({"--stages": "2@64@1"}, "malformed --stages"),
        "--stages with zero survivors": ({"--stages": "0@64"}, "stages"),
        "negative --generations": ({"--generations": "-1"}, "generations"),
    }


CASE_NAMES = ["unknown model name", "missing gguf file", "folder without config.json", "unknown dataset",
              "dataset of unsupported type", "dataset too short", "malformed budget", "unknown budget unit",
              "negative budget", "missing --budget", "unknown search space", "malformed search space",
              "budget below the cheapest plan", "budget above the dearest plan", "bytes budget too small",
              "bpw budget too large", "unknown --method", "malformed --stages (text)",
              "malformed --stages (missing tokens)", "malformed --stages (three parts)",
              "--stages with zero survivors", "negative --generations"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_search_input_is_one_error_line_and_no_run_dir(case, tmp_path, data_args):
    changes, match = bad_search_cases(tmp_path)[case]
    args = data_args + SEARCH
    for flag, value in changes.items():
        args = _replace(args if flag in args else args + [flag, ""], flag, value)
    runs = tmp_path / "runs"
    assert_one_error_line(*run_cli(["search", *args, "--runs-dir", runs, "--name", "r"]), match=match)
    assert_no_run_dir(runs)


def test_case_table_matches_names(tmp_path):
    assert list(bad_search_cases(tmp_path)) == CASE_NAMES


def test_existing_run_dir_is_refused_and_left_alone(tmp_path, data_args):
    runs = tmp_path / "runs"
    (runs / "taken").mkdir(parents=True)
    (runs / "taken" / "mine.txt").write_text("keep me")
    assert_one_error_line(*run_cli(["search", *data_args, *SEARCH, "--runs-dir", runs, "--name", "taken"]),
                          match="already exists")
    assert sorted(p.name for p in runs.iterdir()) == ["taken"]
    assert [p.name for p in (runs / "taken").iterdir()] == ["mine.txt"]


def test_resume_of_a_non_run_dir(tmp_path, data_args):
    assert_one_error_line(*run_cli(["search", "--resume", tmp_path, "--threads", "1", "-q"]),
                          match="not a planner run dir")
    assert list(tmp_path.iterdir()) == []


def test_stage_larger_than_search_pool_is_refused_before_the_run_dir(tmp_path, data_args):
    runs = tmp_path / "runs"
    args = _replace(data_args + SEARCH, "--stages", "2@64,1@1000000")
    assert_one_error_line(*run_cli(["search", *args, "--runs-dir", runs, "--name", "r"]), match="search pool")
    assert_no_run_dir(runs)


def test_seqlen_zero_is_one_error_line(tmp_path, data_args):
    runs = tmp_path / "runs"
    args = _replace(data_args + SEARCH, "--seqlen", "0")
    assert_one_error_line(*run_cli(["search", *args, "--runs-dir", runs, "--name", "r"]))
    assert_no_run_dir(runs)


def test_generations_zero_is_taken_literally(tmp_path, data_args):
    runs = tmp_path / "runs"
    args = _replace(_replace(_replace(data_args + SEARCH, "--generations", "0"), "--offspring", "1"), "--stages", "1@64")
    rc, out, err = run_cli(["search", *args, "--runs-dir", runs, "--name", "r"])
    assert rc == 0, err
    cfg = RunDir.open(runs / "r").config
    assert cfg["method_config"]["generations"] == 0
    assert not [r for r in RunDir(runs / "r").results() if r.method == "evo"]


def test_infeasible_budget_in_a_real_process_prints_exactly_one_line(tmp_path, data_args, planner_cache):
    """In-process runs cannot see logging/warnings (pytest captures those); a subprocess can."""
    runs = tmp_path / "runs"
    args = _replace(data_args + SEARCH, "--budget", "1.5bits")
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "search", *args, "--runs-dir", str(runs), "--name", "r"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("planner: error: budget"), \
        proc.stderr
    assert_no_run_dir(runs)


# --- `planner eval` / `planner report` bad inputs ---------------------------------------------------

def test_eval_plan_file_missing(tmp_path, data_args):
    assert_one_error_line(*run_cli(["eval", tmp_path / "best_plan.json", *data_args]), match="does not exist")


@pytest.mark.parametrize("content,match", [("this is not json", "cannot read plan file"),
                                           ("", "cannot read plan file"),
                                           ('{"schema": 1, "id": "x"}', "no 'plan' field"),
                                           ('[1, 2, 3]', "no 'plan' field"),
                                           ('{"schema": 99, "plan": {}}', "schema 99"),
                                           ('{"schema": 1, "plan": {"a": 3}}', "level ids")])
def test_eval_plan_file_unreadable(tmp_path, data_args, content, match):
    path = tmp_path / "plan.json"
    path.write_text(content)
    assert_one_error_line(*run_cli(["eval", path, *data_args]), match=match)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_eval_plan_of_another_model(tmp_path, data_args):
    plan = Plan.of({f"model.layers.{b}.mlp.down_proj": "gptq-b3-g48" for b in range(30)})
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_json()))
    assert_one_error_line(*run_cli(["eval", path, *data_args]), match="another model")


def test_report_on_a_non_run_dir(tmp_path):
    assert_one_error_line(*run_cli(["report", tmp_path]), match="not a planner run dir")
    assert list(tmp_path.iterdir()) == []
    assert_one_error_line(*run_cli(["report", tmp_path / "nope"]), match="not a planner run dir")


def test_levels_build(data_args):
    rc, out, err = run_cli(["levels", "build", *data_args])
    assert rc == 0, err
    assert "levels database:" in out and "(14 units x 8 levels)" in out


# --- a real search on the tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def searched(tmp_path_factory, data_args, session_cache_dir):
    """One finished `planner search` run: (run dir, rc, stdout, stderr)."""
    runs = tmp_path_factory.mktemp("runs")
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *data_args, *SEARCH, "--runs-dir", runs, "--name", "happy"])
    return runs / "happy", rc, out, err


def test_search_end_to_end(searched):
    path, rc, out, err = searched
    assert rc == 0, err
    assert "planner: error" not in err
    header = next(line for line in out.splitlines() if line.startswith("plan "))
    assert header.split() == ["plan", "bits", "bpw", "MB", "KL", "ppl"]
    assert "base model (reference)" in out and "best (evo) *" in out and "uniform gptq-b3-g48" in out
    assert f"planner eval {path / 'best_plan.json'}" in out

    run = RunDir.open(path)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "problem.json", "results.jsonl", "checkpoint.json", "heldout.jsonl", "pareto.json",
            "best_plan.json"} <= names
    assert not [n for n in names if n.endswith((".tmp", ".creating"))]

    best = json.loads((path / "best_plan.json").read_text())
    plan = Plan.from_json(best)
    problem = run.load_problem()
    x = problem.encode(plan)
    assert best["id"] == plan.id
    assert problem.cost(x).bits == pytest.approx(best["bits"]) and best["bits"] <= BUDGET + 1e-9
    assert math.isfinite(best["heldout_kl"]) and best["heldout_kl"] > 0 and best["heldout_tokens"] == TINY_EVAL_TOKENS

    rows = run.results()
    evo = [r for r in rows if r.method == "evo"]
    racing = [r for r in evo if r.generation < 2]
    assert len(racing) == 2 * (3 + 2 + 1)            # per generation: 3 offspring, 2 survivors, 1 parent
    assert len(evo) - len(racing) in (0, 2 * 4)      # the final check: parent vs warm start on 4 batches
    assert all(r.error is None and r.kl > 0 for r in rows)
    assert all(r.bits <= BUDGET + 1e-9 for r in evo)   # the search never leaves the budget
    # uniform baselines may include levels above the budget (Pareto context), never the mixes
    assert all(r.bits <= BUDGET + 1e-9 for r in rows if not r.label.startswith("uniform "))
    assert plan.id in {r.plan_id for r in rows}                # the best plan was measured in the search
    held = run.heldout()
    assert len({r.label for r in held}) == len(held) and "best" in {r.label for r in held}
    assert [r for r in held if r.label == "best"][0].kl == best["heldout_kl"]


def test_eval_of_the_best_plan(searched):
    path, rc, _, _ = searched
    assert rc == 0
    best = json.loads((path / "best_plan.json").read_text())
    rc, out, err = run_cli(["eval", path / "best_plan.json", "--threads", "1", "-q"])
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["plan"] == best["id"] and result["tokens"] == TINY_EVAL_TOKENS
    assert result["kl"] == pytest.approx(best["heldout_kl"], abs=1e-5)      # the same held-out windows
    assert result["ppl"] == pytest.approx(best["heldout_ppl"], rel=1e-4)
    assert result["bits"] == pytest.approx(best["bits"], abs=1e-4)
    assert "KL" in err and "ppl" in err


def test_eval_plan_with_a_level_outside_the_space(searched, tmp_path, data_args):
    path = searched[0]
    best = json.loads((path / "best_plan.json").read_text())
    unit = sorted(best["plan"])[0]
    best["plan"][unit] = "gptq-b5-g48"
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps(best))
    assert_one_error_line(*run_cli(["eval", bad, *data_args]), match="gptq-b5-g48")


def test_report_writes_html(searched, tmp_path):
    path = searched[0]
    out_file = tmp_path / "r.html"
    rc, out, err = run_cli(["report", path, "--out", out_file])
    assert rc == 0, err
    assert out.strip() == str(out_file)
    html = out_file.read_text()
    assert html.lstrip().lower().startswith(("<!doctype html", "<html")) and "</html>" in html.lower()
    assert "plotly" in html.lower()


def _journal_key(r) -> tuple:
    return (r.method, r.generation, r.stage, r.tokens, r.seed, tuple(r.x), r.label)


def test_resume_of_a_finished_run_changes_nothing(searched, tmp_path):
    src = searched[0]
    path = tmp_path / "copy"
    shutil.copytree(src, path)
    journal, held = (path / "results.jsonl").read_bytes(), (path / "heldout.jsonl").read_bytes()
    best = json.loads((path / "best_plan.json").read_text())
    rc, out, err = run_cli(["search", "--resume", path, "--threads", "1", "-q"])
    assert rc == 0, err
    assert (path / "results.jsonl").read_bytes() == journal      # nothing re-evaluated or duplicated
    assert (path / "heldout.jsonl").read_bytes() == held
    again = json.loads((path / "best_plan.json").read_text())
    assert again["plan"] == best["plan"] and again["heldout_kl"] == best["heldout_kl"]
    assert "best (evo) *" in out


def test_resume_after_a_kill_matches_an_uninterrupted_run(searched, tmp_path, data_args, monkeypatch):
    """Kill the run between journaling a stage and checkpointing it, tear the journal's last line,
    resume: the journal and the best plan equal those of the uninterrupted run."""
    ref_path = searched[0]
    runs = tmp_path / "runs"
    writes = {"n": 0}
    real_write = planner.rundir.RunDir.write

    def write(self, name, data):
        if name == "checkpoint.json":
            writes["n"] += 1
            if writes["n"] == 3:          # gen 1, stage 0: its rows are journaled, its checkpoint is not
                raise KeyboardInterrupt
        return real_write(self, name, data)

    monkeypatch.setattr(planner.rundir.RunDir, "write", write)
    rc, out, err = run_cli(["search", *data_args, *SEARCH, "--runs-dir", runs, "--name", "killed"])
    assert rc == 130 and "--resume" in err, err
    monkeypatch.setattr(planner.rundir.RunDir, "write", real_write)
    path = runs / "killed"
    n_before = len(RunDir(path).results())
    ckpt = json.loads((path / "checkpoint.json").read_text())
    assert ckpt["n_results"] < n_before < len(RunDir(ref_path).results())   # journal ahead of the checkpoint
    with open(path / "results.jsonl", "a") as f:
        f.write('{"method": "evo", "generation": 1, "sta')       # torn mid-row
    assert not (path / "best_plan.json").exists()

    rc, out, err = run_cli(["search", "--resume", path, "--threads", "1", "-q"])
    assert rc == 0, err
    rows, ref = RunDir(path).results(), RunDir(ref_path).results()
    assert len(rows) > n_before
    assert [_journal_key(r) for r in rows] == [_journal_key(r) for r in ref]
    assert len({_journal_key(r) for r in rows}) == len(rows)
    for r, q in zip(rows, ref, strict=True):
        assert r.kl == pytest.approx(q.kl, rel=1e-6, abs=1e-9)
    assert json.loads((path / "best_plan.json").read_text())["plan"] == \
        json.loads((ref_path / "best_plan.json").read_text())["plan"]
    assert (path / "results.jsonl").read_text().endswith("\n")


def test_search_with_local_repair(tmp_path, data_args, session_cache_dir):
    """`--local-repair` reaches evo's config, and its offspring stay within the budget."""
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *data_args, *SEARCH, "--local-repair", "--runs-dir", tmp_path, "--name", "lr"])
    assert rc == 0, err
    run = RunDir.open(tmp_path / "lr")
    assert json.loads((tmp_path / "lr" / "config.json").read_text())["method_config"]["local_repair"] is True
    assert all(r.bits <= BUDGET + 1e-9 for r in run.results() if r.method == "evo")
