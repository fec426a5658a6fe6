"""CPU benchmark of the packed runtime on the default model (SmolLM2-135M, levels gptq-g128).

For bf16 and for packed plans (uniform 2, 3, 4, 8 bits and a 3.0-bit mix of 2/3/4 bits) it measures,
each in a fresh process so that one configuration's memory never hides in another's:

- resident memory: anonymous RSS after loading the model (and packing it) minus before, after a
  garbage collection and malloc_trim (a first load, untimed, keeps imports out of the count); again
  after the timed runs (kernel forms built lazily included); beside it the bytes the tensors hold;
- prefill: tokens/s of one 512-token forward (batch 1; last position's logits only);
- decode: tokens/s of 32 greedy-style steps with the KV cache at batch 1 (after a 32-token prompt);

medians over --runs runs, with ratios against bf16. Beside the measured speeds, the speeds that
`planner.runtime.latency` predicts for the plan from its per-(shape, level, batch) table (measured
first, in its own process) check the additive latency model. Rows marked "int4-widened" keep 2/3-bit
codes in torch's int4 layout (4 bits of memory per weight) to use its fast op. One torch thread by
default (the machine's two cores are shared with other work: the load average is in the header). Usage:

    python bench/kernels_cpu.py [--threads 1] [--runs 5] [--out reports/kernels_cpu.txt]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFILL, PROMPT, DECODE = 512, 32, 32
UNIFORM_BITS = (2, 3, 4, 8)
WIDENED_BITS = (2, 3)
# a 3.0-bit mix: attention at 4 bits, down_proj and gate_proj at 3, up_proj at 2 (equal unit sizes per layer)
MIX = {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4, "down_proj": 3, "gate_proj": 3, "up_proj": 2}


def rss() -> dict[str, int]:
    """Resident bytes after gc + malloc_trim: anonymous (the process's own memory) and file-backed
    (mapped files, e.g. a safetensors checkpoint the loader read through mmap: reclaimable)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(status[f"Rss{k.title()}"].split()[0]) * 1024 for k in ("anon", "file")}


def _load(cfg: dict):
    import torch

    torch.set_num_threads(cfg["threads"])
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports stay out of the count)

    from planner.model.load import load_model

    base = rss()
    return load_model(cfg["source"], dtype=torch.bfloat16).model, base


