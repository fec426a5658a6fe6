"""Scaling of the Ray executor, measured where it can be and simulated where it cannot:

1. the per-token evaluation cost of the default model (SmolLM2-135M) in-process, bf16 and fp32,
   one thread: what docs/scale.md scales to Llama-3-8B / 70B / Mixtral by FLOPs;
2. throughput of one EvoPress generation of the CPU schedule (16 offspring @512 tokens, then the
   4 survivors and the parent @2048) in-process (1 and 2 threads) and on 1 and 2 local Ray workers
   of one thread each, with each worker's utilisation, and a check that every KL is identical;
   two workers share this machine's two cores with everything else running here (the load
   average is printed): they are not expected to double anything;
3. Ray's own cost per task: N sleeping actors (N up to 32 on 32 *logical* Ray CPUs) fed by the
   planner's dispatcher, tasks of a known length: the fraction of the ideal wall time achieved;
   and the object store's put and get of a window's hidden states (2.4 MB: the default model's
   2048-token window; 16.8 MB: Llama-3-8B's), what a shared reference costs;
4. the simulated scaling table (planner.distributed.simulate: the real task planner and dispatcher,
   workers that sleep for a task's estimated cost, shared references fetched and waited for, anchor
   passes included) for EvoPress's paper schedule and a wide workload (Llama-3-8B on H100s) and the
   CPU schedule (the default model on CPU workers), 1 to 32 workers; the last two columns are
   granularities (planned, not slept): tasks on whole batches of 4 windows only (the choice for
   kernels whose numbers depend on the batch), and references recomputed by every task on a window
   (the grid before they were shared), after the grid without prefetching the next stages'
   references; then what sharing the anchor's block inputs too would save.

    python bench/ray_scaling.py [--space rtn-g128] [--generations 2] [--sections 4] [--out reports/ray_scaling.txt]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from planner.budget import parse_budget  # noqa: E402
from planner.distributed import Cluster, ClusterSpec  # noqa: E402
from planner.distributed import simulate as sim  # noqa: E402
from planner.distributed.cluster import free_port  # noqa: E402
from planner.distributed.dispatch import Dispatcher, Done  # noqa: E402
from planner.distributed.ray_executor import RayBackend  # noqa: E402
from planner.distributed.simulate import SCHEDULES, STATE_BYTES, Stage, simulate  # noqa: E402
from planner.distributed.tasks import Task, split  # noqa: E402
from planner.errors import PlannerError  # noqa: E402
from planner.search.base import Candidate, Fidelity, derive_seed  # noqa: E402
from planner.search.operators import level_switch  # noqa: E402

OFFSPRING, STAGES = 16, ((4, 512), (1, 2048))     # the `cpu` schedule
# dequantized levels a Ray worker keeps (LRU): all six bf16 levels of the default model are 1.3 GB a
# worker, more than this shared 23 GB machine spares (Ray's memory monitor kills workers at 95%)
CACHE_BYTES = 4e8


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def flops_per_token(cfg, seqlen: int) -> float:
    """2 x (block linears + lm_head) MACs, plus attention scores and values (causal: half of T)."""
    h, L, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    linears = L * (2 * h * h + 2 * h * kv + 3 * h * inter) + cfg.vocab_size * h
    return 2 * linears + 2 * L * 2 * h * seqlen / 2


def per_token_cost(session, problem, repeats: int = 2) -> list[str]:
    import torch

    from planner.evaluate.evaluator import InProcessEvaluator

    lines = []
    x = problem.decode(tuple(int(np.searchsorted(problem.code_bits[i] / problem.numel[i], 3.0)) for i in
                             range(problem.n_units)))
    windows = session.windows.draw(2048, 7)
    flops = flops_per_token(session.loaded.model.config, session.windows.seqlen)
    for dtype in ("bf16", "fp32"):
        from planner.model.load import load_model

        model = load_model(str(session.loaded.source), torch.float32).model
        ev = InProcessEvaluator(model, session.db, problem, session.windows,
                                dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
        ev.score(x, windows)                                        # references, dequantized levels
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ev.score(x, windows)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        tokens = len(windows) * session.windows.seqlen
        lines.append(f"{dtype:5s} {t:7.2f} s per {tokens} tokens  {1e6 * t / tokens:8.1f} us/token  "
                     f"{flops / 1e9:.3f} GFLOP/token  {flops * tokens / t / 1e9:7.1f} GFLOP/s effective")
        del ev, model
    return lines


def generation(problem, parent, rng, gen: int) -> list[list[Candidate]]:
    """The candidate batches of one generation of the cpu schedule (as EvoSearcher asks them)."""
    kids = list({tuple(int(v) for v in level_switch(parent, problem, rng, int(rng.integers(1, 4))))
                 for _ in range(OFFSPRING)})
    out, k = [], kids
    for stage, (survivors, tokens) in enumerate(STAGES):
        f = Fidelity(tokens, derive_seed(0, gen, stage))
        batch = [Candidate(x, f) for x in k]
        if stage == len(STAGES) - 1:
            batch.append(Candidate(tuple(parent), f, label="parent"))
        out.append(batch)
        k = k[:survivors]
    return out


def run_generations(evaluate, gens: list[list[list[Candidate]]]) -> tuple[float, int, list[float]]:
    t0, tokens, kls = time.perf_counter(), 0, []
    for g in gens:
        for batch in g:
            kls += [r.kl for r in evaluate(batch)]
            tokens += sum(c.fidelity.tokens for c in batch)
    return time.perf_counter() - t0, tokens, kls


def _ray_rows(session, problem, warm, gens) -> list[tuple]:
    """Ray with 1 and 2 workers (first, while the driver holds only the fp32 model: this machine's
    memory is shared, and Ray's memory monitor kills workers at 95% of it)."""
    import ray

    rows = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, dashboard_port=free_port(), logging_level="WARNING")
    try:
        for workers in (1, 2):
            name = f"Ray, {workers} worker{'s' * (workers > 1)} x 1 thread"
            cluster = Cluster(ClusterSpec(workers=workers, cache_bytes=CACHE_BYTES))
            try:
                t0 = time.perf_counter()
                ev = dataclasses.replace(session, cluster=cluster, _evaluator=None).evaluator(problem)
                started = time.perf_counter() - t0
                run_generations(ev.evaluate, warm)
                d = cluster.dispatcher
                d.wall_s, busy0 = 0.0, [s.busy_s for s in d.stats]
                wall, tokens, kls = run_generations(ev.evaluate, gens)
            except PlannerError as e:             # every worker killed (out of memory): say so, go on
                rows.append((name, None, 0, [], f"failed: {e}"))
                continue
            finally:
                cluster.close()
            util = " ".join(f"w{s.worker} {100 * (s.busy_s - b) / d.wall_s:.0f}%" for s, b in zip(d.stats, busy0,
                                                                                                 strict=True))
            rows.append((name, wall, tokens, kls, f"utilisation {util}; actors up in {started:.0f} s; "
                                                  f"worker deaths {sum(s.deaths for s in d.stats)}"))
    finally:
        ray.shutdown()
    return rows


