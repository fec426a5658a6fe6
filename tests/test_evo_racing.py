"""Racing (multi-fidelity selection) in evo, with fitnesses known exactly: every stage keeps its
`survivors` best, the best offspring of a generation always reaches the last stage, and the
parent is replaced exactly when that offspring beats it on the paired last-stage batch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from planner.search import Candidate, Result, make_searcher
from planner.search.operators import fill_uniform
from tests.test_search_contract import toy_problem, true_kl, unit_errors

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


def _lying_racing(problem, start, generations):
    """Racing batches flatter every plan but the warm start; the final check's batches tell the truth
    (the warm start is the best plan)."""
    def evaluate(cands: list[Candidate]) -> list[Result]:
        out = []
        for c in cands:
            final = c.generation == generations
            kl = (0.0 if c.x == start else 1.0) if final else (0.6 if c.x == start else 0.5)
            out.append(Result(c, kl=kl, ppl=1.0))
        return out
    return evaluate


def test_final_check_returns_the_warm_start_when_the_parent_drifted_below_it():
    problem = toy_problem()
    start = tuple(int(v) for v in fill_uniform(problem, np.random.default_rng(7)))
    config = {"generations": 3, "offspring": 4, "stages": ((1, 128),), "init_x": start, "final_batches": 3}
    s = make_searcher("evo", problem, config, 0)
    evaluate = _lying_racing(problem, start, 3)
    while s.generation < 3:
        s.tell(evaluate(s.ask()))
    assert s.best() != start and not s.done()          # racing was fooled
    batch = s.ask()
    assert len(batch) == 6 and {c.label for c in batch} == {"parent", "warm start"}
    assert len({c.fidelity for c in batch}) == 3 and {c.fidelity.tokens for c in batch} == {128}
    t = make_searcher("evo", problem, config, 0)         # a JSON round trip in the middle of the check
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.ask() == batch
    t.tell(evaluate(batch))
    assert t.done() and t.best() == start and t.ask() == []


def test_final_check_keeps_an_improved_parent_and_costs_nothing_without_a_warm_start():
    problem = toy_problem()
    evaluate = _known(problem)
    s = make_searcher("evo", problem, {"generations": 4, "offspring": 8, "stages": STAGES}, 0)
    n = 0
    while not s.done():
        batch = s.ask()
        n += len(batch)
        s.tell(evaluate(batch))
    assert n == 4 * (8 + 4 + 2 + 1)                      # no final check: no warm start to guard
    start = tuple(int(v) for v in fill_uniform(problem, np.random.default_rng(3)))
    s = make_searcher("evo", problem, {"generations": 6, "offspring": 8, "stages": STAGES, "init_x": start}, 0)
    while not s.done():
        s.tell(evaluate(s.ask()))
    assert true_kl(problem, s.best()) <= true_kl(problem, start)


def _additive_damage(problem):
    """true_kl's per-unit part as [unit][level] rows: a sensitivity that is right but for the
    interaction term, as a Fisher score is."""
    table = unit_errors(problem, problem.code_bits / problem.numel[:, None]) * problem.numel[:, None] / problem.total_numel
    return [[float(v) for v in table[u, :problem.n_levels[u]]] for u in range(problem.n_units)]


@pytest.mark.parametrize("seed", range(3))
def test_screen_races_the_offspring_with_the_least_predicted_damage(seed):
    problem = toy_problem()
    damage = _additive_damage(problem)
    wide = make_searcher("evo", problem, {"offspring": 32, "stages": STAGES}, seed)   # the same rng draws
    screened = make_searcher("evo", problem, {"offspring": 8, "screen": 4, "stages": STAGES, "damage": damage}, seed)
    bred = [c.x for c in wide.ask()]
    raced = [c.x for c in screened.ask()]
    assert raced == sorted(bred, key=screened.predicted)[:8]
    assert screened.predicted(raced[-1]) <= np.median([screened.predicted(x) for x in bred])


def test_screen_finds_better_plans_for_the_same_measurements():
    problem = toy_problem()
    damage = _additive_damage(problem)
    config = {"generations": 8, "offspring": 8, "stages": ((2, 128), (1, 1024))}
    final = {}
    for screen in (1, 4):
        kls = []
        for seed in range(6):
            s = make_searcher("evo", problem, {**config, "screen": screen, "damage": damage}, seed)
            while not s.done():
                s.tell(_known(problem)(s.ask()))
            kls.append(true_kl(problem, s.best()))
        final[screen] = float(np.mean(kls))
    assert final[4] < final[1]


def test_screen_needs_a_damage_table():
    from planner.errors import PlannerError

    with pytest.raises(PlannerError, match="predicted damage"):
        make_searcher("evo", toy_problem(), {"screen": 4}, 0)


@pytest.mark.parametrize("name", ["paper", "fast", "cpu", "refine"])
def test_every_named_schedule_is_a_valid_config(name):
    from planner.search import make_config
    from planner.search.evo import SCHEDULES

    config = make_config("evo", {k: [list(v) for v in s] if k == "stages" else s for k, s in SCHEDULES[name].items()})
    assert config.stages[-1][0] == 1 and config.generations > 0


def test_a_screened_run_restored_from_json_mid_generation_continues_identically():
    problem = toy_problem()
    config = {"generations": 4, "offspring": 6, "screen": 3, "stages": STAGES, "damage": _additive_damage(problem)}
    whole = make_searcher("evo", problem, config, 5)
    while not whole.done():
        whole.tell(_known(problem)(whole.ask()))
    first = make_searcher("evo", problem, config, 5)
    for _ in range(5):                          # stop between ask and tell, mid-generation
        first.tell(_known(problem)(first.ask()))
    first.ask()
    resumed = make_searcher("evo", problem, config, 5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    while not resumed.done():
        resumed.tell(_known(problem)(resumed.ask()))
    assert resumed.best() == whole.best() and resumed.history == whole.history
