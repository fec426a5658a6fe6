"""`kill -9` a real `planner search` process at several moments; `--resume` must reach the same
journal and the same best plan as an uninterrupted run with the same seed (fp32, one thread:
every evaluation is bit-reproducible across processes).

The process kills itself with SIGKILL at an exact journal row (optionally half-way through writing
it, leaving a torn line), so the test does not depend on how fast the machine is: polling from
outside raced a fast CI machine, which finished the whole run between two polls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN

ARGS = ["--budget", "3.0bits", "--generations", "4", "--offspring", "4", "--stages", "2@64,1@128",
        "--uniform-tokens", "128", "--dtype", "fp32", "--threads", "1", "-q"]


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "planner.cli", *map(str, args)]


# Runs the real CLI with RunDir.append_result wrapped: row `at` is written whole (or torn half-way),
# then the process SIGKILLs itself - no cleanup, no atexit, exactly like `kill -9`.
_KILLER = """
import json, os, signal, sys
from dataclasses import asdict
from planner import cli, rundir
at, torn = int(sys.argv[1]), sys.argv[2] == "torn"
append, n = rundir.RunDir.append_result, [0]
def killing_append(self, row):
    n[0] += 1
    if n[0] == at and torn:
        with open(self.path / "results.jsonl", "a") as f:
            f.write(json.dumps(asdict(row), default=rundir._jsonable)[:40])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    append(self, row)
    if n[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
rundir.RunDir.append_result = killing_append
sys.argv = ["planner", *sys.argv[3:]]
sys.exit(cli.main())
"""


def _killed_at(row: int, torn: bool, args: list) -> list[str]:
    return [sys.executable, "-c", _KILLER, str(row), "torn" if torn else "whole", *map(str, args)]


def _rows(run: Path) -> list[dict]:
    f = run / "results.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def _rows_intact(run: Path) -> list[str]:
    return [line for line in (run / "results.jsonl").read_text().split("\n")[:-1]]


def _essence(run: Path) -> tuple[list, dict]:
    rows = [(r["method"], r["generation"], r["stage"], r["x"], r["kl"]) for r in _rows(run)]
    return rows, json.loads((run / "best_plan.json").read_text())["plan"]


@pytest.fixture(scope="module")
def base_args(tiny_model_dir, tiny_text_file, tiny_space_file, session_cache_dir):
    return ["--model", tiny_model_dir, "--dataset", tiny_text_file, "--space", tiny_space_file,
            "--seqlen", TINY_SEQLEN, "--calib-tokens", TINY_CALIB_TOKENS, "--eval-tokens", TINY_EVAL_TOKENS, *ARGS]


@pytest.fixture(scope="module")
def env(session_cache_dir):
    return {**os.environ, "PLANNER_CACHE": str(session_cache_dir), "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_args, env):
    runs = tmp_path_factory.mktemp("ref")
    subprocess.run(_cmd(["search", *base_args, "--runs-dir", runs, "--name", "r"]), env=env, check=True,
                   capture_output=True, timeout=600)
    return _essence(runs / "r")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at_row, torn", [(3, False), (12, True), (25, False), (33, True)])
def test_kill9_then_resume_matches_uninterrupted(tmp_path, base_args, env, reference, kill_at_row, torn):
    run = tmp_path / "r"
    assert kill_at_row < len(reference[0])
    proc = subprocess.run(_killed_at(kill_at_row, torn, ["search", *base_args, "--runs-dir", tmp_path, "--name", "r"]),
                          env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(_rows_intact(run)) == kill_at_row - torn
    subprocess.run(_cmd(["search", "--resume", run, "--threads", "1", "-q"]), env=env, check=True,
                   capture_output=True, timeout=600)
    assert _essence(run) == reference