def worker(cfg: dict) -> dict:
    """One configuration, in its own process."""
    import torch

    from kernels.cpu import CpuKind
    from planner.levels.db import LevelsDB
    from planner.plan import Plan
    from planner.runtime import pack_model, packed_modules

    model, base = _load(cfg)
    if cfg["plan"]:
        kind = CpuKind(cfg["cpu_kind"]) if cfg.get("cpu_kind") else None
        pack_model(model, Plan.of(cfg["plan"]), LevelsDB(Path(cfg["db"])), cpu_kind=kind)
    after = rss()
    resident = after["anon"] - base["anon"]
    packed = packed_modules(model)
    tensor_bytes = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
    tensor_bytes += sum(m.weight_nbytes for m in packed.values())
    kinds = sorted({m.kind for m in packed.values()})

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (1, PREFILL), generator=g)
    prompt = torch.randint(vocab, (1, PROMPT), generator=g)

    @torch.no_grad()
    def prefill():
        model(ids, use_cache=False, logits_to_keep=1)

    @torch.no_grad()
    def decode() -> float:
        out = model(prompt, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(DECODE):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0

    from planner.runtime.latency import median_seconds

    t_prefill = median_seconds(prefill, cfg["runs"])
    t_decode = statistics.median([decode() for _ in range(max(3, cfg["runs"] // 2) + 1)][1:])  # first: warm-up
    used = rss()["anon"] - base["anon"]    # lazily built kernel forms (e.g. int4 scales per dtype) included
    return {"label": cfg["label"], "resident": resident, "resident_after": used, "file_backed": after["file"] - base["file"],
            "tensor_bytes": tensor_bytes, "kinds": kinds,
            "prefill_tps": PREFILL / t_prefill, "decode_tps": DECODE / t_decode}


def table_worker(cfg: dict) -> dict:
    """The latency table of every (shape, level scheme) at batch 1 and PREFILL, on the dense bf16 model."""
    from planner.budget import Budget, Metric
    from planner.levels.db import LevelsDB
    from planner.runtime.latency import measure_table
    from planner.units import find_units

    model, _ = _load(cfg)
    db = LevelsDB(Path(cfg["db"]))
    problem = db.problem(find_units(model), Budget(1e9, Metric.BITS))
    return measure_table(model, problem, db, batches=(1, PREFILL), reps=cfg["runs"]).__dict__


def plans(session) -> list[dict]:
    from planner.budget import Budget, Metric
    from planner.plan import Plan

    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    out = [{"label": "bf16 (dense)", "plan": None, "bits": None, "x": None}]

    def level(i: int, bits: int) -> str:
        return next(lv for lv in problem.levels[i] if lv.startswith(f"gptq-b{bits}-"))

    def row(label: str, plan: dict, cpu_kind: str | None = None) -> dict:
        x = problem.encode(Plan.of(plan))
        return {"label": label, "plan": plan, "bits": problem.cost(x).bits, "x": [int(v) for v in x],
                "cpu_kind": cpu_kind}

    for b in UNIFORM_BITS:
        out.append(row(f"uniform {b}-bit", {u: level(i, b) for i, u in enumerate(problem.units)}))
    out.append(row("mix 2/3/4-bit", {u: level(i, MIX[u.rsplit(".", 1)[1]]) for i, u in enumerate(problem.units)}))
    for b in WIDENED_BITS:
        out.append(row(f"uniform {b}-bit *", {u: level(i, b) for i, u in enumerate(problem.units)}, "int4pack"))
    return out


def predicted(rows: list[dict], table_dict: dict, session) -> None:
    """Predicted prefill/decode tokens/s per row from the latency table (rows with default kernels)."""
    from planner.budget import Budget, Metric
    from planner.runtime.latency import DENSE, LatencyTable, predict, unit_shape

    table = LatencyTable(**table_dict)
    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    for r in rows:
        for key, batch in (("prefill_pred", PREFILL), ("decode_pred", 1)):
            if r.get("cpu_kind"):
                r[key] = None
            elif r["x"] is None:
                dense = sum(table.seconds(unit_shape(session.db, u), DENSE, batch) for u in problem.units)
                r[key] = batch / (table.rest[str(batch)] + dense)
            else:
                r[key] = batch / predict(table, problem, session.db, r["x"], batch)


def _fmt(v: float | None, ref: float) -> str:
    return f"{v:>7.1f} {v / ref:>5.2f}" if v is not None else f"{'-':>7} {'':>5}"


def table(rows: list[dict], meta: dict) -> str:
    ref = rows[0]
    lines = [f"kernels_cpu: {meta['model']} ({meta['space']}), {meta['threads']} torch thread(s), "
             f"medians of {meta['runs']} runs; {meta['cpu']}; torch {meta['torch']}; load average "
             f"{meta['load'][0]:.1f} at start, {meta['load'][1]:.1f} at end (2 cores, shared)",
             f"prefill: {PREFILL} tokens, batch 1 (last logits only); decode: {DECODE} steps with KV cache, batch 1",
             "resident = anonymous RSS growth from loading (+ packing) the whole model, measured (embeddings and",
             "lm_head stay bf16: 56.6 MB); after runs = the same after the timed runs; tensors = bytes its",
             "parameters and packed weights hold; pred = tokens/s predicted by planner.runtime.latency's table",
             "(additive: measured dense model minus its linears, plus each unit's packed-linear time);",
             "* = 2/3-bit codes widened into torch's int4 layout (4 bits of memory per weight) for its fast op", "",
             f"{'config':<16} {'bits':>5} {'kernels':<17} {'resident MB':>11} {'x bf16':>6} {'after runs':>10} "
             f"{'tensors MB':>10} {'prefill tok/s':>13} {'x':>5} {'pred':>7} {'x':>5} "
             f"{'decode tok/s':>12} {'x':>5} {'pred':>7} {'x':>5}"]
    for r in rows:
        bits = f"{r['bits']:.2f}" if r["bits"] is not None else "16"
        lines.append(f"{r['label']:<16} {bits:>5} {','.join(r['kinds']) or 'dense':<17} {r['resident'] / 1e6:>11.1f} "
                     f"{r['resident'] / ref['resident']:>6.2f} {r['resident_after'] / 1e6:>10.1f} "
                     f"{r['tensor_bytes'] / 1e6:>10.1f} {_fmt(r['prefill_tps'], ref['prefill_tps']):>19} "
                     f"{_fmt(r['prefill_pred'], ref['prefill_tps'])} "
                     f"{_fmt(r['decode_tps'], ref['decode_tps']):>18} {_fmt(r['decode_pred'], ref['decode_tps'])}")
    lines += ["", "x = ratio to the measured bf16 row (resident: smaller is better; tokens/s: larger is better)"]
    return "\n".join(lines)


def _run_worker(mode: str, cfg: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    try:
        proc = subprocess.run([sys.executable, __file__, f"--{mode}", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode:
        raise RuntimeError(f"{mode} worker for {cfg.get('label')!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the table here (e.g. reports/kernels_cpu.txt)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker or args.table_worker:
        fn, path = (worker, args.worker) if args.worker else (table_worker, args.table_worker)
        print(json.dumps(fn(json.loads(Path(path).read_text()))))
        return

    import torch

    from planner.pipeline import ModelData, prepare
    from planner.space import load_space

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    session = prepare(ModelData(), load_space("gptq-g128"), quiet=True)
    common = {"db": str(session.db.path), "source": session.loaded.source, "threads": args.threads, "runs": args.runs}
    latency = _run_worker("table-worker", {"label": "latency table", **common})
    rows = []
    for p in plans(session):
        row = {**p, **_run_worker("worker", {**common, **p})}
        rows.append(row)
        print(f"{p['label']}: " + json.dumps({k: v for k, v in row.items() if k not in ("plan", "x")}), file=sys.stderr)
    del session.loaded.model
    predicted(rows, latency, session)
    meta = {"model": session.spec.model, "space": "gptq-g128", "threads": args.threads, "runs": args.runs,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "load": (load0, os.getloadavg()[0])}
    text = table(rows, meta)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
