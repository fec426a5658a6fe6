"""How one `evaluate()` call becomes tasks for a pool of workers, and how their sums become Scores.

Candidates that share a fidelity share their token windows, which the in-process evaluator scores
in batches of `batch_windows` windows. A fidelity group is therefore a grid, candidates x windows,
and a task is one rectangle of it: a chunk of candidates on a run of consecutive windows.

What a task costs (CostModel, in full forwards of one window), per window of its run:
- the base model's reference distribution: one full forward, made once per window. Where several
  chunks share a window, the first chunk's task is its *producer*: it makes the reference and
  publishes the base model's final hidden states (references.py), and the other chunks' tasks
  fetch them and apply only the head (`fetch`: the object store's get, the transfer, the head).
  Without sharing (`fetch` None) every task on a window makes the reference. A window whose
  reference was made before its group was cut (`ready`: prefetched in the previous stage's tail,
  `prefetch()` its cost there) is fetched by every task on it, and produced by none;
- the anchor's pass (the chunk's per-unit majority plan, whose block inputs the prefix cache
  keeps) when two or more plans share it, then every plan's suffix from its first differing block;
and per forward *call* (one per batch the run touches, for the reference, the anchor and each plan)
a fixed cost, plus a fixed cost per task (a round trip, a result, swapping weights in).

So splitting the *windows* of a chunk is nearly free: the reference and anchor are per window
either way; a piece smaller than a batch costs only its smaller forward calls. Splitting the
*candidates* costs a fetched reference and an anchor pass per extra chunk per window; the
producer's chunk is cut smaller by the reference it makes, and producers are dispatched first so
that their references are ready when the consumers' first KL needs them. Both are needed for
enough, even tasks: EvoPress's first stage is 128 plans on one window (candidates only), its last
5 plans on 64 windows (windows only). `split()` tries every grid up to a few tasks per worker and
keeps the one with the shortest longest-first makespan, preferring fewer tasks on ties.

Workers return per-window *sums* (not means); the driver folds them exactly as the in-process
evaluator adds them (windows within a batch, then batches), so the KL is bit-identical as long as
a window's numbers do not depend on which windows share its forward (true of the CPU kernels,
tested; `atom=batch_windows` keeps every task on whole batches where that does not hold).
numpy only: no torch, no Ray.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Costs of scoring plans, in full forwards of one window."""

    blocks: np.ndarray        # [U] decoder block of every unit
    n_blocks: int
    head_blocks: float = 0.0  # lm_head + log-softmax, in units of one decoder block
    batch_windows: int = 4    # the in-process evaluator's batch
    reference: float = 1.0    # making a window's reference: one full forward of the base model
    call: float = 0.02        # one forward call (launches, Python) on top of its FLOPs
    task: float = 0.02        # one task (round trip, result, weight swaps)
    publish: float = 0.0      # the producer publishing a window's hidden states (the object store's put)
    fetch: float | None = None   # another task taking them (get, transfer, the head); None: not shared

    @property
    def full(self) -> float:
        return self.n_blocks + self.head_blocks

    def firsts(self, X: np.ndarray) -> np.ndarray:
        """Per plan, the first block where it leaves the anchor of X (the per-unit majority level,
        ties to the lowest, as the evaluator picks it); n_blocks for the anchor itself."""
        counts = (X[:, :, None] == np.arange(X.max() + 1)).sum(0)
        diff = X != counts.argmax(1)
        return np.where(diff, self.blocks[None, :], self.n_blocks).min(1)

    def suffixes(self, first: np.ndarray) -> np.ndarray:
        """Blocks a plan re-runs from the anchor's cached input (the anchor itself re-runs the last
        block: the evaluator needs its output), plus the head."""
        return (self.n_blocks - np.minimum(first, self.n_blocks - 1) + self.head_blocks) / self.full

    def anchor(self, first: np.ndarray) -> float:
        """The anchor's pass, up to the deepest block input a plan starts from (the evaluator's)."""
        return (int(np.minimum(first, self.n_blocks - 1).max()) + 1) / self.full

    def plans(self, X: np.ndarray) -> float:
        """Scoring the plans X together on one window, the reference aside: a lone plan is one full
        forward, two or more share the anchor's pass."""
        if len(X) < 2:
            return float(len(X))
        first = self.firsts(X)
        return self.anchor(first) + float(self.suffixes(first).sum())

    def refs(self, chunks: int, chunk: int, ready: bool = False) -> float:
        """Per window, the reference cost of the task of chunk `chunk` of `chunks` on the same windows:
        chunk 0 makes (and, shared, publishes) it, the others fetch it when it is shared; every chunk
        fetches it when it is `ready` (published before this group was cut: a prefetch)."""
        if self.fetch is not None and ready:
            return self.fetch
        if self.fetch is None or chunks < 2:
            return self.reference
        return self.reference + self.publish if chunk == 0 else self.fetch

    def prefetch(self, n_windows: int) -> float:
        """A task that only makes and publishes the references of `n_windows` windows (for a later
        group: the next stage's windows, made in this stage's tail), with its fixed costs."""
        return n_windows * (self.reference + self.publish) + self.batches(0, n_windows) * self.call + self.task

    def batches(self, start: int, stop: int) -> int:
        """In-process batches that windows start..stop-1 touch: a worker's forward calls per plan."""
        return (stop - 1) // self.batch_windows - start // self.batch_windows + 1

    def run(self, per_window: float, n_plans: int, start: int, stop: int, refs: float | None = None) -> float:
        """Plans costing `per_window` (`plans()`) on windows start..stop-1, their references costing
        `refs` in all (`refs()` summed over the windows; default: each made here), without a task's
        fixed cost."""
        calls = self.batches(start, stop) * (1 + n_plans + (n_plans >= 2))
        ref = (stop - start) * self.reference if refs is None else refs
        return ref + (stop - start) * per_window + calls * self.call

    def inprocess(self, X: np.ndarray, n_windows: int) -> float:
        """The in-process evaluator's cost of a whole group (one worker, no task overhead)."""
        return self.run(self.plans(X), len(X), 0, n_windows)


