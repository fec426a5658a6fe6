"""`kill -9` a real `planner search` process at several moments; `--resume` must reach the same
journal and the same best plan as an uninterrupted run with the same seed (fp32, one thread:
every evaluation is bit-reproducible across processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN

ARGS = ["--budget", "3.0bits", "--generations", "4", "--offspring", "4", "--stages", "2@64,1@128",
        "--uniform-tokens", "128", "--dtype", "fp32", "--threads", "1", "-q"]


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "planner.cli", *map(str, args)]


def _rows(run: Path) -> list[dict]:
    f = run / "results.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


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
@pytest.mark.parametrize("kill_after_rows", [3, 12, 25])
def test_kill9_then_resume_matches_uninterrupted(tmp_path, base_args, env, reference, kill_after_rows):
    run = tmp_path / "r"
    proc = subprocess.Popen(_cmd(["search", *base_args, "--runs-dir", tmp_path, "--name", "r"]), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(_rows(run)) < kill_after_rows and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_rows(run)) < len(reference[0]), "the run finished before it could be killed"
    subprocess.run(_cmd(["search", "--resume", run, "--threads", "1", "-q"]), env=env, check=True,
                   capture_output=True, timeout=600)
    assert _essence(run) == reference
