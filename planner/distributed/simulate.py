"""The scheduling layer with simulated workers: threads that sleep for a task's estimated cost.

What is real here: the task planning (`tasks.split`), the dispatcher (producers first, then
longest first, unordered completion, stats), the threads' hand-offs, the table of shared
references and the waits it causes. What is simulated: the evaluation itself (a sleep of
`cost x unit_s`, the cost in full forwards of one window from `tasks.CostModel`: each window's
reference made once, by its producer, and fetched by the other tasks on it; the anchor's pass of
every task's windows, its plans' suffixes, a fixed cost per forward call and per task) and the
candidates (level vectors made like EvoPress offspring: 1-3 level switches of two units each).
A consumer sleeps through its anchor pass and first plan, then waits until the producers of its
windows have published (threading.Event), then sleeps the rest, as the worker does. What sharing
costs (`Shipping`) comes from the object store's put and get times measured on this machine
(bench/ray_scaling.py, section 3: `PUT_S`, `GET_S`), the bytes over the network and over PCIe, and
the head a consumer runs. Ray's own per-task overhead (about a millisecond) is in section 3 too.

Efficiencies reported per worker count W, against one worker running the in-process evaluator
(one task per fidelity group: one reference per window, one anchor pass, every plan's suffix):

    granularity  in-process work / (W x planned makespan): what the task grid allows at best
    dispatch     planned makespan / measured wall time: what this layer loses on top
    overall      in-process work / (W x measured wall) = speedup / W
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass

import numpy as np

from planner.distributed.dispatch import Dispatcher, Done
from planner.distributed.references import ReferenceTable
from planner.distributed.tasks import CostModel, Task, lpt_makespan, lpt_order, split

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


class SleepBackend:
    """Worker i is a thread that sleeps for its task's cost times `unit_s`; a producer sets its windows'
    events after its references, a consumer waits for them before its first KL (as RayBackend and
    the worker do with ObjectRefs)."""

    def __init__(self, workers: int, unit_s: float):
        self.unit_s = unit_s
        self.pool = cf.ThreadPoolExecutor(max_workers=workers)
        self.references = ReferenceTable(1 << 20)
        self.waited = 0.0

    def _run(self, work: SimWork, waits: list[threading.Event], sets: list[threading.Event]) -> Done:
        t0 = time.perf_counter()
        first = work.made if sets else work.before_kl if waits else work.task.cost
        time.sleep(first * self.unit_s)
        for e in sets:
            e.set()
        t1 = time.perf_counter()
        for e in waits:
            e.wait()
        self.waited += time.perf_counter() - t1
        time.sleep(max(0.0, work.task.cost - first) * self.unit_s)
        return Done(work.task, time.perf_counter() - t0, tokens=0)

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
    planned: float       # LPT makespan of the chosen tasks
    wall: float          # measured
    busy: float          # sum of the workers' sleeps and waits
    waited: float = 0.0  # seconds consumers waited for their producers' references, summed

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


def _sim_work(stage: int, X: np.ndarray, t: Task, cost: CostModel) -> SimWork:
    """`t` with its shared-reference keys and the two points where a worker's timeline meets others':
    a producer's references made (the worker's `reference` call runs first), a consumer's first KL."""
    n = t.stop - t.start
    b1 = min(t.stop, (t.start // cost.batch_windows + 1) * cost.batch_windows) - t.start   # its first forward batch
    Xc = X[list(t.members)]
    if len(Xc) < 2:
        before = b1 * 1.0
    else:
        first = cost.firsts(Xc)
        before = b1 * (cost.anchor(first) + float(cost.suffixes(first)[0]))
    return SimWork(t, tuple((stage, w) for w in t.windows), n * (cost.reference + cost.publish), before)


def simulate(stages: list[Stage], workers: int, unit_s: float = 0.01, generations: int = 1,
             n_blocks: int = 32, units_per_block: int = 7, head_blocks: float = 2.4, seed: int = 0,
             atom: int = 1, shipping: Shipping | None = LLAMA_8B_H100, sleep: bool = True) -> SimResult:
    """Run `generations` of `stages` through the dispatcher on `workers` sleeping threads, `unit_s`
    seconds per full forward of one window; `atom` 4 keeps tasks on whole batches; `shipping` None:
    references are not shared (every task makes those of its windows). With `sleep` False only the
    plan is made (wall = planned: the granularity alone, at no cost)."""
    rng = np.random.default_rng(seed)
    cost = cost_model(n_blocks, units_per_block, head_blocks, shipping)
    backend, dispatcher = SleepBackend(workers, unit_s), Dispatcher(workers)
    n_tasks, inproc, planned, busy = 0, 0.0, 0.0, 0.0
    try:
        for g in range(generations):
            for i, st in enumerate(stages):
                X = offspring(rng, n_blocks * units_per_block, st.candidates)
                inproc += cost.inprocess(X, st.windows) * unit_s
                tasks = split(0, X, st.windows, workers, cost, atom)
                n_tasks += len(tasks)
                planned += lpt_makespan([t.cost * unit_s for t in tasks], workers)
                if sleep:
                    work = [_sim_work(g * len(stages) + i, X, t, cost) for t in tasks]
                    dispatcher.run(backend, work, lpt_order(tasks))
        busy = sum(s.busy_s for s in dispatcher.stats)
    finally:
        backend.close()
    return SimResult(workers, n_tasks, inproc, planned, dispatcher.wall_s if sleep else planned, busy, backend.waited)
