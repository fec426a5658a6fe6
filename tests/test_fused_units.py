"""Fused groups (q/k/v, gate/up) as single units: every searcher keeps them on one level."""

from __future__ import annotations

import dataclasses

import numpy as np

from planner.budget import parse_budget
from planner.plan import Plan
from planner.rundir import problem_from_json, problem_to_json
from planner.search import REGISTRY, make_searcher


def _fused(tiny_sessions):
    session = tiny_sessions("fp32")
    p = session.db.problem(session.units, parse_budget("3.0bits"))
    tied = dataclasses.replace(p, ties=tuple(u.group for u in session.units), _index={})
    return session, p, tied.fused()


def test_fused_problem_keeps_costs_and_decodes_to_members(tiny_sessions):
    _, p, f = _fused(tiny_sessions)
    assert f.n_units == 4 * 2          # per block: qkv, o, gate_up, down
    assert f.model_units == p.units and f.total_numel == p.total_numel
    x = np.zeros(f.n_units, dtype=int)
    plan = f.decode(x)
    assert set(plan.as_dict()) == set(p.units)
    assert np.isclose(f.cost(x).bits, p.cost(p.encode(plan)).bits)
    assert np.isclose(f.cost(x).bpw, p.cost(p.encode(plan)).bpw)
    assert list(f.encode(plan)) == list(x)
    assert problem_from_json(problem_to_json(f)).members == f.members


def test_split_group_plan_is_refused(tiny_sessions):
    import pytest

    from planner.errors import BadPlan

    _, p, f = _fused(tiny_sessions)
    m = f.decode(np.zeros(f.n_units, dtype=int)).as_dict()
    q = next(u for u in m if u.endswith("q_proj"))
    m[q] = p.levels[p.units.index(q)][-1]
    with pytest.raises(BadPlan, match="fused"):
        f.encode(Plan.of(m))


def test_every_searcher_keeps_fused_groups_on_one_level(tiny_sessions, one_thread):
    from planner.search.base import Result

    _, _, f = _fused(tiny_sessions)
    for name in sorted(REGISTRY):
        s = make_searcher(name, f, {}, 0)
        for _ in range(3):
            cands = s.ask()
            if not cands:
                break
            for c in cands:
                plan = f.decode(c.x).as_dict()
                for group in f.members:
                    assert len({plan[n] for n in group}) == 1, name
            s.tell([Result(c, kl=float(sum(c.x)), ppl=1.0) for c in cands])


def test_fused_plan_evaluates(tiny_sessions, one_thread):
    session, _, f = _fused(tiny_sessions)
    from planner.evaluate.evaluator import InProcessEvaluator

    ev = InProcessEvaluator(session.loaded.model, session.db, f, session.windows, dtype=session.loaded.model.dtype)
    s = ev.score(f.decode(np.ones(f.n_units, dtype=int)), session.windows.heldout)
    assert s.kl > 0
