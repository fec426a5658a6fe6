"""The scheduling layer with simulated workers: threads that sleep for a task's estimated cost.

What is real here: the task planning (`tasks.split`), the dispatcher (producers first, then
longest first, unordered completion, stats), the threads' hand-offs, the table of shared
references and the waits it causes. What is simulated: the evaluation itself (a sleep of
`cost x unit_s`, the cost in full forwards of one window from `tasks.CostModel`: each window's
reference made once, by its producer, and fetched by the other tasks on it; the anchor's pass of
every task's windows, its plans' suffixes, a fixed cost per forward call and per task) and the
candidates (level vectors made like EvoPress offspring: 1-3 level switches of two units each).
A consumer sleeps through its anchor pass and first plan, then waits until the producers of its
windows have published (threading.Event), then sleeps the rest, as the worker does. With prefetch,
the next stages' references are fillers (dispatch.Filler: a reference forward, its publish and a
task's fixed costs, one window each) that workers idle in a stage's tail take up, and the next
stage is cut with those windows ready; the clock stops while the driver plans a stage (SimClock),
so a filler still running then gains nothing from the planning time, which the wall leaves out.
What sharing costs (`Shipping`) comes from the object store's put and get times measured on this
machine (bench/ray_scaling.py, section 3: `PUT_S`, `GET_S`), the bytes over the network and over
PCIe, and the head a consumer runs. Ray's own per-task overhead (about a millisecond) is in section 3 too.

Efficiencies reported per worker count W, against one worker running the in-process evaluator
(one task per fidelity group: one reference per window, one anchor pass, every plan's suffix):

    granularity  in-process work / (W x planned makespan): what the task grid allows at best
                 (`plan_stage`: the stages' longest-first timelines, fillers included)
    dispatch     planned makespan / measured wall time: what this layer loses on top
    overall      in-process work / (W x measured wall) = speedup / W
"""

from __future__ import annotations

import concurrent.futures as cf
import heapq
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from planner.distributed.dispatch import FILLER_SLACK, Dispatcher, Done, Filler
from planner.distributed.references import ReferenceTable
from planner.distributed.tasks import CostModel, Task, lpt_order, split, spread

# the object store's put (in the producing actor) and get + writable copy (in another actor), seconds,
# for a 2048-token window's hidden states of the default model (2048 x 576 bf16) and of Llama-3-8B
# (2048 x 4096 bf16): medians measured here with real Ray (reports/ray_scaling.txt, section 3)
STATE_BYTES = (2048 * 576 * 2, 2048 * 4096 * 2)
PUT_S = (0.00252, 0.01091)
GET_S = (0.00037, 0.00219)


def _measured(times: tuple[float, float], nbytes: float) -> float:
    """The line through the two measured sizes, at `nbytes` (never below the smaller size's time)."""
    (a, b), (ta, tb) = STATE_BYTES, times
    return max(min(ta, tb), ta + (tb - ta) * (nbytes - a) / (b - a))


@dataclass(frozen=True)
class Shipping:
    """What sharing one window's reference costs a modeled worker, from the measured object store:
    the producer's put (after the copy off the GPU), a consumer's get, the bytes over the network
    (charged to every consumer: pessimistic, as consumers on the producer's node read shared memory)
    and onto its GPU, then the head (lm_head + log-softmax) on the states."""

    forward_s: float              # one full forward of one window on the modeled worker
    state_bytes: float            # a window's final hidden states in the evaluation dtype
    network: float = 3.1e9        # bytes/s between nodes (25 Gb/s)
    device: float = 2.5e10        # bytes/s between host and GPU (PCIe 4 x16)

    def put(self) -> float:
        """Publishing one window's states, in full forwards of one window."""
        return (_measured(PUT_S, self.state_bytes) + self.state_bytes / self.device) / self.forward_s

    def get(self) -> float:
        """Fetching them onto another worker's device, in full forwards of one window."""
        io = _measured(GET_S, self.state_bytes) + self.state_bytes / self.network + self.state_bytes / self.device
        return io / self.forward_s


