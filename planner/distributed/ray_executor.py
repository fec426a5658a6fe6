"""The Ray executor: the in-process evaluator's interface (`evaluate(candidates) -> results`,
`score(plan, windows)`, `on_scored`) on a pool of actors.

Candidates are grouped by fidelity, as in-process; each group is cut into tasks (tasks.split:
chunks of candidates on runs of windows, down to one window, whichever grid the cost model says
finishes first); the dispatcher hands tasks to idle actors, producers of shared references first,
then longest first, and takes them back in completion order; results come back in candidate
order, bit-identical to the in-process evaluator's (per-window sums added up in its order).

A window's reference is made once per cluster (references.py): the backend sends a producer's
actor a `reference` call just before its task, keeps one ObjectRef per window in a bounded table,
and hands those refs to every later task on the window (in this call or a later one).

Prefetch: the search loop tells the executor (`expect`) which fidelities the next batches will use
(EvoSearcher.upcoming: a stage's windows derive from the seed, the generation and the stage, not from
any result). Their windows become fillers of this call (dispatch.Filler, one window each, spread over
each stage): a worker idle in this batch's tail makes and publishes one, and the next batch is cut
with those windows ready, so its tasks fetch them instead of one of them making each first, and
around the workers still making one.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter

import numpy as np

from planner.distributed.dispatch import Filler, WorkerLost
from planner.distributed.references import ReferenceTable
from planner.distributed.tasks import CostModel, Task, fold, lpt_order, split, spread
from planner.distributed.worker import Output, Prefetch, Work, WorkerSpec
from planner.errors import PlannerError
from planner.evaluate.kl import Scores
from planner.plan import Plan
from planner.search.base import Candidate, Fidelity, Result

# the in-process evaluator's default batch: the fold order, hence bit-exactness, depends on it
BATCH_WINDOWS = 4


class RayBackend:
    def __init__(self, ray, actors: list, key: str, problem_ref, references: ReferenceTable | None = None):
        self.ray, self.actors, self.key, self.problem_ref = ray, actors, key, problem_ref
        self.references = references     # None: every task makes its own references
        self._published: dict = {}       # future of a producer's task -> (windows, ObjectRefs) it publishes

    def submit(self, worker: int, work: Work | Prefetch):
        actor = self.actors[worker]
        if isinstance(work, Prefetch):     # a filler: the first return is its Done, then one object per window
            refs = actor.prefetch.options(num_returns=len(work.windows) + 1).remote(self.key, self.problem_ref,
                                                                                   np.array(work.windows))
            self.references.add(work.windows, refs[1:])
            self._published[refs[0]] = (work.windows, refs[1:])
            return refs[0]
        if self.references is None:
            return actor.run.remote(self.key, self.problem_ref, work)
        shared, make = self.references.roles(work.windows, work.publish)
        if make:    # runs on the actor before its task (an actor runs its calls in order)
            refs = actor.reference.options(num_returns=len(make)).remote(self.key, self.problem_ref, np.array(make))
            refs = [refs] if len(make) == 1 else list(refs)
            self.references.add(make, refs)
        future = actor.run.remote(self.key, self.problem_ref, dataclasses.replace(work, shared=tuple(shared.items())))
        if make:
            self._published[future] = (make, refs)
        return future

    def wait(self, futures: list) -> list:
        """At least one finished future, and every other one already finished (one round trip)."""
        first = self.ray.wait(futures, num_returns=1)[0]
        return list(dict.fromkeys(first + self.ray.wait(futures, num_returns=len(futures), timeout=0)[0]))

    def result(self, future):
        exc = self.ray.exceptions
        lost = (exc.RayActorError, exc.OutOfMemoryError, exc.WorkerCrashedError, exc.NodeDiedError)
        published = self._published.pop(future, None)
        try:
            return self.ray.get(future)
        except lost as e:      # died (killed, Ray's memory monitor, its node), or unreachable while it restarts
            if published is not None:
                self.references.forget(*published)
            raise WorkerLost(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        except exc.RayTaskError as e:       # the task raised: a typed error is the caller's one line
            if isinstance(e.cause, PlannerError):
                raise e.cause from None
            raise


def cost_model(session, problem, shared: bool = True) -> CostModel:
    """The grid's cost model; with `shared` references, publishing and fetching one are guessed at
    a few hundredths of a forward on top of the head (simulate.Shipping derives them from measured
    object-store times for the scaling tables): they only steer the chunk sizes."""
    cfg = session.loaded.model.config
    n_blocks = int(cfg.num_hidden_layers)
    per_block = problem.total_numel / max(n_blocks, 1)
    head = cfg.vocab_size * cfg.hidden_size / per_block
    return CostModel(np.asarray(problem.blocks or [0] * problem.n_units), n_blocks, head, batch_windows=BATCH_WINDOWS,
                     publish=0.02 if shared else 0.0, fetch=head / (n_blocks + head) + 0.05 if shared else None)


def state_bytes(session) -> int:
    """A window's final hidden states in the evaluation dtype: what a shared reference ships."""
    return session.windows.seqlen * session.loaded.model.config.hidden_size * (2 if session.spec.dtype == "bf16" else 4)