@dataclass(frozen=True)
class Task:
    group: int
    members: tuple[int, ...]   # positions in the group's candidate list
    start: int                 # windows start..stop-1 of the group (positions in its window list)
    stop: int
    cost: float                # estimated, in full forwards of one window
    produces: bool = False     # makes and publishes its windows' references for the other chunks on them

    @property
    def windows(self) -> range:
        return range(self.start, self.stop)


def _chunks(first: np.ndarray, parts: int, cost: CostModel, unready: float = 1.0) -> list[list[int]]:
    """Candidates cut into at most `parts` chunks of about equal cost, each a run of the candidates
    sorted by first differing block: a chunk that leaves the anchor early then pays a short anchor
    pass (the evaluator runs it only as deep as its plans need). The first chunk also carries what
    making the references costs more than fetching them (it is their producer when they are shared),
    on the `unready` share of the windows (the others were prefetched). Bisection on the largest chunk."""
    order = [int(i) for i in np.argsort(first, kind="stable")]
    suffix = (cost.suffixes(first) + cost.call).tolist()      # a plan's suffix and its forward call
    anchor = [cost.anchor(first[i:i + 1]) for i in range(len(first))]   # a run's anchor: its last plan's
    lead = (cost.refs(parts, 0) - cost.refs(parts, 1)) * unready

    def cut(limit: float) -> list[list[int]]:
        out: list[list[int]] = []
        load = 0.0
        for i in order:
            if out and load + suffix[i] + anchor[i] <= limit:
                out[-1].append(i)
                load += suffix[i]
                continue
            load = suffix[i] + (lead if not out else 0.0)
            out.append([i])
        return out

    lo, hi = 0.0, anchor[order[-1]] + sum(suffix) + lead + 1e-9
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if len(cut(mid)) <= parts else (mid, hi)
    return [sorted(c) for c in cut(hi)]


