"""The verbs a user runs, as library functions (the CLI only parses arguments and prints):

    session = prepare(ModelData(...), space)        # model, data windows, levels DB (cached)
    problem = session.problem(budget)
    problem = prune_levels(session, problem, space.prune_levels)   # optional: dominated levels out
    run_method(session, problem, run, ...)            # uniform baselines, then the chosen searcher
    finish(session, problem, run)                     # held-out measurement, pareto.json, best_plan.json
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from planner.budget import Budget
from planner.data.corpus import load_text
from planner.data.windows import Windows, make_windows, tokenize
from planner.errors import PlannerError
from planner.evaluate.evaluator import InProcessEvaluator
from planner.levels.db import LevelsDB, build_levels
from planner.model.load import LoadedModel, fingerprint, load_model
from planner.plan import Plan
from planner.problem import Problem
from planner.rundir import Row, RunDir
from planner.search import make_searcher, run_search
from planner.sensitivity import needs_sensitivity, proxy_inputs
from planner.space import PruneLevels, SearchSpace, Tie
from planner.units import Unit, plan_units, subblock_ties

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelData:
    """Everything that decides the model, the token windows and hence the levels DB key."""

    model: str = "smollm2-135m"
    dataset: str = "builtin"
    text_field: str = "text"
    seqlen: int = 512
    calib_tokens: int = 8192
    eval_tokens: int = 8192
    seed: int = 0
    dtype: str = "bf16"          # evaluation dtype; levels are always built in fp32
    kl_topk: int | None = None   # KL over the reference's top-K tokens (+ tail); None: full vocabulary
    trust_remote_code: bool = False


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Session:
    spec: ModelData
    loaded: LoadedModel
    units: list[Unit]
    windows: Windows
    space: SearchSpace
    db: LevelsDB
    quiet: bool = False
    _evaluator: InProcessEvaluator | None = None
    cluster: object | None = None    # a planner.distributed.Cluster: evaluate on its Ray workers

    def problem(self, budget: Budget) -> Problem:
        p = self.db.problem(self.units, budget)
        if self.space.tie is not Tie.NONE:   # fused groups, whole sub-blocks or MoE experts take one level
            p = dataclasses.replace(p, ties=self._ties(), _index={}).fused()
        p.check_budget()
        return p

    def _ties(self) -> tuple[str, ...]:
        """Per unit, its tie id under the space's `tie:` ("": free)."""
        if self.space.tie is Tie.FUSED:        # q/k/v, gate/up
            return tuple(u.group for u in self.units)
        if self.space.tie is Tie.EXPERT:       # each MoE expert's matrices
            from planner.moe.experts import expert_ties

            return expert_ties(self.units)
        return subblock_ties(self.loaded.model, self.units)

    def evaluator(self, problem: Problem) -> InProcessEvaluator:
        if self._evaluator is None or self._evaluator.problem is not problem:
            if self.cluster is not None:   # same interface, same numbers (planner/distributed)
                self._evaluator = self.cluster.executor(self, problem)
                return self._evaluator
            self._evaluator = InProcessEvaluator(self.loaded.model, self.db, problem, self.windows,
                                                 dtype=DTYPES[self.spec.dtype], kl_topk=self.spec.kl_topk)
        return self._evaluator

    def bar(self, **kw):
        return tqdm(disable=self.quiet, dynamic_ncols=True, **kw)


