"""CPU benchmark of the packed runtime on the default model (SmolLM2-135M, levels gptq-g128).

For bf16 and for packed plans (uniform 2, 3, 4, 8 bits and a 3.0-bit mix of 2/3/4 bits) it measures,
each in a fresh process so that one configuration's memory never hides in another's:

- resident memory: anonymous RSS after loading the model (and packing it) minus before, after a
  garbage collection and malloc_trim (a first load, untimed, keeps imports out of the count); again
  after the timed runs (kernel forms built lazily included); beside it the bytes the tensors hold;
- prefill: tokens/s of one 512-token forward (batch 1; last position's logits only);
- decode: tokens/s of 32 greedy-style steps with the KV cache at batch 1 (after a 32-token prompt);

medians over --runs runs, with ratios against bf16. One torch thread by default (the machine's two
cores are shared). Usage:

    python bench/kernels_cpu.py [--threads 1] [--runs 5] [--out reports/kernels_cpu.txt]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PREFILL, PROMPT, DECODE = 512, 32, 32
UNIFORM_BITS = (2, 3, 4, 8)
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


def _median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(cfg: dict) -> dict:
    """One configuration, in its own process."""
    import torch

    torch.set_num_threads(cfg["threads"])
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports stay out of the count)

    from planner.levels.db import LevelsDB
    from planner.model.load import load_model
    from planner.plan import Plan
    from planner.runtime import pack_model, packed_modules

    base = rss()
    model = load_model(cfg["source"], dtype=torch.bfloat16).model
    if cfg["plan"]:
        pack_model(model, Plan.of(cfg["plan"]), LevelsDB(Path(cfg["db"])))
    after = rss()
    resident, file_backed = after["anon"] - base["anon"], after["file"] - base["file"]
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
    def decode():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(DECODE):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode.seconds.append(time.perf_counter() - t0)

    decode.seconds = []
    t_prefill = _median_time(prefill, cfg["runs"])
    for _ in range(max(3, cfg["runs"] // 2) + 1):
        decode()
    t_decode = statistics.median(decode.seconds[1:])   # the first run warms up
    del decode.seconds
    used = rss()["anon"] - base["anon"]    # lazily built kernel forms (e.g. int4 scales per dtype) included
    return {"label": cfg["label"], "resident": resident, "resident_after": used, "file_backed": file_backed,
            "tensor_bytes": tensor_bytes, "kinds": kinds,
            "prefill_tps": PREFILL / t_prefill, "decode_tps": DECODE / t_decode}


def plans(session) -> list[tuple[str, dict | None, float | None]]:
    from planner.budget import Budget, Metric
    from planner.plan import Plan

    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    out: list[tuple[str, dict | None, float | None]] = [("bf16 (dense)", None, None)]

    def level(i: int, bits: int) -> str:
        return next(lv for lv in problem.levels[i] if lv.startswith(f"gptq-b{bits}-"))

    def bits_of(plan: dict) -> float:
        return problem.cost(problem.encode(Plan.of(plan))).bits

    for b in UNIFORM_BITS:
        plan = {u: level(i, b) for i, u in enumerate(problem.units)}
        out.append((f"uniform {b}-bit", plan, bits_of(plan)))
    plan = {u: level(i, MIX[u.rsplit(".", 1)[1]]) for i, u in enumerate(problem.units)}
    out.append(("mix 2/3/4-bit", plan, bits_of(plan)))
    return out


def table(rows: list[dict], meta: dict) -> str:
    ref = rows[0]
    lines = [f"kernels_cpu: {meta['model']} ({meta['space']}), {meta['threads']} torch thread(s), "
             f"medians of {meta['runs']} runs; {meta['cpu']}; torch {meta['torch']}",
             f"prefill: {PREFILL} tokens, batch 1 (last logits only); decode: {DECODE} steps with KV cache, batch 1",
             "resident = anonymous RSS growth from loading (+ packing) the whole model, measured (embeddings and",
             "lm_head stay bf16); after runs = the same after the timed runs; tensors = bytes its parameters and",
             "packed weights hold", "",
             f"{'config':<16} {'bits':>5} {'kernels':<17} {'resident MB':>11} {'x bf16':>6} {'after runs':>10} "
             f"{'tensors MB':>10} {'prefill tok/s':>13} {'x bf16':>6} {'decode tok/s':>12} {'x bf16':>6}"]
    for r in rows:
        bits = f"{r['bits']:.2f}" if r["bits"] is not None else "16"
        lines.append(f"{r['label']:<16} {bits:>5} {','.join(r['kinds']) or 'dense':<17} {r['resident'] / 1e6:>11.1f} "
                     f"{r['resident'] / ref['resident']:>6.2f} {r['resident_after'] / 1e6:>10.1f} "
                     f"{r['tensor_bytes'] / 1e6:>10.1f} "
                     f"{r['prefill_tps']:>13.1f} {r['prefill_tps'] / ref['prefill_tps']:>6.2f} "
                     f"{r['decode_tps']:>12.1f} {r['decode_tps'] / ref['decode_tps']:>6.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the table here (e.g. reports/kernels_cpu.txt)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    from planner.pipeline import ModelData, prepare
    from planner.space import load_space

    torch.set_num_threads(args.threads)
    session = prepare(ModelData(), load_space("gptq-g128"), quiet=True)
    rows = []
    for label, plan, bits in plans(session):
        cfg = {"label": label, "plan": plan, "db": str(session.db.path), "source": session.loaded.source,
               "threads": args.threads, "runs": args.runs}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                              text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["bits"] = bits
        rows.append(row)
        print(f"{label}: {row}", file=sys.stderr)
    meta = {"model": session.spec.model, "space": "gptq-g128", "threads": args.threads, "runs": args.runs,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    text = table(rows, meta)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
