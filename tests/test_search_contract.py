"""Contract tests over EVERY registered searcher, on a toy problem built in code.

A new searcher passes these by registering itself: plans stay feasible, failures are accepted,
the same seed gives the same result, state survives a JSON round trip mid-run, and `run_search`
resumes after a kill without evaluating or journaling anything twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict

import numpy as np
import pytest

from planner.budget import Budget, Metric
from planner.problem import Problem
from planner.rundir import RunDir
from planner.search import REGISTRY, Candidate, Result, make_searcher, run_search

BITS = (2.0, 3.0, 4.0, 6.0, 8.0)
KINDS = {"q_proj": 64 * 64, "k_proj": 64 * 16, "up_proj": 64 * 256, "down_proj": 256 * 64}   # 3 sizes
N_BLOCKS = 6

# small but real configs: each registered searcher finishes in well under a second here
FAST = {"evo": {"generations": 8, "offspring": 6, "stages": [[3, 128], [1, 512]]}}
FAST.update({"nsga2": {"generations": 6, "pop_size": 12}, "tpe": {"trials": 32, "batch": 4}})


def toy_problem(budget: Budget | None = None, ragged: bool = False) -> Problem:
    """24 units (4 kinds, 3 sizes) in 6 blocks; levels 2,3,4,6,8 bits with per-group overhead.

    ragged: k_proj has no 8-bit level (nan-padded ladder), as when a level does not apply.
    """
    budget = budget or Budget(3.0, Metric.BITS)
    units, numel, levels, kinds, blocks = [], [], [], [], []
    for b in range(N_BLOCKS):
        for kind, n in KINDS.items():
            units.append(f"blk.{b}.{kind}")
            numel.append(n)
            kinds.append(kind)
            blocks.append(b)
            top = 4 if ragged and kind == "k_proj" else 5
            levels.append(tuple(f"b{int(bt)}" for bt in BITS[:top]))
    L = len(BITS)
    code = np.full((len(units), L), np.nan)
    stored = np.full((len(units), L), np.nan)
    for u, n in enumerate(numel):
        for lv in range(len(levels[u])):
            code[u, lv] = n * BITS[lv]
            overhead = 32 / 64 if BITS[lv] < 8 else 16 / 64      # fp16 scale + zero per group of 64
            stored[u, lv] = n * (BITS[lv] + overhead)
    return Problem(units=tuple(units), numel=np.array(numel, dtype=np.int64), levels=tuple(levels),
                   code_bits=code, stored_bits=stored, budget=budget, kinds=tuple(kinds), blocks=tuple(blocks))


def tied_toy_problem(budget: Budget | None = None) -> Problem:
    """toy_problem(ragged=True) with q_proj and k_proj of each block tied to one level id (raw
    `Problem.ties`, as --tie-fused makes them); k_proj lacks 8 bits, so the pair shares 2..6 bits."""
    p = toy_problem(budget, ragged=True)
    ties = tuple(f"qk{b}" if k in ("q_proj", "k_proj") else "" for b, k in zip(p.blocks, p.kinds, strict=True))
    return dataclasses.replace(p, ties=ties, _index={})


def ties_kept(problem: Problem, x) -> bool:
    return all(len({problem.levels[u][x[u]] for u in g}) == 1 for g in problem.tie_groups())


def unit_errors(problem: Problem, bits: np.ndarray) -> np.ndarray:
    """Each unit's error at `bits` per weight (broadcast over a trailing level axis): a fixed
    random sensitivity, down_proj and k_proj weighted up, times 4^-bits."""
    sens = np.random.default_rng(1234).lognormal(0.0, 1.0, problem.n_units)
    sens *= np.array([{"down_proj": 4.0, "k_proj": 2.0}.get(k, 1.0) for k in problem.kinds])
    return sens.reshape(sens.shape + (1,) * (bits.ndim - 1)) * 4.0 ** (-bits) * 100


def true_kl(problem: Problem, x) -> float:
    """Non-additive synthetic fitness: weighted per-unit errors plus a per-block attn x mlp term."""
    bits = problem.code_bits[np.arange(problem.n_units), np.asarray(x)] / problem.numel
    err = unit_errors(problem, bits)
    additive = float((err * problem.numel).sum() / problem.total_numel)
    blocks = np.asarray(problem.blocks)
    attn = np.array([k in ("q_proj", "k_proj") for k in problem.kinds])
    inter = sum(err[(blocks == b) & attn].sum() * err[(blocks == b) & ~attn].sum() for b in range(N_BLOCKS))
    return additive + 0.01 * float(inter)


def fitness(problem: Problem, c: Candidate) -> Result:
    """true_kl with ~1% noise fixed by (fidelity seed, x), smaller on more tokens."""
    noise = np.random.default_rng([c.fidelity.seed, *c.x]).normal() * 0.01 * math.sqrt(512 / c.fidelity.tokens)
    kl = true_kl(problem, c.x) * (1 + noise)
    return Result(c, kl=kl, ppl=math.exp(min(kl, 50)))


def evaluator(problem: Problem, fail_every: int = 0, calls: list | None = None):
    def evaluate(cands: list[Candidate]) -> list[Result]:
        if calls is not None:
            calls.append(len(cands))
        out = []
        for c in cands:
            failed = fail_every and sum(c.x) % fail_every == 0
            out.append(Result(c, error="synthetic failure") if failed else fitness(problem, c))
        return out
    return evaluate


def drive(searcher, problem: Problem, evaluate, max_batches: int = 10_000) -> list[list[Candidate]]:
    """ask/tell to done; returns every batch asked."""
    batches = []
    while not searcher.done():
        assert len(batches) < max_batches, "searcher never finishes"
        batch = searcher.ask()
        batches.append(batch)
        searcher.tell(evaluate(batch))
    return batches


def make(name: str, problem: Problem, seed: int = 0):
    return make_searcher(name, problem, FAST.get(name, {}), seed)


METHODS = sorted(REGISTRY)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("budget", [Budget(3.0, Metric.BITS), Budget(3.6, Metric.BPW)])
def test_every_asked_plan_is_feasible(name, budget):
    problem = toy_problem(budget, ragged=True)
    s = make(name, problem)
    batches = drive(s, problem, evaluator(problem))
    assert batches and any(batches)
    for c in (c for b in batches for c in b):
        x = np.asarray(c.x)
        assert len(x) == problem.n_units and (x >= 0).all() and (x < problem.n_levels).all()
        assert problem.feasible(x), (c.label, problem.cost(x))
    assert s.best() is not None and problem.feasible(s.best())


@pytest.mark.parametrize("name", METHODS)
def test_tied_units_share_one_level(name):
    """Every searcher keeps raw ties: the population ones search the fused problem and name every
    member in the plans they ask; a JSON round trip mid-run changes nothing."""
    problem = tied_toy_problem()
    ref = make(name, problem, seed=2)
    ref_batches = drive(ref, problem, evaluator(problem))
    asked = [c for b in ref_batches for c in b]
    assert asked
    for c in asked:
        assert len(c.x) == problem.n_units and problem.feasible(c.x) and ties_kept(problem, c.x), c.label
    assert ref.best() is not None and ties_kept(problem, ref.best())
    s, batches = make(name, problem, seed=2), []
    while not s.done():
        batches.append(s.ask())
        s.tell(evaluator(problem)(batches[-1]))
        if len(batches) == 1:
            restored = make(name, problem, seed=99)
            restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
            s = restored
    assert batches == ref_batches and s.best() == ref.best()


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("fail_every", [1, 3])
def test_failures_are_accepted(name, fail_every):
    problem = toy_problem()
    s = make(name, problem)
    drive(s, problem, evaluator(problem, fail_every=fail_every))
    best = s.best()
    assert best is None or problem.feasible(best)
    json.dumps(s.state_dict())


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_result(name):
    problem = toy_problem()
    runs = []
    for _ in range(2):
        s = make(name, problem, seed=7)
        runs.append((drive(s, problem, evaluator(problem)), s.best()))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("between", ["ask-tell", "tell-ask"])
def test_state_survives_json_round_trip_mid_run(name, between):
    problem = toy_problem()
    evaluate = evaluator(problem)
    ref = make(name, problem, seed=3)
    ref_batches = drive(ref, problem, evaluate)

    s = make(name, problem, seed=3)
    batches = []
    cut = max(1, len(ref_batches) // 2)
    while not s.done():
        batch = s.ask()
        if len(batches) == cut - 1 and between == "ask-tell":
            restored = make(name, problem, seed=99)       # a different seed: the state must carry it all
            restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
            s = restored
            assert s.ask() == batch
        batches.append(batch)
        s.tell(evaluate(batch))
        if len(batches) == cut and between == "tell-ask":
            restored = make(name, problem, seed=99)
            restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
            s = restored
    assert batches == ref_batches
    assert s.best() == ref.best()


def _journal(run: RunDir) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in run.results()]


class Killed(Exception):
    pass


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("kill", ["evaluate", "mid-batch", "torn-line"])
def test_run_search_resumes_without_duplicates(name, kill, tmp_path):
    problem = toy_problem()
    ref_run = RunDir.create(tmp_path / "ref", {"method": name})
    ref = make(name, problem, seed=5)
    ref_calls: list[int] = []
    run_search(ref, problem, evaluator(problem, calls=ref_calls), ref_run)

    run = RunDir.create(tmp_path / "run", {"method": name})
    calls: list[int] = []
    evaluate = evaluator(problem, calls=calls)
    n_rows = len(ref_run.results())

    def dying_evaluate(cands):
        if len(calls) >= min(2, len(ref_calls) - 1):
            raise Killed
        return evaluate(cands)

    def dying_on_result(row):
        if len(run.results()) >= n_rows // 2 + 1:
            raise Killed                       # rows journaled, checkpoint not yet written

    with pytest.raises(Killed):
        if kill == "evaluate":
            run_search(make(name, problem, seed=5), problem, dying_evaluate, run)
        else:
            run_search(make(name, problem, seed=5), problem, evaluate, run, on_result=dying_on_result)
    if kill == "torn-line":
        with open(run.path / "results.jsonl", "a") as f:
            f.write('{"method": "evo", "generat')
    n_before = len(run.results())
    evaluated_before = sum(calls)

    resumed = make(name, problem, seed=5)
    run_search(resumed, problem, evaluate, run)
    assert resumed.best() == ref.best()
    assert _journal(run) == _journal(ref_run)
    # nothing journaled before the kill was evaluated again
    assert evaluated_before + (n_rows - n_before) == sum(calls)
    ckpt = run.read("checkpoint.json")
    assert ckpt["n_results"] == n_rows and ckpt["method"] == name