def prepare(spec: ModelData, space: SearchSpace, quiet: bool = False, cluster=None) -> Session:
    """Load model and data, build (or reuse) the levels DB. Raises PlannerError on bad input.
    With a `cluster` (planner.distributed.Cluster) the DB is built and plans are scored on its workers."""
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    loaded = load_model(spec.model, dtype=torch.float32, trust_remote_code=spec.trust_remote_code)
    units = plan_units(loaded.model, space.units.value)
    text = load_text(spec.dataset, spec.text_field)
    windows = make_windows(tokenize(loaded.tokenizer, text), spec.seqlen, spec.calib_tokens, spec.eval_tokens, spec.seed)
    session = Session(spec, loaded, units, windows, space, db=None, quiet=quiet, cluster=cluster)  # type: ignore[arg-type]
    if any(u.expert >= 0 for u in units):   # MoE experts: levels from the tokens routed to each (planner/moe)
        from planner.moe.levels import build_expert_levels

        build_expert_levels(loaded.model, units, space, windows.ids[windows.calib], fingerprint(loaded.model),
                            progress_factory=lambda **kw: session.bar(**kw))
    build = build_levels
    if cluster is not None:
        from functools import partial

        from planner.distributed.levels import build_levels_distributed

        build = partial(build_levels_distributed, cluster, loaded.source, trust_remote_code=spec.trust_remote_code)
    session.db = build(loaded.model, units, space, windows.ids[windows.calib], fingerprint(loaded.model),
                       progress_factory=lambda **kw: session.bar(**kw))
    return session


def prune_levels(session: Session, problem: Problem, mode: PruneLevels) -> Problem:
    """`problem` with every ladder cut to the levels not dominated in (cost, proxy error), or to
    their lower convex hull (planner/levels/prune.py). Prune last, after a --target restriction or
    tie fusing: it judges each unit as the search will see it. The proxy errors tr(dW H dW^T) are
    computed once per levels DB and cached next to it (`planner sensitivity --score proxy`)."""
    if mode is PruneLevels.NONE:
        return problem
    from planner.levels.prune import prune
    from planner.sensitivity import Score, SensitivityConfig, session_sensitivity

    errors = session_sensitivity(session, SensitivityConfig(score=Score.PROXY)).rows(problem)
    pruned = prune(problem, errors, mode)
    log.info("prune_levels %s: %d of %d (unit, level) pairs kept", mode.value, int(pruned.n_levels.sum()),
             int(problem.n_levels.sum()))
    return pruned    # no new budget error: each metric's cheapest level survives; a budget above the least-error plan lets it in


