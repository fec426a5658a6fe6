"""The Ray executor on a local Ray with 2 CPU workers, tiny model, fp32: the same results as the
in-process evaluator (bit for bit, tasks cut by candidates and by windows, inside a batch too),
also where one worker makes a window's reference and the other fetches it through the object
store, or makes the next stage's references while idle (prefetch), the same final plan when a worker is killed by its pid in the middle of a search, and
`planner search --workers 2` end to end (workers.jsonl)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planner.budget import parse_budget
from planner.rundir import RunDir
from planner.search.base import Candidate, Fidelity
from planner.search.operators import level_switch

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, cache_env, torch_threads
from .test_cli import run_cli

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow      # a Ray start and worker processes: tens of seconds

from planner.distributed import Cluster, ClusterSpec  # noqa: E402
from planner.distributed.cluster import free_port  # noqa: E402
from planner.distributed.tasks import split  # noqa: E402

EVO = {"generations": 2, "offspring": 3, "stages": [[2, 64], [1, 128]]}
SEARCH = ["--budget", "3.0bits", "--generations", "2", "--offspring", "3", "--stages", "2@64,1@128",
          "--uniform-tokens", "128", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray (2 CPUs) for the module; the Cluster joins it and leaves it running."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, dashboard_port=free_port(),
             logging_level="WARNING")
    c = Cluster(ClusterSpec(workers=2))
    assert not c.owned and c.size == 2
    yield c
    c.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def sessions(tiny_sessions, cluster):
    """(in-process session, the same session on the Ray workers); fp32."""
    s = tiny_sessions("fp32")
    return s, dataclasses.replace(s, cluster=cluster, _evaluator=None)


def test_same_results_as_in_process(sessions, one_thread):
    local, remote = sessions
    problem = local.problem(parse_budget("3.0bits"))
    rng = np.random.default_rng(0)
    parent = np.full(problem.n_units, 1)
    xs = [tuple(int(v) for v in level_switch(parent, problem, rng, 1)) for _ in range(6)] + [tuple(parent.tolist())]
    # 64 tokens: one window, candidates split; 1024 tokens: 16 windows, split; a lone plan; two plans
    # on 6 windows: cut inside the evaluator's first batch of 4
    cands = [Candidate(x, Fidelity(t, s)) for t, s in ((128, 1), (1024, 2), (64, 3)) for x in xs]
    cands += [Candidate(xs[2], Fidelity(256, 4))] + [Candidate(x, Fidelity(384, 5)) for x in xs[:2]]
    want = local.evaluator(problem).evaluate(cands)
    ev = remote.evaluator(problem)
    assert {(t.start, t.stop) for t in split(0, np.array(xs[:2]), 6, 2, ev.cost)} == {(0, 3), (3, 6)}
    got = ev.evaluate(cands)
    assert [r.candidate for r in got] == cands
    assert [(r.kl, r.ppl, r.error) for r in got] == [(r.kl, r.ppl, r.error) for r in want]
    held = local.windows.heldout
    for plan in (problem.decode(xs[0]), None):
        assert ev.score(plan, held) == local.evaluator(problem).score(plan, held)
    assert ev.evaluations == len(cands) + 2 and "w0" in ev.summary() and "w1" in ev.summary()


def test_shared_references_give_identical_kl(sessions, one_thread):
    """Many plans on one window (EvoPress's first stage): two chunks, one on each idle worker; the
    producer's actor makes the window's reference and returns its hidden states as an object, the
    other task gets the ObjectRef and makes the reference with the head: one base-model forward in
    all, and every KL equals the in-process one."""
    local, remote = sessions
    problem = local.problem(parse_budget("3.0bits"))
    rng = np.random.default_rng(1)
    parent = np.full(problem.n_units, 1)
    xs = [tuple(int(v) for v in level_switch(parent, problem, rng, 1)) for _ in range(8)]
    cands = [Candidate(x, Fidelity(64, 11)) for x in xs]
    ev = remote.evaluator(problem)         # a new problem: new evaluators on the workers, no references yet
    tasks = split(0, np.array(xs), 1, 2, ev.cost)
    assert len(tasks) == 2 and [t.produces for t in tasks] == [True, False]
    got = ev.evaluate(cands)
    want = local.evaluator(problem).evaluate(cands)
    assert [(r.kl, r.ppl, r.error) for r in got] == [(r.kl, r.ppl, r.error) for r in want]
    assert ev.reference_counts == {"made": 1, "fetched": 1} and len(ev.backend.references) == 1


def test_prefetched_references_give_identical_kl(sessions, one_thread):
    """The search loop announces the next stage (`expect`): the worker left idle by a one-task batch
    makes and publishes some of that stage's references meanwhile (a filler: dispatched once the
    dispatcher has timed a task), the next batch is cut with those windows ready (no task produces
    them, each fetches them or has it) and every KL equals the in-process one."""
    local, remote = sessions
    problem = local.problem(parse_budget("3.0bits"))
    rng = np.random.default_rng(2)
    parent = np.full(problem.n_units, 1)
    xs = [tuple(int(v) for v in level_switch(parent, problem, rng, 1)) for _ in range(3)]
    ev = remote.evaluator(problem)          # a new problem: new evaluators on the workers, no references yet
    ev.evaluate([Candidate(xs[0], Fidelity(64, 20))])          # one task timed: seconds per cost known
    after = Fidelity(256, 22)
    ev.expect([after])
    cands = [Candidate(xs[1], Fidelity(64, 21))]                 # one plan on one window: one task
    later = [Candidate(x, after) for x in xs]                    # 3 plans on 4 windows
    got = ev.evaluate(cands)
    windows = local.windows.draw(after.tokens, after.seed)
    ready = [i for i, w in enumerate(windows) if int(w) in ev.backend.references]
    assert ready and not any(t.produces and set(t.windows) & set(ready)
                             for t in split(0, np.array(xs), len(windows), 2, ev.cost, ready=ready))
    got += ev.evaluate(later)
    want = local.evaluator(problem).evaluate(cands + later)
    assert [(r.kl, r.ppl, r.error) for r in got] == [(r.kl, r.ppl, r.error) for r in want]
    assert ev.reference_counts["made"] <= 1 + 1 + len(windows) and ev.reference_counts["fetched"] <= len(ready)


def _search(session, path):
    from planner.pipeline import run_method

    problem = session.problem(parse_budget("3.0bits"))
    run = RunDir.create(path, {"method": "evo"})
    best = run_method(session, problem, run, "evo", EVO, seed=0, uniform_tokens=128)
    return best, run.results()


def test_a_worker_killed_mid_search_does_not_change_the_plan(sessions, tmp_path, one_thread):
    local, remote = sessions
    cluster = remote.cluster
    want_best, want_rows = _search(local, tmp_path / "local")
    pids = cluster.pids()
    submitted = []

    def kill_once(worker: int, task: int) -> None:
        submitted.append(worker)
        if len(submitted) == 5:       # the worker has just been handed a task: it dies holding it
            os.kill(cluster.dispatcher.stats[worker].pid, signal.SIGKILL)

    cluster.dispatcher.on_submit = kill_once
    try:
        best, rows = _search(remote, tmp_path / "ray")
    finally:
        cluster.dispatcher.on_submit = None
    assert sum(s.deaths for s in cluster.dispatcher.stats) >= 1
    assert cluster.pids() != pids                                   # an actor was restarted
    assert best == want_best
    key = [(r.method, r.generation, r.stage, r.tokens, r.seed, tuple(r.x), r.kl, r.ppl) for r in rows]
    assert key == [(r.method, r.generation, r.stage, r.tokens, r.seed, tuple(r.x), r.kl, r.ppl) for r in want_rows]
    workers = [json.loads(line) for line in (tmp_path / "ray" / "workers.jsonl").read_text().splitlines()]
    assert {w["worker"] for w in workers} == {0, 1} and any(w["deaths"] for w in workers)


@pytest.fixture(scope="module")
def cli_pair(tiny_model_dir, tiny_text_file, tiny_space_file, session_cache_dir):
    """`run(tmp_path, *flags, env=None)`: an in-process `planner search` and the same with `flags`
    (in a child process with `env` when given); checks that they found the same plan through the
    same journal and returns the flagged run's stdout."""
    def run(tmp_path: Path, *flags: str, env: dict | None = None) -> str:
        data = [str(a) for a in ("--model", tiny_model_dir, "--dataset", tiny_text_file, "--space", tiny_space_file,
                                 "--seqlen", TINY_SEQLEN, "--calib-tokens", TINY_CALIB_TOKENS, "--eval-tokens",
                                 TINY_EVAL_TOKENS, "--threads", "1", "-q", "--runs-dir", tmp_path, *SEARCH)]
        with cache_env(session_cache_dir), torch_threads(1):
            rc, out, err = run_cli(["search", *data, "--name", "local"])
            assert rc == 0, err
            if env is None:
                rc, out, err = run_cli(["search", *data, "--name", "workers", *flags])
            else:
                p = subprocess.run([sys.executable, "-m", "planner.cli", "search", *data, "--name", "workers", *flags],
                                   capture_output=True, text=True, timeout=300,
                                   env={**os.environ, "PLANNER_CACHE": str(session_cache_dir), **env})
                rc, out, err = p.returncode, p.stdout, p.stderr
        assert rc == 0, err
        assert json.loads((tmp_path / "workers" / "best_plan.json").read_text()) == \
            json.loads((tmp_path / "local" / "best_plan.json").read_text())
        local, remote = RunDir.open(tmp_path / "local"), RunDir.open(tmp_path / "workers")
        assert [(r.x, r.kl, r.ppl) for r in remote.results()] == [(r.x, r.kl, r.ppl) for r in local.results()]
        rows = [json.loads(line) for line in (tmp_path / "workers" / "workers.jsonl").read_text().splitlines()]
        assert {r["worker"] for r in rows} == {0, 1} and rows[-1]["tasks"] > 0 and rows[-1]["tokens_per_s"] > 0
        return out
    return run


def test_cli_search_with_workers(cluster, cli_pair, tmp_path):
    cluster.release()           # the CLI starts its own two actors on the module's Ray (2 CPUs)
    out = cli_pair(tmp_path, "--workers", "2")
    assert "best (evo) *" in out
    assert ray.is_initialized()     # a Ray the CLI did not start is left running