class RayExecutor:
    def __init__(self, cluster, session, problem):
        import ray

        spec = session.spec
        actors = cluster.start(WorkerSpec(model=str(session.loaded.source), db_path=str(session.db.path),
                                          windows=session.windows, dtype=spec.dtype, kl_topk=spec.kl_topk,
                                          threads=cluster.spec.threads, trust_remote_code=spec.trust_remote_code,
                                          cache_bytes=cluster.spec.cache_bytes))
        self.problem, self.windows, self.cluster = problem, session.windows, cluster
        cap = int(cluster.spec.reference_bytes // state_bytes(session))
        self.cost = cost_model(session, problem, shared=cap > 0)
        self.atom = BATCH_WINDOWS if cluster.spec.whole_batches else 1    # windows a task's runs are cut at
        self.backend = RayBackend(ray, actors, uuid.uuid4().hex, ray.put(problem), ReferenceTable(cap) if cap > 0 else None)
        self.on_scored = None      # called once per finished candidate (progress bars)
        self.evaluations = 0
        self.reference_counts = Counter()    # made: base-model forwards on the workers; fetched: from published states
        self.prefetch = cluster.spec.prefetch and cap > 0
        self._upcoming: list[int] = []       # windows of the batches announced by `expect`, in prefetch order

    @property
    def dispatcher(self):
        return self.cluster.dispatcher

    def summary(self) -> str:
        return self.dispatcher.summary()

    @staticmethod
    def _batches(windows: np.ndarray, t: Task) -> tuple[np.ndarray, ...]:
        """A task's windows as forward batches, cut where the in-process evaluator's batches end."""
        edges = sorted({t.start, t.stop, *range((t.start // BATCH_WINDOWS + 1) * BATCH_WINDOWS, t.stop, BATCH_WINDOWS)})
        return tuple(windows[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True))

    def _count(self, outputs: dict) -> None:
        for out in outputs.values():
            if not isinstance(out, WorkerLost):
                self.reference_counts.update(made=out.made, fetched=out.fetched)

    def _scored(self) -> None:
        self.evaluations += 1
        if self.on_scored is not None:
            self.on_scored()

    def expect(self, fidelities: list[Fidelity]) -> None:
        """The fidelities of the batches after the next one, nearest first (a hint from the search
        loop): the next `evaluate` makes their windows' references in its idle tail (prefetch)."""
        windows: list[int] = []
        for f in fidelities if self.prefetch else ():
            try:
                drawn = self.windows.draw(f.tokens, f.seed)
            except PlannerError:        # too many tokens for the pool: evaluate() will say so, if it is asked
                continue
            windows += [int(drawn[i]) for i in spread(len(drawn))]
        self._upcoming = list(dict.fromkeys(windows))

    def _fillers(self, tasks: list[Task], windows: list[np.ndarray]) -> list[Filler]:
        """One filler per announced window that is neither published nor about to be by this call."""
        table = self.backend.references
        made = {int(w) for t in tasks if t.produces for w in windows[t.group][t.start:t.stop]}
        fill = [w for w in self._upcoming if w not in made and w not in table]
        self._upcoming = []
        return [Filler(Prefetch((w,)), self.cost.prefetch(1)) for w in fill]

    def evaluate(self, candidates: list[Candidate]) -> list[Result]:
        """One Result per candidate, in order; failures reported, never raised."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(candidates):
            groups.setdefault((c.fidelity.tokens, c.fidelity.seed), []).append(i)
        members = list(groups.values())
        windows = [self.windows.draw(t, s) for t, s in groups]
        X = [np.array([candidates[i].x for i in m]) for m in members]
        n = len(self.dispatcher.live) or 1
        table, busy = self.backend.references, self.dispatcher.busy()     # busy: workers still on a filler
        ready = [[i for i, w in enumerate(ws) if table is not None and int(w) in table] for ws in windows]
        tasks = [t for g in range(len(members))
                 for t in split(g, X[g], len(windows[g]), n, self.cost, self.atom, ready=ready[g], busy=busy)]
        work = [Work(tuple(tuple(int(v) for v in X[t.group][i]) for i in t.members), self._batches(windows[t.group], t),
                     publish=tuple(int(w) for w in windows[t.group][t.start:t.stop]) if t.produces else ())
                for t in tasks]
        left = Counter((t.group, i) for t in tasks for i in t.members)   # tasks a candidate still waits for

        def done(k: int, _out) -> None:
            for i in tasks[k].members:
                left[(tasks[k].group, i)] -= 1
                if not left[(tasks[k].group, i)]:
                    self._scored()

        outputs = self.dispatcher.run(self.backend, work, lpt_order(tasks), done, costs=[t.cost for t in tasks],
                                      filler=self._fillers(tasks, windows))
        self._count(outputs)
        sums = [np.full((len(w), len(m), 2), np.nan) for w, m in zip(windows, members, strict=True)]
        errors: dict[tuple[int, int], str] = {}
        for k, t in enumerate(tasks):
            _collect(t, outputs[k], sums[t.group], errors)
        results: dict[int, Result] = {}
        for g, m in enumerate(members):
            for j, i in enumerate(m):
                if (g, j) in errors:
                    results[i] = Result(candidates[i], error=errors[(g, j)])
                else:
                    s = fold(sums[g][:, j], self.windows.seqlen, BATCH_WINDOWS)
                    results[i] = Result(candidates[i], kl=s.kl, ppl=s.ppl)
        return [results[i] for i in range(len(candidates))]

    def score(self, plan: Plan | None, window_idx: np.ndarray) -> Scores:
        """One plan (None: the base model) on explicit windows (held-out), split across workers."""
        window_idx = np.asarray(window_idx)
        tasks = split(0, None, len(window_idx), len(self.dispatcher.live) or 1, self.cost, self.atom)
        work = [Work(None, self._batches(window_idx, t), plan) for t in tasks]
        outputs = self.dispatcher.run(self.backend, work, lpt_order(tasks))
        self._count(outputs)
        sums = np.full((len(window_idx), 1, 2), np.nan)
        errors: dict[tuple[int, int], str] = {}
        for k, t in enumerate(tasks):
            _collect(t, outputs[k], sums, errors)
        if errors:
            raise PlannerError(f"scoring a plan failed: {next(iter(errors.values()))}")
        self._scored()
        return fold(sums[:, 0], self.windows.seqlen, BATCH_WINDOWS)


def _collect(t: Task, out: Output | WorkerLost, sums: np.ndarray, errors: dict[tuple[int, int], str]) -> None:
    """Place one task's per-window sums (or its failure) into its group's [window, plan, 2] array."""
    if isinstance(out, WorkerLost):
        for i in t.members:
            errors.setdefault((t.group, i), f"WorkerLost: a worker died on each of its attempts ({out})")
        return
    sums[np.ix_(list(t.windows), list(t.members))] = out.sums
    for j, msg in out.errors.items():
        errors.setdefault((t.group, t.members[j]), msg)