def throughput(session, problem, generations: int) -> list[str]:
    import torch

    rng = np.random.default_rng(0)
    parent = np.array([int(np.searchsorted(problem.code_bits[i] / problem.numel[i], 3.0)) for i in
                       range(problem.n_units)])
    warm = [generation(problem, parent, rng, 1000)[:1]]   # references and dequantized levels, once
    gens = [generation(problem, parent, rng, g) for g in range(generations)]
    torch.set_num_threads(1)
    remote = _ray_rows(session, problem, warm, gens)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ev = session.evaluator(problem)
        run_generations(ev.evaluate, warm)
        wall, tokens, kls = run_generations(ev.evaluate, gens)
        rows.append((f"in-process, {threads} thread{'s' * (threads > 1)}", wall, tokens, kls, ""))
    torch.set_num_threads(1)
    ref = rows[0]
    out = [f"{'executor':32s} {'wall s':>7s} {'tok/s':>7s} {'speed-up':>8s}  {'identical KL':14s}  notes"]
    for name, wall, tokens, kls, note in rows + remote:
        if wall is None:
            out.append(f"{name:32s} {'-':>7s} {'-':>7s} {'-':>8s}  {'-':14s}  {note}")
            continue
        ok = [i for i, k in enumerate(kls) if np.isfinite(k)]
        same = "yes" if [kls[i] for i in ok] == [ref[3][i] for i in ok] else "NO"
        failed = f" ({len(kls) - len(ok)} failed)" if len(ok) < len(kls) else ""
        out.append(f"{name:32s} {wall:7.1f} {tokens / wall:7.0f} {ref[1] / wall:8.2f}  {same + failed:14s}  {note}")
    return out


