"""Sensitivity in the pipeline: compute (or reuse) a score for a prepared session and turn it into
the data the proxy searchers take (`damage` rows, `base_ppl`, evo's `init_x`).

Works on a `planner.pipeline.Session` (duck-typed; the pipeline imports this module, not the
reverse). The score is computed on a fresh fp32 copy of the model, because the session's model is
held in the evaluation dtype with gradients off.
"""

from __future__ import annotations

import dataclasses

import torch

from planner.budget import Budget, Metric
from planner.errors import PlannerError
from planner.model.families import family_of
from planner.model.load import load_model
from planner.problem import Problem
from planner.search.bisect import BisectConfig
from planner.search.ilp import damage_table, exact_plan, proxy_fidelity
from planner.sensitivity.score import (
    Score,
    Sensitivity,
    SensitivityConfig,
    cache_path,
    compute_sensitivity,
    load_cached,
    save_cached,
)

PROXY_METHODS = ("ilp", "lagrange", "hessian")   # searchers that take `damage` rows
# fisher: on the default model its exact plan measured best at 2.5, 3.0 and 4.0 bits and within 2.5%
# of the best at 3.5, at under a third of hutchinson's cost (reports/hessian_vs_evo.txt)
DEFAULT_SCORE = SensitivityConfig.score


def parse_score(name: str | None) -> Score:
    try:
        return Score(name or DEFAULT_SCORE.value)
    except ValueError:
        raise PlannerError(f"unknown sensitivity score {name!r}: choose one of "
                           f"{', '.join(s.value for s in Score)}") from None


def session_sensitivity(session, config: SensitivityConfig) -> Sensitivity:
    """The score for this session's model, calibration windows and levels DB (cached next to the DB)."""
    cached = load_cached(session.db, config)
    if cached is not None:
        return cached
    spec = session.spec
    model = load_model(spec.model, dtype=torch.float32, trust_remote_code=spec.trust_remote_code).model
    blocks = family_of(model.config.model_type).blocks
    calib = session.windows.ids[session.windows.calib]
    total = {Score.NOISE: len(session.units), Score.PROXY: None}.get(config.score, config.max_probes)
    with session.bar(total=total, desc=f"sensitivity ({config.score.value})") as bar:
        sens = compute_sensitivity(model, session.units, session.db, calib, blocks, config, bar)
    save_cached(session.db, config, sens)
    return sens


def needs_sensitivity(method: str, init: str | None, config: dict | None = None) -> bool:
    """Proxy searchers, evo's hessian warm start and evo's offspring screen rank by predicted damage."""
    config = config or {}
    screened = method == "evo" and int(config.get("screen", 1)) > 1 and config.get("damage") is None
    return method in PROXY_METHODS or init == "hessian" or screened


def proxy_inputs(session, problem: Problem, run, method: str, config: dict, init: str | None, score: str | None,
                 seed: int) -> dict:
    """`config` completed with the data a proxy searcher (or evo's hessian warm start) needs."""
    sens = session_sensitivity(session, SensitivityConfig(score=parse_score(score)))
    rows = sens.rows(problem)
    if run is not None:
        run.write("sensitivity.json", {"score": sens.score, "units": list(sens.units), "value": list(sens.value),
                                       "stderr": list(sens.stderr), "probes": sens.probes, "seconds": sens.seconds,
                                       "damage": rows})
    config = dict(config)
    if method in PROXY_METHODS:
        config.setdefault("damage", rows)
        config["score"] = sens.score
    if method == "hessian" and config.get("max_ppl_increase") is not None and config.get("base_ppl") is None:
        fid = proxy_fidelity(int(config.get("tokens", BisectConfig.tokens)), seed)
        idx = session.windows.draw(fid.tokens, fid.seed)
        config["base_ppl"] = session.evaluator(problem).score(None, idx).ppl
    if method == "evo" and int(config.get("screen", 1)) > 1:
        config.setdefault("damage", rows)
    if method == "evo" and init == "hessian" and config.get("init_x") is None:
        config["init_x"] = [int(v) for v in exact_plan(problem, damage_table(problem, rows))]
    return config


def max_budget(problem: Problem) -> Budget:
    """The cost of the most expensive plan, in bits: the budget of a run that only has a target."""
    return Budget(problem.cost(problem.n_levels - 1).bits, Metric.BITS)


def problem_for(session, budget: Budget | None, tie_fused: bool = False) -> Problem:
    """The session's problem for `budget` (None: the most expensive plan, for accuracy targets);
    `tie_fused` ties each fused group (q/k/v, gate/up) to one level."""
    if budget is None:
        budget = max_budget(session.db.problem(session.units, Budget(1.0, Metric.BITS)))
    problem = session.problem(budget)
    if tie_fused and not problem.members:   # fused: each group one unit for every searcher
        problem = dataclasses.replace(problem, ties=tuple(u.group for u in session.units), _index={}).fused()
    return problem


def target_config(method: str, max_kl: float | None, max_ppl_increase: str | float | None, tokens: int) -> dict:
    """A proxy searcher's config from the CLI's target flags ('2%' or 0.02 for a ppl increase)."""
    config: dict = {"tokens": int(tokens)}
    if method != "hessian":
        if max_kl is not None or max_ppl_increase is not None:
            raise PlannerError("--max-kl/--max-ppl-increase need --method hessian")
        return config
    if max_kl is not None:
        config["max_kl"] = float(max_kl)
    if max_ppl_increase is not None:
        text = str(max_ppl_increase).strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise PlannerError(f"malformed --max-ppl-increase {text!r}: use e.g. 2% or 0.02") from None
        config["max_ppl_increase"] = value
    return config


def summary(sens: Sensitivity, db, config: SensitivityConfig, top: int) -> str:
    """The `top` units by predicted damage at their cheapest level, with the score's per-unit value."""
    worst = {u: max(levels.values()) for u, levels in sens.damage.items()}
    order = sorted(range(len(sens.units)), key=lambda i: -worst[sens.units[i]])
    lines = [f"sensitivity {sens.score}: {len(sens.units)} units, {sens.probes} probes, {sens.seconds:.1f} s "
             f"(cached: {cache_path(db, config)})",
             f"{'unit':<44} {'value':>11} {'stderr':>10} {'damage@cheapest':>16}"]
    for i in order[:top]:
        u = sens.units[i]
        lines.append(f"{u:<44} {sens.value[i]:>11.4g} {sens.stderr[i]:>10.3g} {worst[u]:>16.4g}")
    return "\n".join(lines)
