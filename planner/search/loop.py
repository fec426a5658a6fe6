"""The one loop that drives every searcher: ask -> evaluate -> journal -> tell -> checkpoint.

The journal (`results.jsonl`) is the truth. A checkpoint records the searcher state after a tell
and how many journal rows existed then. On resume the state is loaded and the rows written after
that checkpoint (a kill between journal and checkpoint) answer the re-asked candidates, so nothing
is evaluated or journaled twice and the run ends exactly where an uninterrupted one would.

Fitness cache: a plan asked again on data it was already measured on (same x, tokens and batch
seed - a population searcher re-proposing a plan, a warm start asked on a batch it has seen) is
answered from the journal instead of the model. The answer is journaled again with
`extra.cached = true` and no seconds, so the journal still has one row per ask and a resumed run
replays it the same way. Failed measurements are never cached: a retry may succeed.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable

from planner.errors import PlannerError
from planner.problem import Problem
from planner.rundir import Row, RunDir
from planner.search.base import REGISTRY, Candidate, Fidelity, Result, Searcher

Key = tuple[tuple[int, ...], int, int]      # (x, tokens, seed): same plan on the same data


def resume_journal(run: RunDir) -> int:
    """Cut results.jsonl after its last intact row (a kill can tear the line being written).

    Returns the number of intact rows. Without this, rows appended after a torn line would be
    invisible to `RunDir.results()`, which stops at the first unreadable line.
    """
    f = run.path / "results.jsonl"
    if not f.is_file():
        return 0
    data, keep, n = f.read_bytes(), 0, 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("torn line")
            Row(**json.loads(line))
        except (ValueError, TypeError):
            break
        keep, n = keep + len(line), n + 1
    if keep < len(data):
        os.truncate(f, keep)
    return n


def method_of(searcher: Searcher) -> str:
    names = [r.name for r in REGISTRY.values() if r.factory is type(searcher)]
    return names[0] if names else getattr(searcher, "method", type(searcher).__name__)


def _key(c: Candidate) -> Key:
    return tuple(c.x), c.fidelity.tokens, c.fidelity.seed


def _row(problem: Problem, c: Candidate, r: Result, seconds: float) -> Row:
    cost = problem.cost(c.x)
    return Row(method=c.method, generation=c.generation, stage=c.stage, tokens=c.fidelity.tokens,
               seed=c.fidelity.seed, kl=r.kl, ppl=r.ppl, bits=cost.bits, bpw=cost.bpw, bytes=cost.nbytes,
               plan_id=problem.decode(c.x).id, x=list(c.x), seconds=seconds, error=r.error, label=c.label,
               extra={**cost.hardware(), **({} if c.predicted is None else {"predicted": c.predicted})})


def run_search(searcher: Searcher, problem: Problem, evaluate: Callable[[list[Candidate]], list[Result]],
               run: RunDir, on_result: Callable[[Row], None] | None = None,
               checkpoint: str = "checkpoint.json", expect: Callable[[list[Fidelity]], None] | None = None) -> None:
    """Drive `searcher` to done, journaling every result into `run`; resumes from its checkpoint.

    Several searchers may run one after another in one run dir (uniform baselines, then evo),
    each with its own `checkpoint` file; they share the journal. `expect` (an executor's) hears,
    before each evaluation, the fidelities a searcher with `upcoming()` will ask next: a hint that
    lets it prepare their data during this one; it never changes a result."""
    method = method_of(searcher)
    n_rows = resume_journal(run)
    rows = run.results()
    ckpt = run.read(checkpoint)
    n_seen = 0
    if ckpt is not None:
        if ckpt.get("method") != method:
            raise PlannerError(f"run dir {str(run.path)!r} holds a {ckpt.get('method')!r} checkpoint, "
                               f"not {method!r}: resume with the same method or start a new run")
        searcher.load_state_dict(ckpt["searcher"])
        n_seen = min(int(ckpt["n_results"]), len(rows))
    # replay: this searcher's rows journaled after its checkpoint answer its re-asked candidates once;
    # every other successful row (before it, or another searcher's) answers any later ask (the memo)
    cache: dict[Key, deque[Row]] = defaultdict(deque)
    measured: dict[Key, Row] = {}
    for i, row in enumerate(rows):
        key = (tuple(row.x), row.tokens, row.seed)
        if i >= n_seen and row.method == method:
            cache[key].append(row)
        elif row.error is None:
            measured.setdefault(key, row)

    while not searcher.done():
        cands = searcher.ask()
        cached = {i: cache[_key(c)].popleft() for i, c in enumerate(cands) if cache.get(_key(c))}
        known = {i: measured[_key(c)] for i, c in enumerate(cands) if i not in cached and _key(c) in measured}
        todo = [c for i, c in enumerate(cands) if i not in cached and i not in known]
        if expect is not None:
            expect(searcher.upcoming() if hasattr(searcher, "upcoming") else [])
        t0 = time.perf_counter()
        fresh = iter(evaluate(todo) if todo else [])
        seconds = (time.perf_counter() - t0) / max(len(todo), 1)
        results = []
        for i, c in enumerate(cands):
            if i in cached:
                row = cached[i]
                results.append(Result(c, kl=row.kl, ppl=row.ppl, error=row.error))
                if row.error is None:
                    measured.setdefault(_key(c), row)
                continue
            if i in known:
                r = Result(c, kl=known[i].kl, ppl=known[i].ppl)
                row = _row(problem, c, r, 0.0)
                row.extra["cached"] = True
            else:
                r = next(fresh, None)
                if r is None or tuple(r.candidate.x) != tuple(c.x):
                    raise PlannerError("evaluate() must return one result per candidate, in the order given")
                row = _row(problem, c, r, seconds)
                if r.error is None:
                    measured[_key(c)] = row
            run.append_result(row)
            n_rows += 1
            if on_result is not None:
                on_result(row)
            results.append(r)
        searcher.tell(results)
        run.write(checkpoint, {"searcher": searcher.state_dict(), "n_results": n_rows, "method": method})