class SleepActor:
    """A Ray actor that sleeps for a task's cost (x `unit_s`): Ray's overhead and nothing else; and
    the two ends of a shared reference: `put` (a producer publishing states) and `get` (a consumer
    fetching them into a writable array, as worker.from_wire does)."""

    def __init__(self, unit_s: float):
        self.unit_s = unit_s
        self.kept: list = []

    def info(self) -> int:
        return os.getpid()

    def put(self, nbytes: int, repeats: int) -> tuple[list, list[float]]:
        import ray

        refs, times = [], []
        for i in range(repeats):
            data = np.full(nbytes, i, dtype=np.uint8)      # fresh states each time, as after a forward
            t0 = time.perf_counter()
            refs.append(ray.put(data))
            times.append(time.perf_counter() - t0)
        self.kept += refs          # the owner keeps them alive
        return refs, times

    def get(self, refs: list) -> list[float]:
        import ray

        times = []
        for ref in refs:
            t0 = time.perf_counter()
            np.array(ray.get(ref))
            times.append(time.perf_counter() - t0)
        return times

    def run(self, _key, _problem, task: Task) -> Done:
        t0 = time.perf_counter()
        time.sleep(task.cost * self.unit_s)
        return Done(None, time.perf_counter() - t0, 0, os.getpid())


def ray_overhead(counts: list[int], unit_s: float, per_worker: int) -> list[str]:
    import ray

    out = []
    ray.init(address="local", num_cpus=max(counts), include_dashboard=False, dashboard_port=free_port(),
             logging_level="WARNING")
    try:
        probe = ray.remote(SleepActor).options(num_cpus=1).remote(unit_s)
        ray.get(probe.info.remote())
        trips = []
        for _ in range(50):
            t0 = time.perf_counter()
            ray.get(probe.info.remote())
            trips.append(time.perf_counter() - t0)
        ray.kill(probe)
        out += [f"round trip of an empty actor call: median {1e3 * statistics.median(trips):.1f} ms, "
                f"min {1e3 * min(trips):.1f} ms (50 calls, load average {load()})",
                *object_store(ray, STATE_BYTES),
                f"{'actors':>6s} {'start s':>8s} {'tasks':>6s} {'ideal s':>8s} {'wall s':>7s} {'efficiency':>10s}"]
        for n in counts:
            t0 = time.perf_counter()
            actors = [ray.remote(SleepActor).options(num_cpus=1).remote(unit_s) for _ in range(n)]
            try:        # a first call also imports the task's module in each actor: part of the start
                ray.get([a.run.remote("warm", None, Task(0, (0,), 0, 1, 0.0)) for a in actors])
            except ray.exceptions.RayError as e:     # e.g. killed by Ray's memory monitor on this shared machine
                out.append(f"{n:6d}  could not start {n} actors: {str(e).splitlines()[0][:120]}")
                for a in actors:
                    ray.kill(a)
                break
            started = time.perf_counter() - t0
            tasks = [Task(0, (0,), 0, 1, 1.0) for _ in range(n * per_worker)]
            d = Dispatcher(n)
            try:
                d.run(RayBackend(ray, actors, "sleep", None), tasks, range(len(tasks)))
            except PlannerError as e:       # every actor died (Ray's memory monitor on this shared machine)
                out.append(f"{n:6d}  {e}")
                break
            ideal = per_worker * unit_s
            deaths = sum(s.deaths for s in d.stats)
            out.append(f"{n:6d} {started:8.1f} {len(tasks):6d} {ideal:8.2f} {d.wall_s:7.2f} {ideal / d.wall_s:10.3f}"
                       + (f"  ({deaths} actors killed by Ray's memory monitor: their tasks re-ran)" if deaths else ""))
            for a in actors:
                ray.kill(a)
    finally:
        ray.shutdown()
    return out


