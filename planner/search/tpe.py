"""Optuna over integer level vectors, driven by ask/tell: TPE for KL alone, optuna's NSGA-II
sampler when sizes are objectives too (optuna's multi-objective TPE costs ~72 s per 1000 trials).

Each unit is one integer parameter (its ladder index, named after the unit, so optuna-dashboard
shows per-layer importances). A proposal over the budget is repaired with the shared operator; the
proposal is then told FAIL (user attr `over_budget`) and the repaired plan is enqueued and asked
as the trial that is measured, so the sampler only ever learns from plans that were measured. A
plan measured before is answered from the study without a new evaluation.

State. The study the sampler reads lives in memory, and the state carries its trials as compact
records, replayed into a fresh study on load (optuna's own journal holds ~60 kB per trial of 210
parameters; an SQLite storage commits every parameter, ~10 s per plan here). The sampler is
re-seeded from (run seed, proposal count) before every proposal, so a restored searcher proposes
exactly what an uninterrupted one would. With `storage` (`sqlite:///study.db`, any SQLAlchemy URL,
or a journal file path) every finished trial is also written, one transaction each, to the study
`study_name` there, which optuna-dashboard opens while the search runs; a resumed run continues
that same study where it stopped (trials already written are not written again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.problem import Problem
from planner.search.base import Candidate, Fidelity, Result, derive_seed, register
from planner.search.hypervolume import parse_objectives, plans_hypervolume, setup
from planner.search.operators import repair

X = tuple[int, ...]
_SEED_PATH = 0x7BE0          # tpe's data- and sampler-seed path
_STUDY = "planner-tpe"


@dataclass(frozen=True)
class TPEConfig:
    trials: int = 200              # plans measured (repaired proposals and re-proposals do not count)
    batch: int = 8                 # plans per ask (TPE: constant liar; NSGA-II sampler: its population)
    tokens: int = 1024             # the fixed batch every plan is measured on
    objectives: tuple[str, ...] = ("kl",)
    startup: int = 16              # random trials before TPE models (TPE only)
    storage: str | None = None     # sqlite:///study.db, another SQLAlchemy URL, or a journal file path
    study_name: str = _STUDY
    init_xs: tuple[tuple[int, ...], ...] = ()   # seed plans, measured first (repaired to the budget)

    def __post_init__(self) -> None:
        if self.trials < 1 or self.batch < 1 or self.tokens < 1 or self.startup < 0:
            raise PlannerError("tpe: trials >= 1, batch >= 1, tokens >= 1 and startup >= 0 are required")
        parse_objectives(self.objectives)


def open_storage(url: str):
    """An optuna storage from a URL (RDB) or a file path (journal file; optuna-dashboard reads both)."""
    import optuna

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(url))


@register("tpe", TPEConfig)
class TPESearcher:
    """Optuna TPE (one objective) or its NSGA-II sampler (KL and size) over level vectors."""

    method = "tpe"

    def __init__(self, problem: Problem, config: TPEConfig, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)   # a "trial finished" line per plan is noise
        self.config = config
        self.objectives, self.metrics, self.fusion, init_xs = setup("tpe", problem, config.objectives, config.init_xs)
        self.problem = problem = self.fusion.inner   # tie groups are one unit here; candidates name every member
        self.fill = not self.metrics
        self.dists = {u: optuna.distributions.IntDistribution(0, int(top))
                      for u, top in zip(problem.units, problem.n_levels - 1, strict=True)}
        self.seed = int(seed)
        self.fidelity = Fidelity(tokens=config.tokens, seed=derive_seed(seed, _SEED_PATH))
        self.asked = 0                 # proposals so far: the sampler seed of the next one
        self.told = 0                  # plans measured by this searcher
        self.batches = 0
        self.exhausted = False         # a whole batch of proposals brought no new plan
        self.queue: list[X] = list(init_xs)
        self.pending: list[tuple[int, X]] | None = None    # (trial number, plan) asked, not told
        self.failed: set[X] = set()
        self.history: list[tuple[int, float, float]] = []   # (batch, best KL within budget, hypervolume)
        self.study = self._open([])
        self.mirror = None if config.storage is None else optuna.create_study(
            storage=open_storage(config.storage), study_name=config.study_name,
            directions=self.study.directions, load_if_exists=True)
        self.mirror_base = 0 if self.mirror is None else len(self.mirror.trials)   # trials that were not ours

    # --- the study -------------------------------------------------------------------------
    def _open(self, records: list):
        import optuna

        study = optuna.create_study(study_name=self.config.study_name,
                                    directions=["minimize"] * (1 + len(self.metrics)))
        for state, x, values, user_attrs, system_attrs in records:
            study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState[state], params=dict(zip(self.problem.units, x, strict=True)),
                distributions=self.dists, values=values, user_attrs=user_attrs, system_attrs=system_attrs))
        return study

    def _publish(self) -> None:
        """Write the finished trials the storage lacks (all are finished after a tell)."""
        import optuna

        if self.mirror is None:
            return
        trials = self.study.get_trials(deepcopy=False)
        for t in trials[len(self.mirror.get_trials(deepcopy=False)) - self.mirror_base:]:
            self.mirror.add_trial(optuna.trial.create_trial(
                state=t.state, params=t.params, distributions=t.distributions, values=t.values,
                user_attrs=t.user_attrs, system_attrs={k: v for k, v in t.system_attrs.items() if k != "fixed_params"}))

    def _sampler(self):
        import optuna

        seed = derive_seed(self.seed, _SEED_PATH, self.asked)
        if self.metrics:
            return optuna.samplers.NSGAIISampler(population_size=self.config.batch, seed=seed)
        return optuna.samplers.TPESampler(n_startup_trials=self.config.startup, constant_liar=True, seed=seed)

    def _values(self, x: X, kl: float) -> float | list[float]:
        if not self.metrics:
            return kl
        c = self.problem.cost(x)
        return [kl, *(c.value(m) for m in self.metrics)]

    def measured(self) -> dict[X, float]:
        """Every plan measured in the study (failed: inf), from its trials."""
        from optuna.trial import TrialState

        out: dict[X, float] = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            out[tuple(int(t.params[u]) for u in self.problem.units)] = float(t.values[0])
        out.update({x: math.inf for x in self.failed})
        return out

    def _propose(self) -> tuple[int, X]:
        """One trial of a plan within the budget: (trial number, plan)."""
        self.study.sampler = self._sampler()
        rng = np.random.default_rng(derive_seed(self.seed, _SEED_PATH, self.asked, 1))
        self.asked += 1
        if self.queue:
            self.study.enqueue_trial(dict(zip(self.problem.units, self.queue.pop(0), strict=True)))
        trial = self.study.ask(self.dists)
        x = tuple(int(trial.params[u]) for u in self.problem.units)
        y = tuple(int(v) for v in repair(x, self.problem, rng, fill=self.fill))
        if y != x:
            trial.set_user_attr("over_budget", f"repaired into trial {trial.number + 1}")
            self.study.tell(trial, state=optuna_state("FAIL"))
            self.study.enqueue_trial(dict(zip(self.problem.units, y, strict=True)))
            trial = self.study.ask(self.dists)
        return trial.number, y

    # --- ask / tell ------------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        """A batch of new plans; asking again before `tell` returns the same batch."""
        if self.done():
            return []
        if self.pending is None:
            want = min(self.config.batch, self.config.trials - self.told)
            known, pending = self.measured(), []
            for _ in range(20 * want):
                if len({x for _, x in pending}) == want:
                    break
                number, x = self._propose()
                if x in known:                 # measured before: the study learns it again for free
                    self._tell_trial(number, x, known[x])
                else:
                    pending.append((number, x))
            self.exhausted = not pending
            self.pending = pending
        plans = list(dict.fromkeys(x for _, x in self.pending))
        return [Candidate(self.fusion.to_outer(x), self.fidelity, method=self.method, generation=self.batches)
                for x in plans]

    def _tell_trial(self, number: int, x: X, kl: float) -> None:
        if math.isfinite(kl):
            self.study.tell(number, self._values(x, kl))
        else:
            self.study.tell(number, state=optuna_state("FAIL"))

    def tell(self, results: list[Result]) -> None:
        if self.pending is None:
            raise PlannerError("tpe: tell() before ask()")
        kl = {self.fusion.to_inner(r.candidate.x): (r.kl if r.ok else math.inf) for r in results}
        for number, x in self.pending:
            k = kl.get(x, math.inf)
            if not math.isfinite(k):
                self.failed.add(x)
            self._tell_trial(number, x, k)
        self.told += len({x for _, x in self.pending})
        best = self._best()
        self.history.append((self.batches, self.measured()[best] if best else math.inf, self.hypervolume()))
        self.batches += 1
        self.pending = None
        self._publish()

    def done(self) -> bool:
        return self.told >= self.config.trials or self.exhausted

    def _ok(self) -> list[tuple[float, X]]:
        return [(k, x) for x, k in self.measured().items() if math.isfinite(k) and self.problem.feasible(x)]

    def _best(self) -> X | None:
        ok = self._ok()
        return min(ok)[1] if ok else None

    def best(self) -> X | None:
        best = self._best()
        return None if best is None else self.fusion.to_outer(best)

    def hypervolume(self) -> float:
        ok = self._ok()
        return plans_hypervolume(self.problem, self.objectives, [x for _, x in ok], [k for k, _ in ok])

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "asked": self.asked, "told": self.told, "batches": self.batches,
                 "exhausted": self.exhausted, "queue": [list(x) for x in self.queue],
                 "pending": None if self.pending is None else [[n, list(x)] for n, x in self.pending],
                 "failed": sorted(list(x) for x in self.failed), "history": [list(h) for h in self.history],
                 "storage": self.config.storage, "study_name": self.config.study_name, "mirror_base": self.mirror_base,
                 "trials": [trial_record(t, self.problem.units) for t in self.study.get_trials(deepcopy=False)]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("storage") != self.config.storage or state.get("study_name") != self.config.study_name:
            raise PlannerError(f"tpe: the checkpoint's study is {state.get('study_name')!r} in "
                               f"{state.get('storage')!r}, not {self.config.study_name!r} in {self.config.storage!r}")
        self.seed = int(state["seed"])
        self.fidelity = Fidelity(tokens=self.config.tokens, seed=derive_seed(self.seed, _SEED_PATH))
        self.asked, self.told, self.batches = int(state["asked"]), int(state["told"]), int(state["batches"])
        self.exhausted = bool(state["exhausted"])
        self.queue = [tuple(int(v) for v in x) for x in state["queue"]]
        self.pending = None if state["pending"] is None else [(int(n), tuple(int(v) for v in x))
                                                              for n, x in state["pending"]]
        self.failed = {tuple(int(v) for v in x) for x in state["failed"]}
        self.history = [(int(b), float(k), float(h)) for b, k, h in state["history"]]
        self.mirror_base = int(state["mirror_base"])
        self.study = self._open(state["trials"])


def optuna_state(name: str):
    from optuna.trial import TrialState

    return TrialState[name]


def trial_record(t, units) -> list:
    """[state, x, values, user_attrs, system_attrs] of a trial; enqueue bookkeeping dropped."""
    system = {k: v for k, v in t.system_attrs.items() if k != "fixed_params"}
    return [t.state.name, [int(t.params[u]) for u in units], t.values, dict(t.user_attrs), system]
