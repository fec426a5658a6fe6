"""Sensitivity-driven exact allocation against the best uniform mix and evo, on the default model.

    python bench/hessian_vs_evo.py [--budgets 2.5,3.0,3.5,4.0] [--generations 10] [--threads 1] \
        > reports/hessian_vs_evo.txt

Per budget (nominal code bits per weight, gptq-g128 levels):
  uniform mix       the best two-adjacent-level mix of the uniform searcher (2048 search tokens)
  ilp <score>       the exact knapsack plan of each score's predicted damage (planner.sensitivity),
                    measured once on the search pool; `pred` is the score's own prediction (KL in
                    nats/token, except `proxy`: a layer-local output error, not KL)
  evo               evo, `cpu` schedule for N generations, warm-started from the best mix (the default)
  evo + ilp init    the same evo warm-started from the ILP plan that measured best on the search pool
Every final plan is measured on the held-out windows (8192 tokens, never searched or calibrated on).
`wall s` is the method's own time (ILP: solve + one measurement; the scores' one-off cost is listed
first and shared by all budgets); KL/mix and KL/evo are held-out KL ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.budget import parse_budget  # noqa: E402
from planner.pipeline import ModelData, prepare  # noqa: E402
from planner.rundir import RunDir  # noqa: E402
from planner.search import make_searcher, run_search  # noqa: E402
from planner.search.evo import SCHEDULES  # noqa: E402
from planner.sensitivity import Score, SensitivityConfig, session_sensitivity  # noqa: E402
from planner.space import load_space  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def search(method: str, problem, evaluator, config: dict, seed: int, workdir: str):
    """(searcher, its journal rows, wall seconds): run through the normal loop into a scratch run dir."""
    run = RunDir.create(Path(tempfile.mkdtemp(dir=workdir)) / "run", {"method": method})
    s = make_searcher(method, problem, config, seed)
    t0 = time.perf_counter()
    run_search(s, problem, evaluator.evaluate, run)
    return s, run.results(), time.perf_counter() - t0


def budget_rows(session, sens: dict, bits: str, generations: int, seed: int, workdir: str) -> list[dict]:
    problem = session.problem(parse_budget(f"{bits}bits"))
    ev = session.evaluator(problem)
    rows: list[dict] = []

    def add(key: str, x, seconds: float, evals: int, pred: float | None = None, label: str = "") -> None:
        s = ev.score(problem.decode(x), session.windows.heldout)
        label = label or key
        rows.append({"key": key, "label": label, "bits": problem.cost(x).bits, "kl": s.kl, "ppl": s.ppl, "pred": pred,
                     "seconds": seconds, "evals": evals})
        log(f"  {bits} bits  {label:<22} held-out KL {s.kl:.4f}  ({seconds:.0f} s)")

    uni, urows, t = search("uniform", problem, ev, {"tokens": 2048}, seed, workdir)
    add("uniform mix", uni.best(), t, len(urows))
    on_pool = {}
    for name, s in sens.items():
        ilp, irows, t = search("ilp", problem, ev, {"damage": s.rows(problem), "score": name}, seed, workdir)
        on_pool[name] = irows[0].kl
        add(f"ilp {name}", ilp.best(), t, len(irows), irows[0].extra["predicted"])
    evo = {**SCHEDULES["cpu"], "generations": generations}
    e, erows, t = search("evo", problem, ev, {**evo, "init_x": list(uni.best())}, seed, workdir)
    add("evo", e.best(), t, len(erows))
    pick = min(on_pool, key=on_pool.get)
    ilp_x = make_searcher("ilp", problem, {"damage": sens[pick].rows(problem)}, seed).best()
    e, erows, t = search("evo", problem, ev, {**evo, "init_x": list(ilp_x)}, seed, workdir)
    add("evo+ilp init", e.best(), t, len(erows), label=f"evo + ilp {pick} init")
    return rows


def table(budget: str, rows: list[dict]) -> list[str]:
    mix = rows[0]["kl"]
    evo = next(r["kl"] for r in rows if r["key"] == "evo")
    out = [f"\n## budget {budget} bits",
           f"{'plan':<24} {'bits':>6} {'pred':>9} {'KL':>8} {'ppl':>8} {'meas/pred':>9} {'evals':>6} {'wall s':>7} "
           f"{'KL/mix':>7} {'KL/evo':>7}"]
    for r in rows:
        pred = "-" if r["pred"] is None else f"{r['pred']:.4g}"
        ratio = "-" if r["pred"] is None or r["key"].endswith("proxy") else f"{r['kl'] / r['pred']:.2f}"
        out.append(f"{r['label']:<24} {r['bits']:>6.3f} {pred:>9} {r['kl']:>8.4f} {r['ppl']:>8.2f} {ratio:>9} "
                   f"{r['evals']:>6} {r['seconds']:>7.0f} {r['kl'] / mix:>7.3f} {r['kl'] / evo:>7.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="2.5,3.0,3.5,4.0")
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--scores", default=",".join(s.value for s in Score))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    md = ModelData(seed=args.seed)
    session = prepare(md, load_space("gptq-g128"), quiet=True)
    sens, lines = {}, ["## sensitivity scores (computed once per model + calibration set; cached)",
                       f"{'score':<11} {'seconds':>8} {'probes':>7} {'max rel stderr':>15}"]
    for name in args.scores.split(","):
        t0 = time.perf_counter()
        s = session_sensitivity(session, SensitivityConfig(score=Score(name)))
        sens[name] = s
        v, e = np.array(s.value), np.array(s.stderr)
        rel = "-" if name in ("proxy", "noise") else f"{np.max(e / np.abs(v)):.3f}"
        lines.append(f"{name:<11} {s.seconds:>8.0f} {s.probes:>7} {rel:>15}")
        log(f"sensitivity {name}: {s.seconds:.0f} s to compute ({time.perf_counter() - t0:.0f} s now)")
    workdir = tempfile.mkdtemp(prefix="hessian-vs-evo-")
    per_budget = {b: budget_rows(session, sens, b, args.generations, args.seed, workdir) for b in args.budgets.split(",")}

    print(f"# bench/hessian_vs_evo.py  model {md.model}  space gptq-g128  seed {args.seed}  "
          f"evo: cpu schedule, {args.generations} generations  threads {args.threads}  "
          f"total {(time.perf_counter() - t_all) / 60:.1f} min")
    print(f"# held-out: {md.eval_tokens} tokens never used for calibration or search; KL in nats/token")
    print("\n".join(lines))
    for b, rows in per_budget.items():
        print("\n".join(table(b, rows)))
    print("\n## summary: held-out KL per budget (ratio to the best uniform mix)")
    keys = [r["key"] for r in next(iter(per_budget.values()))]
    print(f"{'bits':>5} " + " ".join(f"{k[:15]:>15}" for k in keys))
    for b, rows in per_budget.items():
        mix = rows[0]["kl"]
        print(f"{b:>5} " + " ".join(f"{r['kl']:>7.4f} ({r['kl'] / mix:.2f})"[:15].rjust(15) for r in rows))


if __name__ == "__main__":
    main()