def _runs(n: int, parts: int, atom: int) -> list[tuple[int, int]]:
    """`parts` runs of consecutive windows of about equal length, cut only at multiples of `atom`."""
    atoms = -(-n // atom)
    edges = np.linspace(0, atoms, min(parts, atoms) + 1).round().astype(int) * atom
    return [(int(a), int(min(b, n))) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def lpt_makespan(costs: list[float], workers: int, busy: Sequence[float] = ()) -> float:
    """Makespan of longest-first list scheduling on `workers` identical workers, the first of them
    `busy` that long first (still making a previous stage's filler): when the last task ends."""
    free = sorted([*busy, *[0.0] * (workers - len(busy))])
    end = 0.0
    for c in sorted(costs, reverse=True):
        end = max(end, free[0] + c)
        heapq.heapreplace(free, free[0] + c)
    return end


def split(group: int, X: np.ndarray | None, n_windows: int, workers: int, cost: CostModel,
          atom: int = 1, per_worker: int = 4, ready: Collection[int] = (), busy: Sequence[float] = ()) -> list[Task]:
    """Tasks for one fidelity group: X [K, U] level vectors (None: a single plan) on `n_windows`
    windows, scored on `workers` workers; window runs are cut at multiples of `atom` windows, and
    grids of more than `per_worker` tasks a worker are not tried (their overheads only add).
    `ready`: positions of windows whose references were published before (prefetched): every task
    fetches those, and none produces them. `busy`: how long some workers are still expected to be
    busy (fillers), which longest-first scheduling fills around."""
    X = np.zeros((1, len(cost.blocks)), dtype=int) if X is None else np.asarray(X)
    first = cost.firsts(X)
    is_ready = np.zeros(n_windows, dtype=bool)
    is_ready[list(ready)] = cost.fetch is not None
    unready = 1.0 - is_ready.mean() if n_windows else 1.0
    best: tuple[float, int, list[Task]] | None = None
    chunkings = {tuple(map(tuple, _chunks(first, c, cost, unready))) for c in range(1, min(len(X), workers) + 1)}
    for members in sorted(chunkings, key=lambda m: (len(m), m)):
        per_window = [cost.plans(X[list(m)]) for m in members]
        for p in range(1, max(1, per_worker * workers // len(members)) + 1):
            runs = _runs(n_windows, p, atom)
            if len(runs) < p:           # no more windows to cut
                break
            tasks = []
            for c, (m, pw) in enumerate(zip(members, per_window, strict=True)):
                for a, b in runs:
                    fetched = int(is_ready[a:b].sum())
                    refs = fetched * cost.refs(len(members), c, ready=True) + (b - a - fetched) * cost.refs(len(members), c)
                    produces = c == 0 and len(members) > 1 and cost.fetch is not None and fetched < b - a
                    tasks.append(Task(group, m, a, b, cost.run(pw, len(m), a, b, refs) + cost.task, produces))
            costs = [t.cost for t in tasks]
            if best is not None and max(max(costs), sum(costs) / workers) > best[0]:
                continue                # its lower bound is already worse
            key = (round(lpt_makespan(costs, workers, busy), 9), len(tasks))
            if best is None or key < best[:2]:
                best = (*key, tasks)
    return best[2]


def spread(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix is spread evenly over the range (bit-reversed): the order
    in which a stage's windows are prefetched, so that however many get done, each run of windows
    the stage is later cut into holds about its share of them, and its tasks stay about equal."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))


def lpt_order(tasks: list[Task]) -> list[int]:
    """Producers first (their references are ready sooner, and a consumer is never handed out before
    the producer of its windows), then longest first: greedy list scheduling on idle workers ends
    within 4/3 of optimal."""
    return sorted(range(len(tasks)), key=lambda i: (not tasks[i].produces, -tasks[i].cost))


def fold(window_sums: np.ndarray, seqlen: int, batch_windows: int):
    """Per-window (kl, nll) sums of one plan -> Scores, added exactly as the in-process evaluator adds
    them (from 0.0, the windows of each batch in order, then the batches in order) and divided as its
    `_scores` does, so the results are bit-identical."""
    from planner.evaluate.kl import Scores  # imports torch: not for the scheduling side

    kl = nll = 0.0
    for s in range(0, len(window_sums), batch_windows):
        k = n = 0.0
        for wk, wn in window_sums[s:s + batch_windows]:
            k, n = k + float(wk), n + float(wn)
        kl, nll = kl + k, nll + n
    n_windows = len(window_sums)
    return Scores(kl=kl / (n_windows * seqlen), nll=nll / (n_windows * (seqlen - 1)), tokens=n_windows * seqlen)