# EvoPress's schedule on Llama-3-8B, one H100 a worker: a 2048-token window's forward ~65 ms
# (docs/scale.md), hidden states 2048 x 4096 bf16; the CPU schedule on the default model, CPU
# workers of one machine (no network, no GPU): a 512-token window ~0.19 s, 512 x 576 bf16
LLAMA_8B_H100 = Shipping(0.065, 2048 * 4096 * 2)
SMOL_CPU = Shipping(0.19, 512 * 576 * 2, network=float("inf"), device=float("inf"))


@dataclass(frozen=True)
class Stage:
    candidates: int      # plans measured together (one fidelity group)
    windows: int         # token windows of that fidelity (the evaluator scores them 4 to a batch)


def evo_stages(offspring: int, stages: tuple[tuple[int, int], ...], seqlen: int) -> list[Stage]:
    """One EvoPress generation: the offspring race, then the survivors; the parent joins the last stage."""
    out, k = [], offspring
    for i, (survivors, tokens) in enumerate(stages):
        out.append(Stage(k + (i == len(stages) - 1), -(-tokens // seqlen)))
        k = survivors
    return out


# EvoPress quantization defaults (128 offspring; 16@2048 -> 4@16384 -> 1@131072 tokens) on
# windows of 2048 tokens; the CPU schedule of this repo on the default model (512-token windows).
SCHEDULES = {
    "paper": evo_stages(128, ((16, 2048), (4, 16384), (1, 131072)), 2048),
    "cpu": evo_stages(16, ((4, 512), (1, 2048)), 512),
}


def offspring(rng: np.random.Generator, n_units: int, k: int, levels: int = 5) -> np.ndarray:
    """A parent (the middle level) and k - 1 children with 1-3 switches of two units each."""
    parent = np.full(n_units, levels // 2)
    X = [parent]
    for _ in range(k - 1):
        x = parent.copy()
        units = rng.choice(n_units, size=2 * rng.integers(1, 4), replace=False)
        x[units[0::2]] += 1
        x[units[1::2]] -= 1
        X.append(x)
    return np.array(X)


@dataclass(frozen=True)
class SimWork:
    """A task as a sleeping worker runs it (costs in full forwards of one window)."""

    task: Task
    windows: tuple[tuple[int, int], ...]   # (stage, window): keys of the table of shared references
    made: float          # a producer: making and publishing its windows' references, first
    before_kl: float     # a consumer: its anchor pass and first plan on its first batch, before a reference is needed

    @property
    def publish(self) -> tuple[tuple[int, int], ...]:
        return self.windows if self.task.produces else ()


class SimClock:
    """Seconds that stop while the driver plans the next stage (`paused`): the measured wall counts
    only the dispatcher's time, so a worker still making references for the next stage (a filler)
    must make no progress while the clock is stopped either."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stopped = 0.0                  # seconds the clock stood still, in all
        self._since: float | None = None     # when the current pause began

    def now(self) -> float:
        with self._lock:
            return (time.perf_counter() if self._since is None else self._since) - self._stopped

    def sleep(self, seconds: float) -> None:
        target = self.now() + seconds
        while (left := target - self.now()) > 0:
            time.sleep(left)

    @contextmanager
    def paused(self):
        with self._lock:
            self._since = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._stopped += time.perf_counter() - self._since
                self._since = None


class SleepBackend:
    """Worker i is a thread that sleeps for its task's cost times `unit_s`; a producer sets its windows'
    events after its references, a consumer waits for them before its first KL (as RayBackend and
    the worker do with ObjectRefs)."""

    def __init__(self, workers: int, unit_s: float):
        self.unit_s = unit_s
        self.pool = cf.ThreadPoolExecutor(max_workers=workers)
        self.references = ReferenceTable(1 << 20)
        self.clock = SimClock()
        self.waited = 0.0

    def _run(self, work: SimWork, waits: list[threading.Event], sets: list[threading.Event]) -> Done:
        t0 = self.clock.now()
        first = work.made if sets else work.before_kl if waits else work.task.cost
        self.clock.sleep(first * self.unit_s)
        for e in sets:
            e.set()
        t1 = self.clock.now()
        for e in waits:
            e.wait()
        self.waited += self.clock.now() - t1
        self.clock.sleep(max(0.0, work.task.cost - first) * self.unit_s)
        return Done(work.task, self.clock.now() - t0, tokens=0)

    def submit(self, worker: int, work: SimWork):
        shared, make = self.references.roles(work.windows, work.publish)
        events = [threading.Event() for _ in make]
        self.references.add(make, events)
        return self.pool.submit(self._run, work, list(shared.values()), events)

    def wait(self, futures: list) -> list:
        return list(cf.wait(futures, return_when=cf.FIRST_COMPLETED).done)

    def result(self, future):
        return future.result()

    def close(self) -> None:
        self.pool.shutdown()


@dataclass(frozen=True)
class SimResult:
    workers: int
    tasks: int
    inprocess: float     # one worker, one task per group (seconds of work)
    planned: float       # the planned timeline's makespan (plan_stage) of the chosen tasks and fillers
    wall: float          # measured
    busy: float          # sum of the workers' sleeps and waits
    waited: float = 0.0  # seconds consumers waited for their producers' references, summed
    prefetched: int = 0  # windows whose references were made in the previous stage's tail

    @property
    def granularity(self) -> float:
        return self.inprocess / (self.workers * self.planned)

    @property
    def dispatch(self) -> float:
        return self.planned / self.wall

    @property
    def overall(self) -> float:
        return self.inprocess / (self.workers * self.wall)


def cost_model(n_blocks: int = 32, units_per_block: int = 7, head_blocks: float = 2.4,
               shipping: Shipping | None = LLAMA_8B_H100) -> CostModel:
    """The simulated model's costs (defaults: Llama-3-8B's 32 blocks, 7 linears each, a head worth 2.4
    blocks); with `shipping`, references are shared (fetched: the states, then the head)."""
    shared = {} if shipping is None else {"publish": shipping.put(),
                                          "fetch": shipping.get() + head_blocks / (n_blocks + head_blocks)}
    return CostModel(np.repeat(np.arange(n_blocks), units_per_block), n_blocks, head_blocks, **shared)


def _sim_work(stage: int, X: np.ndarray, t: Task, cost: CostModel, ready: set[int]) -> SimWork:
    """`t` with its shared-reference keys and the two points where a worker's timeline meets others':
    a producer's references made (the worker's `reference` call runs first; `ready` windows were
    prefetched: it fetches those), a consumer's first KL."""
    made = sum(w not in ready for w in t.windows)
    b1 = min(t.stop, (t.start // cost.batch_windows + 1) * cost.batch_windows) - t.start   # its first forward batch
    Xc = X[list(t.members)]
    if len(Xc) < 2:
        before = b1 * 1.0
    else:
        first = cost.firsts(Xc)
        before = b1 * (cost.anchor(first) + float(cost.suffixes(first)[0]))
    return SimWork(t, tuple((stage, w) for w in t.windows), made * (cost.reference + cost.publish), before)


def _filler(key: tuple[int, int], cost: CostModel) -> Filler:
    """A prefetch of one window's reference for a later stage: a producer with no plans."""
    c = cost.prefetch(1)
    return Filler(SimWork(Task(0, (), key[1], key[1] + 1, c, produces=True), (key,), c, 0.0), c)


def plan_stage(free: list[float], costs: list[float], fillers: list[float]) -> tuple[float, int]:
    """The planned timeline of one stage, as the dispatcher runs it: tasks longest first, each on the
    worker free first (`free`: when each is, from the stage's start: a filler of the previous stage
    may still hold it), then fillers in order, each on the worker free first while it would end by the
    stage's last task (plus FILLER_SLACK of its length). Returns that end and how many fillers
    started; `free` becomes the next stage's."""
    heap = sorted(free)
    end = 0.0
    for c in sorted(costs, reverse=True):
        end = max(end, heap[0] + c)
        heapq.heapreplace(heap, heap[0] + c)
    started = 0
    while started < len(fillers) and heap[0] + (1 - FILLER_SLACK) * fillers[started] <= end:
        heapq.heapreplace(heap, heap[0] + fillers[started])
        started += 1
    free[:] = [max(0.0, f - end) for f in heap]
    return end, started


def simulate(stages: list[Stage], workers: int, unit_s: float = 0.01, generations: int = 1,
             n_blocks: int = 32, units_per_block: int = 7, head_blocks: float = 2.4, seed: int = 0,
             atom: int = 1, shipping: Shipping | None = LLAMA_8B_H100, sleep: bool = True,
             prefetch: bool = True) -> SimResult:
    """Run `generations` of `stages` through the dispatcher on `workers` sleeping threads, `unit_s`
    seconds per full forward of one window; `atom` 4 keeps tasks on whole batches; `shipping` None:
    references are not shared (every task makes those of its windows). With `prefetch` (and shared
    references), workers left idle in a stage's tail make the references of the stages that follow
    (fillers, one window each, nearest stage first: what EvoSearcher.upcoming() announces), and a
    stage is cut with the windows already made (or being made) ready. With `sleep` False only the
    plan is made (wall = planned: the granularity alone, at no cost)."""
    rng = np.random.default_rng(seed)
    cost = cost_model(n_blocks, units_per_block, head_blocks, shipping)
    # the dispatcher knows the time scale, as after the batches before (`planner search` runs the uniform
    # baselines first): fillers may start from the first stage's start on a worker it leaves idle
    backend = SleepBackend(workers, unit_s)
    dispatcher = Dispatcher(workers, seconds_per_cost=unit_s, clock=backend.clock.now)
    schedule = [st for _ in range(generations) for st in stages]
    n_tasks, inproc, planned, busy, prefetched = 0, 0.0, 0.0, 0.0, 0
    free, started = [0.0] * workers, set()      # the planned timeline's workers, and windows it prefetched
    try:
        for k, st in enumerate(schedule):      # k: the stage's key in the table of shared references
            with backend.clock.paused():       # the driver plans: a filler still running makes no progress
                X = offspring(rng, n_blocks * units_per_block, st.candidates)
                inproc += cost.inprocess(X, st.windows) * unit_s
                made = backend.references if sleep else started
                ready = {w for w in range(st.windows) if (k, w) in made}
                prefetched += len(ready)
                if sleep:               # plan with what the dispatcher knows: its workers still on fillers
                    free = [*dispatcher.busy(), *[0.0] * workers][:workers]
                tasks = split(0, X, st.windows, workers, cost, atom, ready=ready, busy=[f for f in free if f > 0])
                n_tasks += len(tasks)
                ahead = schedule[k + 1:k + 1 + len(stages)] if prefetch and cost.fetch is not None else []
                fill = [(j, w) for j, later in enumerate(ahead, k + 1) for w in spread(later.windows) if (j, w) not in made]
                end, n = plan_stage(free, [t.cost for t in tasks], [cost.prefetch(1)] * len(fill))
                planned += end * unit_s
                started.update(fill[:n])
            if sleep:
                work = [_sim_work(k, X, t, cost, ready) for t in tasks]
                dispatcher.run(backend, work, lpt_order(tasks), costs=[t.cost for t in tasks],
                               filler=[_filler(key, cost) for key in fill])
        busy = sum(s.busy_s for s in dispatcher.stats)
    finally:
        backend.close()
    return SimResult(workers, n_tasks, inproc, planned, dispatcher.wall_s if sleep else planned, busy, backend.waited,
                     prefetched)


def best_of(n: int, run: Callable[[], SimResult], enough: float = 0.95) -> SimResult:
    """The best of up to n simulated runs (stopping at `enough` overall): the grid is deterministic,
    the measured wall only loses to the machine's load (32 sleeping threads woken late on 2 busy
    cores), never gains; the best run is the one that measures the scheduler, not the neighbours."""
    best = run()
    for _ in range(n - 1):
        if best.overall >= enough:
            break
        best = max(best, run(), key=lambda r: r.overall)
    return best
