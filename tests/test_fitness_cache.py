"""The loop's fitness cache: a plan asked again on data it was measured on is answered from the
journal (journaled again, marked cached), never re-measured; failures are never cached; a run
killed anywhere and resumed writes the same journal as an uninterrupted one."""

from __future__ import annotations

import math

import pytest

from planner.rundir import RunDir
from planner.search import Candidate, Fidelity, Result, run_search
from tests.test_search_contract import toy_problem, true_kl


class Repeater:
    """Asks the same three plans on the same batch `rounds` times (a population searcher that keeps
    re-proposing its elite), plus one plan on a fresh batch each round."""

    method = "repeater"

    def __init__(self, problem, rounds: int = 3):
        self.problem, self.rounds, self.round = problem, rounds, 0
        self.kls: list[float] = []

    def ask(self) -> list[Candidate]:
        xs = [tuple([lv] * self.problem.n_units) for lv in (0, 1, 2)]
        same = [Candidate(x, Fidelity(tokens=128, seed=7), method=self.method) for x in xs]
        return same + [Candidate(xs[0], Fidelity(tokens=128, seed=100 + self.round), method=self.method)]

    def tell(self, results: list[Result]) -> None:
        self.kls += [r.kl for r in results]
        self.round += 1

    def done(self) -> bool:
        return self.round >= self.rounds

    def best(self):
        return None

    def state_dict(self) -> dict:
        return {"round": self.round, "kls": self.kls}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.kls = state["round"], list(state["kls"])


def _counting(problem, calls: list, fail_seed: int | None = None):
    def evaluate(cands):
        calls.extend(cands)
        return [Result(c, error="synthetic") if c.fidelity.seed == fail_seed else
                Result(c, kl=true_kl(problem, c.x), ppl=1.0) for c in cands]
    return evaluate


def test_repeated_asks_are_answered_from_the_journal(tmp_path):
    problem, calls = toy_problem(), []
    run = RunDir.create(tmp_path / "r", {"method": "repeater"})
    s = Repeater(problem)
    run_search(s, problem, _counting(problem, calls), run)
    rows = run.results()
    assert len(rows) == 3 * 4 and len(calls) == 3 + 3      # the three repeated plans measured once
    cached = [r for r in rows if r.extra.get("cached")]
    assert len(cached) == 2 * 3 and all(r.seconds == 0.0 for r in cached)
    assert s.kls[0:3] == s.kls[4:7] == s.kls[8:11]          # the same answers every round


def test_failures_are_not_cached(tmp_path):
    problem, calls = toy_problem(), []
    run = RunDir.create(tmp_path / "r", {"method": "repeater"})
    run_search(Repeater(problem), problem, _counting(problem, calls, fail_seed=7), run)
    assert sum(c.fidelity.seed == 7 for c in calls) == 3 * 3    # retried every round
    assert not [r for r in run.results() if r.extra.get("cached")]


@pytest.mark.parametrize("kill_after", [1, 4, 6, 9])
def test_a_killed_run_resumes_to_the_same_journal(tmp_path, kill_after):
    problem = toy_problem()
    whole = RunDir.create(tmp_path / "whole", {"method": "repeater"})
    run_search(Repeater(problem), problem, _counting(problem, []), whole)
    killed = RunDir.create(tmp_path / "killed", {"method": "repeater"})
    written = [0]
    append = killed.append_result

    def dying_append(row):
        append(row)
        written[0] += 1
        if written[0] == kill_after:
            raise KeyboardInterrupt       # the process dies right after this row reached the journal

    killed.append_result = dying_append
    with pytest.raises(KeyboardInterrupt):
        run_search(Repeater(problem), problem, _counting(problem, []), killed)
    resumed = RunDir.open(tmp_path / "killed")
    run_search(Repeater(problem), problem, _counting(problem, []), resumed)

    def essence(run):
        return [(tuple(r.x), r.seed, r.kl, bool(r.extra.get("cached"))) for r in run.results()]

    assert essence(resumed) == essence(whole)
    assert all(math.isfinite(r.kl) for r in resumed.results())
