"""How one `evaluate()` call becomes tasks for a pool of workers, and how their sums become Scores.

Candidates that share a fidelity share their token windows, which the evaluator scores in batches
of `batch_windows` windows. A fidelity group is therefore a grid, candidates x window batches, and
a task is one rectangle of it: a chunk of candidates on a run of consecutive batches.

- Splitting the *batches* costs nothing: the evaluator's prefix cache computes the anchor's
  block inputs once per batch anyway, and the base model's reference distribution is needed
  once per window either way. Workers return per-batch *sums* (not means) and the driver folds
  them in batch order, exactly as the in-process evaluator does, so the KL is bit-identical.
- Splitting the *candidates* costs one extra anchor pass per batch per extra chunk (each chunk
  caches its own prefix). It is still worth it when a group has fewer batches than workers
  (EvoPress's first stage: 128 offspring on one window).

`split()` picks the grid from a small cost model (in full forward passes of one batch, from the
candidates' first differing blocks, as the evaluator computes them) that minimizes the estimated
makespan on `workers` workers, preferring fewer tasks on ties. numpy only: no torch, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Forward-pass costs of scoring plans on one batch, relative to one full forward."""

    blocks: np.ndarray        # [U] decoder block of every unit
    n_blocks: int
    head_blocks: float = 0.0  # lm_head + log-softmax, in units of one decoder block

    @property
    def full(self) -> float:
        return self.n_blocks + self.head_blocks

    def suffixes(self, X: np.ndarray) -> np.ndarray:
        """Per plan, the cost of its suffix from the first block where it leaves the group's anchor
        (the per-unit majority level, as the evaluator picks it)."""
        anchor = np.array([np.bincount(col).argmax() for col in X.T])
        diff = X != anchor
        first = np.where(diff.any(1), np.where(diff, self.blocks[None, :], self.n_blocks).min(1), self.n_blocks)
        # a plan equal to the anchor still re-runs the last block (the evaluator needs its output)
        return (self.n_blocks - np.minimum(first, self.n_blocks - 1) + self.head_blocks) / self.full

    def chunk(self, suffix: np.ndarray) -> float:
        """One chunk of plans on one batch: the anchor's pass (only when two or more share it)
        plus their suffixes; a lone plan is one full forward."""
        if len(suffix) < 2:
            return float(len(suffix))
        return self.n_blocks / self.full + float(suffix.sum())


@dataclass(frozen=True)
class Task:
    group: int
    members: tuple[int, ...]   # positions in the group's candidate list
    batches: tuple[int, ...]   # consecutive window-batch indices of the group
    cost: float                # estimated, in full forwards of one batch


def _balanced(suffix: np.ndarray, parts: int) -> list[list[int]]:
    """Candidates dealt into `parts` chunks of about equal suffix cost (longest first, to the
    lightest chunk): contiguous slices would leave one worker with all the long suffixes."""
    bins: list[list[int]] = [[] for _ in range(parts)]
    load = np.zeros(parts)
    for i in np.argsort(-suffix, kind="stable"):
        j = int(load.argmin())
        bins[j].append(int(i))
        load[j] += suffix[i]
    return [sorted(b) for b in bins if b]


def _chunks(n: int, parts: int) -> list[range]:
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def split(group: int, X: np.ndarray | None, n_batches: int, workers: int, cost: CostModel) -> list[Task]:
    """Tasks for one fidelity group: X [K, U] level vectors (None: a single plan), `n_batches`
    window batches, scored on `workers` workers."""
    suffix = cost.suffixes(X) if X is not None and len(X) > 1 else np.ones(1 if X is None else len(X))
    K = len(suffix)
    best: tuple[float, int, list[list[int]], list[float], list[range]] | None = None
    for c in sorted({*range(1, min(K, workers) + 1), K}):
        members = _balanced(suffix, c)
        per_batch = [cost.chunk(suffix[m]) for m in members]
        for b in range(1, min(n_batches, 2 * workers) + 1):
            runs = _chunks(n_batches, b)
            n_tasks = len(members) * len(runs)
            span = max(math.ceil(n_tasks / workers) * max(per_batch) * max(len(r) for r in runs),
                       sum(per_batch) * n_batches / workers)
            if best is None or (round(span, 9), n_tasks) < best[:2]:
                best = (round(span, 9), n_tasks, members, per_batch, runs)
    _, _, members, per_batch, runs = best
    return [Task(group, tuple(m), tuple(r), pb * len(r)) for m, pb in zip(members, per_batch, strict=True) for r in runs]


def lpt_order(tasks: list[Task]) -> list[int]:
    """Longest task first: greedy list scheduling on idle workers then ends within 4/3 of optimal."""
    return sorted(range(len(tasks)), key=lambda i: -tasks[i].cost)


def fold(batch_sums: np.ndarray, n_windows: int, seqlen: int):
    """Per-batch (kl, nll) sums of one plan -> Scores, summed in batch order from 0.0 and divided
    exactly as the in-process evaluator does (its `_scores`), so the results are bit-identical."""
    from planner.evaluate.kl import Scores  # imports torch: not for the scheduling side

    kl = nll = 0.0
    for k, n in batch_sums:
        kl, nll = kl + float(k), nll + float(n)
    return Scores(kl=kl / (n_windows * seqlen), nll=nll / (n_windows * (seqlen - 1)), tokens=n_windows * seqlen)
