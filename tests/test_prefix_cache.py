"""Prefix caching must not change a single bit of the fitness (fp32), and must skip blocks."""

from __future__ import annotations

import numpy as np
import pytest

from planner.budget import parse_budget
from planner.search.operators import level_switch


def _offspring_and_full_scores(tiny_sessions, seed: int, window_seed: int):
    """fp32 evaluator, six one-switch offspring of an all-level-1 parent plus the parent, their
    windows, and every plan's full-forward scores (the reference the cache must reproduce)."""
    session = tiny_sessions("fp32")
    problem = session.problem(parse_budget("3.0bits"))
    ev = session.evaluator(problem)
    rng = np.random.default_rng(seed)
    parent = np.full(problem.n_units, 1)
    xs = [tuple(int(v) for v in level_switch(parent, problem, rng, 1)) for _ in range(6)] + [tuple(parent)]
    windows = session.windows.draw(256, window_seed)
    return session, ev, xs, windows, [ev.score(problem.decode(x), windows) for x in xs]


def test_cached_equals_uncached_bit_exact(tiny_sessions, one_thread):
    _, ev, xs, windows, full = _offspring_and_full_scores(tiny_sessions, 0, 3)
    before = ev.blocks_run
    cached = ev.score_many(xs, windows)
    assert [s.kl for s in cached] == [s.kl for s in full]
    assert [s.nll for s in cached] == [s.nll for s in full]
    # without the cache: one full pass per plan per batch; with it: the anchor's pass plus suffixes
    batches = len(ev._batches(np.asarray(windows)))
    assert ev.blocks_run - before <= (len(xs) + 1) * ev.n_blocks * batches


@pytest.mark.parametrize("every", [2, 1000])
def test_checkpoints_every_k_blocks_stay_bit_exact(tiny_sessions, one_thread, every):
    """A cache too small for every block's input keeps every k-th (checkpoints); plans resume from
    the checkpoint at or before their first changed block, and the fitness does not move a bit."""
    session, ev, xs, windows, full = _offspring_and_full_scores(tiny_sessions, 1, 5)
    per_block = len(windows) * session.windows.seqlen * ev.model.config.hidden_size * 4
    ev.prefix_cache_bytes = per_block * ev.n_blocks / every
    assert ev._checkpoint_stride(windows, ev.n_blocks) >= every     # the tiny model: only block 0 kept
    before = ev.blocks_run
    assert ev.score_many(xs, windows) == full
    batches = len(ev._batches(np.asarray(windows)))
    assert ev.blocks_run - before >= len(xs) * ev.n_blocks * batches      # every plan resumed from block 0


def test_anchor_runs_only_as_deep_as_the_plans_need(tiny_sessions, one_thread):
    """Plans that all leave the anchor in block 0 need only block 0's input: the anchor's pass stops
    there (a worker's chunk of early-diverging offspring pays a short pass), bit-exact still."""
    session = tiny_sessions("fp32")
    problem = session.problem(parse_budget("3.0bits"))
    ev = session.evaluator(problem)
    first_block = [u for u in range(problem.n_units) if problem.blocks[u] == 0][:3]
    xs = []
    for u in first_block:
        x = [1] * problem.n_units
        x[u] = 2
        xs.append(tuple(x))
    windows = session.windows.draw(256, 3)
    full = [ev.score(problem.decode(x), windows) for x in xs]
    before = ev.blocks_run
    assert ev.score_many(xs, windows) == full
    batches = len(ev._batches(np.asarray(windows)))
    assert ev.blocks_run - before == (1 + len(xs) * ev.n_blocks) * batches

def test_evaluate_groups_by_fidelity(tiny_sessions, one_thread):
    from planner.search.base import Candidate, Fidelity

    session = tiny_sessions("fp32")
    problem = session.problem(parse_budget("3.0bits"))
    ev = session.evaluator(problem)
    xs = [tuple([1] * problem.n_units), tuple([0] * problem.n_units)]
    cands = [Candidate(x, Fidelity(128, s)) for s in (1, 2) for x in xs]
    results = ev.evaluate(cands)
    assert [r.candidate for r in results] == cands
    for r in results:
        w = session.windows.draw(r.candidate.fidelity.tokens, r.candidate.fidelity.seed)
        assert r.kl == ev.score(problem.decode(r.candidate.x), w).kl


def test_topk_kl_is_a_tight_lower_bound():
    import torch

    from planner.evaluate.kl import kl_and_nll, reference

    torch.manual_seed(0)
    ref_logits = torch.randn(16, 500) * 3
    cand = ref_logits + torch.randn(16, 500) * 0.5
    ids = torch.randint(0, 500, (16,))
    full, _ = kl_and_nll(cand, reference(ref_logits), ids)
    top, nll_top = kl_and_nll(cand, reference(ref_logits, topk=64), ids)
    assert 0 < top <= full + 1e-4
    assert top > 0.5 * full
    assert kl_and_nll(ref_logits, reference(ref_logits, topk=64), ids)[0] == 0.0
    assert nll_top == kl_and_nll(cand, reference(ref_logits), ids)[1]
