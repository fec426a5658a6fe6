"""Racing (multi-fidelity selection) in evo, with fitnesses known exactly: every stage keeps its
`survivors` best, the best offspring of a generation always reaches the last stage, and the
parent is replaced exactly when that offspring beats it on the paired last-stage batch."""

from __future__ import annotations

import math

import pytest

from planner.search import Candidate, Result, make_searcher
from tests.test_search_contract import toy_problem, true_kl

STAGES = ((4, 128), (2, 256), (1, 1024))


def _known(problem):
    """Noise-free fitness, the same at every fidelity: racing must then select exactly."""
    def evaluate(cands: list[Candidate]) -> list[Result]:
        return [Result(c, kl=true_kl(problem, c.x), ppl=1.0) for c in cands]
    return evaluate


@pytest.mark.parametrize("seed", range(4))
def test_racing_keeps_the_best_of_each_stage_and_generation(seed):
    problem = toy_problem()
    s = make_searcher("evo", problem, {"generations": 6, "offspring": 12, "stages": STAGES}, seed)
    evaluate = _known(problem)
    while not s.done():
        population = None
        for stage, (survivors, tokens) in enumerate(STAGES):
            batch = s.ask()
            assert {c.stage for c in batch} == {stage} and {c.fidelity.tokens for c in batch} == {tokens}
            offspring = [c.x for c in batch if c.label != "parent"]
            if population is None:
                population = offspring
                best_child = min(population, key=lambda x: true_kl(problem, x))
            # this stage measures exactly the previous stage's `survivors` best
            assert best_child in offspring
            parent_before = s.best()
            s.tell(evaluate(batch))
            if stage < len(STAGES) - 1:
                ranked = sorted(offspring, key=lambda x: true_kl(problem, x))
                assert sorted(s.pending) == sorted(ranked[:survivors])
        # the last stage re-measured the parent beside its offspring, on the same batch
        assert any(c.label == "parent" and c.x == parent_before for c in batch)
        assert len({c.fidelity for c in batch}) == 1
        want = min([parent_before, best_child], key=lambda x: (true_kl(problem, x), x != parent_before))
        assert s.best() == want
        assert math.isclose(s.parent_kl, true_kl(problem, want))


def test_racing_parent_kl_never_rises_with_known_fitness():
    problem = toy_problem()
    s = make_searcher("evo", problem, {"generations": 10, "offspring": 8, "stages": STAGES}, 0)
    evaluate = _known(problem)
    while not s.done():
        s.tell(evaluate(s.ask()))
    kls = [kl for _, kl in s.history]
    assert len(kls) == 10 and all(b <= a for a, b in zip(kls, kls[1:], strict=False))
    assert kls[-1] < kls[0]