def object_store(ray, sizes: tuple[int, ...], repeats: int = 20) -> list[str]:
    """Put (in one actor) and get + writable copy (in another) of arrays of `sizes` bytes: what a shared
    reference's hidden states cost (planner.distributed.simulate.PUT_S / GET_S hold these medians)."""
    producer, consumer = (ray.remote(SleepActor).options(num_cpus=1).remote(0.0) for _ in range(2))
    out = []
    try:
        for n in sizes:
            refs, put = ray.get(producer.put.remote(n, repeats))
            got = ray.get(consumer.get.remote(refs))
            out.append(f"object store, {n / 1e6:.1f} MB ({repeats} arrays): put median {1e3 * statistics.median(put):.2f} ms "
                       f"(min {1e3 * min(put):.2f}), get + copy in another actor median {1e3 * statistics.median(got):.2f} ms "
                       f"(min {1e3 * min(got):.2f})")
    finally:
        for a in (producer, consumer):
            ray.kill(a)
    return out


WIDE = "wide: 128 plans x 32 windows"


def simulated(unit_s: float) -> list[str]:
    out = []
    for name, shipping in (("Llama-3-8B on H100s (paper, wide)", sim.LLAMA_8B_H100), ("default model on CPU workers (cpu)",
                                                                                    sim.SMOL_CPU)):
        out.append(f"shared references, {name}: forward of a window {1e3 * shipping.forward_s:.0f} ms, states "
                   f"{shipping.state_bytes / 1e6:.2f} MB; publish {shipping.put():.3f} forwards, fetch "
                   f"{shipping.get():.3f} + the head")
    scale = {"cpu": 4.0, WIDE: 0.1}
    for name, stages in (*SCHEDULES.items(), (WIDE, [Stage(128, 32)])):
        shipping = sim.SMOL_CPU if name == "cpu" else sim.LLAMA_8B_H100
        out.append(f"{name}: {stages}")
        out.append(f"  {'workers':>7s} {'tasks':>6s} {'granularity':>11s} {'dispatch':>8s} {'overall':>7s} "
                   f"{'speed-up':>8s} {'waited':>6s} {'prefetched':>10s} {'no prefetch':>11s} {'whole batches':>13s} "
                   f"{'refs recomputed':>15s}")
        for w in (1, 2, 4, 8, 16, 32):
            r = sim.best_of(3, partial(simulate, stages, w, unit_s=unit_s * scale.get(name, 1.0), shipping=shipping),
                            enough=1.0)
            cold = simulate(stages, w, shipping=shipping, prefetch=False, sleep=False)
            whole = simulate(stages, w, atom=4, shipping=shipping, sleep=False)
            alone = simulate(stages, w, shipping=None, sleep=False)
            out.append(f"  {w:7d} {r.tasks:6d} {r.granularity:11.3f} {r.dispatch:8.3f} {r.overall:7.3f} "
                       f"{r.overall * w:8.2f} {r.waited / r.busy:6.3f} {r.prefetched:10d} {cold.granularity:11.3f} "
                       f"{whole.granularity:13.3f} {alone.granularity:15.3f}")
    return out + anchor_sharing(SCHEDULES["paper"][0], 32)


