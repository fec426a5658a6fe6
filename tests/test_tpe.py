"""Optuna specifics: a study in `--storage` resumes as the same study after a kill, seed plans come
first, over-budget proposals are repaired (and told FAIL), several objectives use NSGA-II."""

from __future__ import annotations

import math
from dataclasses import asdict

import optuna
import pytest

from planner.rundir import RunDir
from planner.search import make_searcher, run_search
from tests.test_search_contract import drive, evaluator, toy_problem

CFG = {"trials": 24, "batch": 4, "startup": 4}


class Killed(Exception):
    pass


def _journal(run: RunDir) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in run.results()]


def _trials(url: str, name: str) -> list[tuple]:
    study = optuna.load_study(study_name=name, storage=url)
    return [(t.number, t.state, t.params, t.values, t.user_attrs) for t in study.trials]


def test_resumed_study_in_sqlite_continues_the_same_study(tmp_path):
    p = toy_problem()
    ref_run = RunDir.create(tmp_path / "ref", {"method": "tpe"})
    ref_url = f"sqlite:///{tmp_path / 'ref.db'}"
    ref = make_searcher("tpe", p, {**CFG, "storage": ref_url}, seed=5)
    run_search(ref, p, evaluator(p), ref_run)

    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = {**CFG, "storage": url}
    run = RunDir.create(tmp_path / "run", {"method": "tpe"})
    calls: list[int] = []
    evaluate = evaluator(p, calls=calls)

    def dying(cands):
        if len(calls) >= 3:
            raise Killed                     # after three batches were told and published
        return evaluate(cands)

    with pytest.raises(Killed):
        run_search(make_searcher("tpe", p, cfg, seed=5), p, dying, run)
    n_before = len(_trials(url, "planner-tpe"))
    assert n_before > 0

    resumed = make_searcher("tpe", p, cfg, seed=5)
    run_search(resumed, p, evaluate, run)
    assert _journal(run) == _journal(ref_run) and resumed.best() == ref.best()

    assert [s.study_name for s in optuna.get_all_study_summaries(storage=url)] == ["planner-tpe"]
    trials = _trials(url, "planner-tpe")
    assert len(trials) > n_before and trials == _trials(ref_url, "planner-tpe")   # continued, as if never killed
    assert [t[0] for t in trials] == list(range(len(trials)))
    complete = [t for t in trials if t[1] == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(run.results())                       # every measured plan once
    assert min(t[3][0] for t in complete) == pytest.approx(min(r.kl for r in run.results()))


def test_a_new_run_appends_to_an_existing_study(tmp_path):
    p = toy_problem()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    for seed in (0, 1):
        drive(make_searcher("tpe", p, {**CFG, "trials": 8, "storage": url}, seed=seed), p, evaluator(p))
    trials = optuna.load_study(study_name="planner-tpe", storage=url).trials
    assert [t.number for t in trials] == list(range(len(trials)))
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 16


def test_journal_file_storage_and_seed_plans_first(tmp_path):
    p = toy_problem()
    seed_x = tuple([1] * p.n_units)
    cfg = {**CFG, "storage": str(tmp_path / "study.log"), "init_xs": [list(seed_x)]}
    s = make_searcher("tpe", p, cfg, seed=0)
    batches = drive(s, p, evaluator(p))
    assert batches[0][0].x == seed_x
    study = optuna.load_study(study_name="planner-tpe", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log"))))
    assert study.trials[0].params[p.units[0]] == 1
    repaired = [t for t in study.trials if "over_budget" in t.user_attrs]
    assert repaired and all(t.state == optuna.trial.TrialState.FAIL for t in repaired)


def test_several_objectives_use_nsga2_and_report_sizes():
    p = toy_problem()
    s = make_searcher("tpe", p, {**CFG, "objectives": ["kl", "bits", "bpw"]}, seed=0)
    batches = drive(s, p, evaluator(p))
    assert isinstance(s._sampler(), optuna.samplers.NSGAIISampler)
    xs = [c.x for b in batches for c in b]
    assert len(xs) == len(set(xs)) == 24 and all(p.feasible(x) for x in xs)
    t = next(t for t in s.study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    x = tuple(t.params[u] for u in p.units)
    assert t.values[1:] == [pytest.approx(p.cost(x).bits), pytest.approx(p.cost(x).bpw)]
    assert all(math.isfinite(h) for _, _, h in s.history)
