"""`--ray-address` joins a running cluster: a head started here with `ray start --head` (2 CPUs,
bound to 127.0.0.1, free ports, no dashboard) runs `planner search --ray-address HOST:PORT
--workers 2`, which finds the plan the in-process search finds; the head is stopped by its pid and
none of its processes outlive the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planner.rundir import RunDir

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, cache_env, torch_threads
from .test_cli import run_cli
from .test_ray import SEARCH, free_port

ray = pytest.importorskip("ray")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), so that the test can check they are all gone."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def head():
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs; yields HOST:PORT; SIGTERM by pid at the end
    (`ray stop` would stop every Ray of this user on the machine)."""
    assert not ray.is_initialized()
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")    # a loopback-only test cluster
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                             "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, "ray start --head exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() - t0 < 90, "the head did not open its port within 90 s"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)     # `ray start --block` stops what it started on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        t0 = time.monotonic()
        while any(alive(p) for p in tree) and time.monotonic() - t0 < 30:
            time.sleep(0.5)
        left = [p for p in tree if alive(p)]
        for p in left:                        # only the processes this fixture started
            os.kill(p, signal.SIGKILL)
        assert not left, f"processes of the test head outlived it: {left}"


def test_search_joins_a_cluster_by_address(head, tiny_model_dir, tiny_text_file, tiny_space_file,
                                           session_cache_dir, tmp_path):
    data = ["--model", tiny_model_dir, "--dataset", tiny_text_file, "--space", tiny_space_file,
            "--seqlen", TINY_SEQLEN, "--calib-tokens", TINY_CALIB_TOKENS, "--eval-tokens", TINY_EVAL_TOKENS,
            "--threads", "1", "-q", "--runs-dir", tmp_path]
    with cache_env(session_cache_dir), torch_threads(1):
        rc, out, err = run_cli(["search", *data, *SEARCH, "--name", "local"])
        assert rc == 0, err
        rc, out, err = run_cli(["search", *data, *SEARCH, "--name", "joined", "--ray-address", head,
                                "--workers", "2"])
    assert rc == 0, err
    assert not ray.is_initialized()          # the CLI disconnected; the cluster itself keeps running
    assert json.loads((tmp_path / "joined" / "best_plan.json").read_text()) == \
        json.loads((tmp_path / "local" / "best_plan.json").read_text())
    local, joined = RunDir.open(tmp_path / "local"), RunDir.open(tmp_path / "joined")
    assert [(r.x, r.kl) for r in joined.results()] == [(r.x, r.kl) for r in local.results()]
    rows = [json.loads(line) for line in (tmp_path / "joined" / "workers.jsonl").read_text().splitlines()]
    assert {r["worker"] for r in rows} == {0, 1}
