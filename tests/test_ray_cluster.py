"""`--ray-address` joins a running cluster: a head started here with `ray start --head` (2 CPUs,
bound to 127.0.0.1, free ports, no dashboard) runs `planner search --ray-address HOST:PORT
--workers 2` (a child process, as a user would run it), which finds the plan the in-process search
finds; the head is stopped by its pid and none of its processes outlive the test.

Ray 2.5x authenticates with a token by default when it starts a local Ray, and a process keeps the
mode of its first `ray.init`; the head and the child process here both run with token auth off,
so this test does not depend on which Ray the test process itself started before."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow      # a Ray start and worker processes: tens of seconds
AUTH = {"RAY_AUTH_MODE": "disabled"}     # a loopback-only test cluster

from planner.distributed.cluster import free_port  # noqa: E402

from .test_ray import cli_pair  # noqa: E402,F401  (a fixture)


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
    port = free_port()
    env = {**os.environ, **AUTH}
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


def test_search_joins_a_cluster_by_address(head, cli_pair, tmp_path):  # noqa: F811
    cli_pair(tmp_path, "--ray-address", head, "--workers", "2", env=AUTH)