class _Progress:
    """A progress bar advanced per evaluated candidate, with best KL and throughput."""

    def __init__(self, session: Session, total: int | None, desc: str, evaluator, initial: int = 0):
        self.bar = session.bar(total=total, desc=desc, unit="eval", initial=initial)
        self._evaluator, self.best, self.tokens, self.t0 = evaluator, math.inf, 0, time.perf_counter()
        evaluator.on_scored = lambda: self.bar.update(1)

    def evaluate(self, candidates):
        self.tokens += sum(c.fidelity.tokens for c in candidates)
        return self._evaluator.evaluate(candidates)

    @property
    def expect(self):
        """The executor's prefetch hint (the Ray executor's), or None."""
        return getattr(self._evaluator, "expect", None)

    def on_result(self, row: Row) -> None:
        if row.error is None and row.label != "parent":
            self.best = min(self.best, row.kl)
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        workers = getattr(self._evaluator, "summary", None)     # Ray executor: per-worker tok/s, utilisation
        self.bar.set_postfix_str(f"gen {row.generation} best KL {self.best:.4f} {rate:.0f} tok/s"
                                 + (f" [{workers()}]" if workers else ""), refresh=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._evaluator.on_scored = None
        self.bar.close()


def run_method(session: Session, problem: Problem, run: RunDir, method: str, config: dict, seed: int,
               uniform_tokens: int, init: str = "uniform", score: str | None = None) -> tuple[int, ...]:
    """Uniform baselines first (they are the yardstick and evo's warm start), then `method`.

    `init` warm-starts evo: "uniform" (the best uniform plan or mix within budget), "hessian" (the
    exact knapsack plan of the sensitivity `score`) or a plan file. The proxy searchers (ilp,
    lagrange, hessian) get their predicted damage from the sensitivity `score` (planner.sensitivity)."""
    evaluator = session.evaluator(problem)
    if session.cluster is not None:
        session.cluster.dispatcher.log = run.path / "workers.jsonl"   # per-worker throughput, utilisation
    done = {}
    for r in run.results():
        done[r.method] = done.get(r.method, 0) + 1
    uniform = make_searcher("uniform", problem, {"tokens": uniform_tokens, "include_over_budget": True}, seed)
    with _Progress(session, len(uniform.ask()), "uniform baselines", evaluator, done.get("uniform", 0)) as pr:
        run_search(uniform, problem, pr.evaluate, run, on_result=pr.on_result, checkpoint="checkpoint.uniform.json",
                   expect=pr.expect)
    if method == "uniform":
        if uniform.best() is None:
            raise PlannerError(f"no uniform plan or two-level mix meets {problem.budget}: search with --method evo")
        return uniform.best()
    config = dict(config)
    if needs_sensitivity(method, init, config):
        config = proxy_inputs(session, problem, run, method, config, init, score, seed)
    if "moe-lp" in (method, init):     # expert statistics -> the MC-MoE program (planner/moe)
        from planner.moe.plan import moe_inputs

        config = moe_inputs(session, problem, run, method, config, init)
    if method == "evo" and config.get("init_x") is None:
        start = uniform.best() if init == "uniform" else problem.encode(Plan.load(init))
        config["init_x"] = None if start is None else list(start)   # None (no uniform plan fits): fill_uniform
    if method in POPULATION_METHODS and not config.get("init_xs"):
        config["init_xs"] = _seed_plans(session, problem, uniform, init, score, seed)
    searcher = make_searcher(method, problem, config, seed)
    total = _expected_evals(method, config, searcher)
    with _Progress(session, total, method, evaluator, done.get(method, 0)) as pr:
        run_search(searcher, problem, pr.evaluate, run, on_result=pr.on_result, expect=pr.expect)
    return searcher.best()


POPULATION_METHODS = ("nsga2", "tpe")     # seeded with every uniform plan within budget (+ the --init plan)


def _seed_plans(session: Session, problem: Problem, uniform, init: str, score: str | None, seed: int) -> list:
    """The --init plans (a file; hessian: the Lagrangian hull of the sensitivity `score`, proxy-
    optimal plans for 16 sizes up to the budget), then the uniform plans and mixes within budget,
    lowest KL first: a population starts from every baseline."""
    first = []
    if init == "hessian":
        hull = proxy_inputs(session, problem, None, "lagrange", {"points": 16}, None, score, seed)
        first = [list(x) for x, _, _ in make_searcher("lagrange", problem, hull, seed).plans]
    elif init != "uniform":
        first = [list(problem.encode(Plan.load(init)))]
    ok = sorted((kl, x) for x, kl in uniform.results if math.isfinite(kl) and problem.feasible(x))
    return first + [list(x) for _, x in ok]


def _expected_evals(method: str, config: dict, searcher) -> int | None:
    c = getattr(searcher, "config", None)
    if method == "nsga2" and c is not None:
        return c.pop_size + (c.generations - 1) * (c.offspring or c.pop_size)
    if method == "tpe" and c is not None:
        return c.trials
    if method == "evo" and c is not None:
        per_gen = c.offspring + sum(s for s, _ in c.stages[:-1]) + 1
        return c.generations * per_gen + (2 * c.final_batches if c.init_x is not None else 0)
    return None


def measure(session: Session, problem: Problem, x, label: str, method: str) -> Row:
    """One plan on the held-out windows (never used by calibration or search)."""
    ev = session.evaluator(problem)
    t0 = time.perf_counter()
    s = ev.score(problem.decode(x), session.windows.heldout)
    cost = problem.cost(x)
    return Row(method=method, generation=-1, stage=-1, tokens=s.tokens, seed=-1, kl=s.kl, ppl=s.ppl,
               bits=cost.bits, bpw=cost.bpw, bytes=cost.nbytes, plan_id=problem.decode(x).id,
               x=[int(v) for v in x], seconds=time.perf_counter() - t0, label=label, extra=cost.hardware())


def finish(session: Session, problem: Problem, run: RunDir, best_x, method: str) -> list[Row]:
    """Held-out rows for the uniform levels within budget, the best uniform mix and the best plan
    (multi-objective runs: and up to 8 plans of the front merged over all the run's methods); then
    pareto.json (the non-dominated held-out rows) and best_plan.json. Rows already measured (a
    resumed run) are reused."""
    done = {r.label: r for r in run.heldout()}
    rows = [r for r in run.results() if r.method == "uniform" and r.error is None]
    wanted: list[tuple[str, tuple[int, ...], str]] = []
    for r in rows:
        if r.label.startswith("uniform "):     # one level id everywhere, or ladders that differ (pruned, --target)
            ids = set(problem.decode(r.x).as_dict().values())
            level = ids.pop() if len(ids) == 1 else f"rung {r.label.split()[1]}"
            wanted.append((f"uniform {level}", tuple(r.x), "uniform"))
    mixes = [r for r in rows if r.label.startswith("mix ")]
    if mixes:
        m = min(mixes, key=lambda r: r.kl)
        wanted.append((f"best mix ({m.label.split(' ', 2)[2]})", tuple(m.x), "uniform"))
    wanted.append(("best", tuple(int(v) for v in best_x), method))
    wanted += _front_plans(run, method)
    total = sum(1 for label, _, _ in wanted if label not in done)
    with session.bar(total=total, desc="held-out evaluation", unit="plan") as bar:
        for label, x, meth in wanted:
            if label not in done:
                done[label] = measure(session, problem, x, label, meth)
                run.append_heldout(done[label])
                bar.update(1)
    out = [done[label] for label, _, _ in wanted]
    run.write("pareto.json", [asdict(r) for r in pareto(out)])
    best = done["best"]
    run.write("best_plan.json", problem.decode(best.x).to_json(
        bits=best.bits, bpw=best.bpw, bytes=best.bytes, heldout_kl=best.kl, heldout_ppl=best.ppl,
        heldout_tokens=best.tokens, method=method, budget=str(problem.budget)))
    return out


def _front_plans(run: RunDir, method: str, n: int = 8) -> list[tuple[str, tuple[int, ...], str]]:
    """Multi-objective runs: up to `n` plans of the search front (all methods of the run merged,
    within budget), spread evenly over size, for held-out measurement ("front k/m")."""
    from planner.report.tables import load_runs
    from planner.search import make_config

    if method not in POPULATION_METHODS:
        return []
    objectives = make_config(method, run.config.get("method_config")).objectives
    if len(objectives) < 2:
        return []
    runs = load_runs([run.path])
    size = "latency" if objectives[1] == "latency" else runs.budget.metric.value   # kl,latency: spread over latency
    front = runs.plans[runs.plans[f"front_{size}"]].sort_values(size)
    m = min(n, len(front))
    pick = sorted({round(i * (len(front) - 1) / max(m - 1, 1)) for i in range(m)})      # both ends included
    return [(f"front {k + 1}/{len(pick)}", tuple(runs.xs[pid]), front.method[pid])
            for k, pid in enumerate(front.index[pick])]


def pareto(rows: list[Row]) -> list[Row]:
    """Rows not dominated on (bits, kl), sorted by bits."""
    ok = sorted((r for r in rows if r.error is None and math.isfinite(r.kl)), key=lambda r: (r.bits, r.kl))
    front, best_kl = [], math.inf
    for r in ok:
        if r.kl < best_kl:
            front.append(r)
            best_kl = r.kl
    return front


def base_scores(session: Session, problem: Problem):
    """The unmodified model on the held-out windows (KL 0 by construction; its perplexity)."""
    return session.evaluator(problem).score(None, session.windows.heldout)