def anchor_sharing(stage: Stage, workers: int, seed: int = 0) -> list[str]:
    """Would shipping the anchor's block inputs beat recomputing them, for a group of many plans on
    few windows (EvoPress's first stage)? Each consumer chunk runs the anchor up to the deepest block
    its plans start from; instead it could fetch the input of each distinct block its plans start
    from (the states of one window: a reference's size), which one producer would put once each."""
    sh, cost = sim.LLAMA_8B_H100, sim.cost_model()
    X = sim.offspring(np.random.default_rng(seed), len(cost.blocks), stage.candidates)
    first = cost.firsts(X)
    consumers = [t for t in split(0, X, stage.windows, workers, cost) if not t.produces]
    anchors = sum(len(t.windows) * cost.anchor(first[list(t.members)]) for t in consumers)
    starts = [(t, set(np.minimum(first[list(t.members)], cost.n_blocks - 1).tolist())) for t in consumers]
    states = sum(len(t.windows) * len(s) for t, s in starts)
    put = stage.windows * len(set().union(*(s for _, s in starts))) * sh.put()
    return [f"anchor block inputs shared instead ({stage}, {workers} workers, {len(consumers)} consumer tasks): their "
            f"anchor passes cost {anchors:.1f} forwards; fetching the {states} block inputs they start from would cost "
            f"{states * sh.get():.1f}, plus {put:.1f} of puts on the producers (which the consumers would wait for)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="rtn-g128", help="levels (RTN: no calibration; the speed is the same)")
    ap.add_argument("--generations", type=int, default=1)
    ap.add_argument("--actors", default="2,8,16,32", help="sleeping-actor counts for Ray's overhead (32 idle "
                    "actors take ~3 GB: a count that runs out of memory ends the section)")
    ap.add_argument("--unit-s", type=float, default=0.02, help="simulated seconds per full forward of one window")
    ap.add_argument("--sections", default="4,3,2,1", help="which sections, in this order (model-free first: "
                    "they need the memory the model would take)")
    ap.add_argument("--out", default="reports/ray_scaling.txt")
    args = ap.parse_args()

    import ray
    import torch

    from planner.pipeline import ModelData, prepare
    from planner.space import load_space

    torch.set_num_threads(1)
    lines = [f"# bench/ray_scaling.py  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}",
             f"# {os.cpu_count()} cores, load average {load()} at start; torch {torch.__version__}, ray {ray.__version__}",
             f"# default model SmolLM2-135M, levels {args.space}, bf16 evaluation unless stated", ""]
    model: dict = {}

    def session_problem():       # loaded after the model-free sections: they need the memory
        if not model:
            model["session"] = prepare(ModelData(), load_space(args.space), quiet=True)
            model["problem"] = model["session"].problem(parse_budget("3.0bits"))
        return model["session"], model["problem"]

    sections = [("1. per-token evaluation cost, in-process, 1 thread (2048 tokens: 4 windows of 512)",
                 lambda: per_token_cost(*session_problem())),
                (f"2. one-generation throughput, cpu schedule ({OFFSPRING} offspring @512, 4+1 @2048), "
                 f"{args.generations} generation(s) after a warm-up stage; Ray workers keep {CACHE_BYTES / 1e9:.1f} GB of "
                 "dequantized levels", lambda: throughput(*session_problem(), args.generations)),
                (f"3. Ray's own overhead: sleeping actors on {max(map(int, args.actors.split(',')))} logical CPUs, "
                 "8 tasks of 0.2 s per actor", lambda: ray_overhead([int(n) for n in args.actors.split(",")], 0.2, 8)),
                (f"4. simulated scaling (real planner + dispatcher, sleeping threads, {args.unit_s} s per window "
                 "forward; cpu schedule 4x, wide 0.1x that; a window's reference made once and fetched by the "
                 "other tasks on it, every task pays the anchor pass of its windows; the next stages' references "
                 "prefetched by workers idle in a stage's tail, each paying a forward, its publish and a task's "
                 "fixed costs; measured: the best of 3 runs (the machine's load only ever lowers it); 'waited': the "
                 "share of the workers' busy time spent waiting for a producer; "
                 "'prefetched': windows whose reference was made before their stage was cut; 'no prefetch': the "
                 "grid without it)", lambda: simulated(args.unit_s))]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = _sections(out.read_text()) if out.is_file() else {}   # sections not rerun stay as they were
    done: dict[str, list[str]] = {}
    for key in args.sections.split(","):
        title, fn = sections[int(key) - 1]
        t0 = time.perf_counter()
        body = fn()
        done[key] = [title, *body, f"   ({time.perf_counter() - t0:.0f} s; load average {load()}; "
                                   f"{time.strftime('%Y-%m-%d %H:%M')})", ""]
        print("\n".join(done[key]), flush=True)
        merged = {**kept, **done}
        out.write_text("\n".join(lines + [ln for k in sorted(merged) for ln in merged[k]]))   # a crash keeps the rest
    print(f"wrote {out}")


def _sections(text: str) -> dict[str, list[str]]:
    """A previous report's sections by number ("1".."4"), header dropped."""
    blocks: dict[str, list[str]] = {}
    key = None
    for line in text.splitlines():
        if line[:2] in {"1.", "2.", "3.", "4."}:
            key = line[0]
            blocks[key] = []
        if key is not None:
            blocks[key].append(line)
    return blocks


if __name__ == "__main__":
    main()
