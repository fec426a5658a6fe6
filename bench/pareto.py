"""Hypervolume reached by nsga2, tpe, an evo sweep over budgets and a Hessian (Lagrangian) sweep,
at about equal numbers of evaluations, on the default model (SmolLM2-135M, gptq-g128 levels).

    python bench/pareto.py [--evals 60] [--tokens 512] [--budget 3.0bits] [--threads 1] \
        [--out runs/bench-pareto] > reports/pareto.txt

Every method gets about `--evals` measured plans under the upper budget (nominal bits per weight):
  nsga2     pymoo NSGA-II on (KL, bits), seeded with the uniform plans and mixes within the budget
  tpe       optuna on (KL, bits): its NSGA-II sampler (TPE proper is single-objective), same seeds
  evo       one evo run per budget of an even sweep up to the budget (racing 8 offspring through
            2@tokens/2 and 1@tokens), each warm-started from that budget's best uniform mix; the
            uniform plans and mixes of each budget count as evaluations
  hessian   the Lagrangian sweep (`lagrange`) of the cached Hutchinson sensitivity: the hull plan of
            `--evals` budgets, each measured once (duplicates collapse, so it may use fewer)
  nsga2+hess  nsga2 seeded with 16 hull plans of that sweep first (`--init hessian`), then the uniform ones
Every search plan is measured on `--tokens` tokens (evo's first racing stage on half), but on
different batches, so search KLs do not quite compare across methods: each method's own search
front (up to `--front` plans spread over size) is re-measured on the first `--judge-tokens` of the
held-out windows (never searched or calibrated on); `HV held-out`
is the hypervolume of those, `HV search` that of every plan on its search KL. Hypervolume: KL on
a log scale from 1e-3 to 10 nats and bits from the cheapest plan to the budget, normalized with
the reference point 10% past both (planner/search/hypervolume.py); higher is better, 1 = ideal.
The run dirs land under `--out` (run again with the same `--out`: finished searches are resumed,
i.e. reused, and only the held-out judging runs again); the merged dashboard goes to
reports/dashboard-example.html (with a screenshot next to it when chromium is installed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.budget import Budget, Metric, parse_budget  # noqa: E402
from planner.pipeline import ModelData, prepare  # noqa: E402
from planner.report.dashboard import write_dashboard  # noqa: E402
from planner.report.tables import load_runs  # noqa: E402
from planner.rundir import RunDir  # noqa: E402
from planner.search import make_searcher, run_search  # noqa: E402
from planner.search.hypervolume import nondominated, plans_hypervolume  # noqa: E402
from planner.space import load_space  # noqa: E402

EVO_RACE = {"offspring": 8, "stages": [[2, 256], [1, 512]]}      # 11 evaluations per generation


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_dir(root: Path, name: str, problem, method: str) -> RunDir:
    """A fresh run dir, or the one a previous bench left (its searches resume, or are done)."""
    if (root / name / "problem.json").is_file():
        return RunDir.open(root / name)
    run = RunDir.create(root / name, {"name": name, "method": method, "budget": str(problem.budget), "seed": 0,
                                      "space": "gptq-g128"})
    run.save_problem(problem)
    return run


def search(run: RunDir, problem, ev, method: str, config: dict, checkpoint: str = "checkpoint.json"):
    s = make_searcher(method, problem, config, 0)
    run_search(s, problem, ev.evaluate, run, checkpoint=checkpoint)
    return s


def uniform_seeds(run: RunDir, problem, ev, tokens: int):
    u = search(run, problem, ev, "uniform", {"tokens": tokens}, "checkpoint.uniform.json")
    ok = sorted((kl, x) for x, kl in u.results if math.isfinite(kl) and problem.feasible(x))
    return u, [list(x) for _, x in ok]


def run_methods(session, problem, root: Path, evals: int, sweep: int, tokens: int) -> dict[str, list[RunDir]]:
    ev = session.evaluator(problem)
    out: dict[str, list[RunDir]] = {}
    base = run_dir(root, "uniform", problem, "uniform")
    _, seeds = uniform_seeds(base, problem, ev, tokens)
    pop = 20
    nsga2 = {"generations": max(1, round(evals / pop)), "pop_size": pop, "objectives": ["kl", "bits"], "tokens": tokens}
    for method, config in (("nsga2", {**nsga2, "init_xs": seeds}),
                           ("tpe", {"trials": evals, "batch": pop, "objectives": ["kl", "bits"], "init_xs": seeds,
                                    "tokens": tokens})):
        t0 = time.perf_counter()
        run = run_dir(root, method, problem, method)
        search(run, problem, ev, method, config)
        out[method] = [run]
        log(f"{method}: {len(run.results())} evaluations, {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    lo = problem.cost(np.zeros(problem.n_units, dtype=int)).bits
    out["evo"] = []
    for k in range(1, sweep + 1):
        b = Budget(lo + (problem.budget.value - lo) * k / sweep, Metric.BITS)
        p = session.problem(b)
        e = session.evaluator(p)
        run = run_dir(root, f"evo-{b.value:.3f}bits", p, "evo")
        u = search(run, p, e, "uniform", {"tokens": tokens}, "checkpoint.uniform.json")
        left = evals // sweep - sum(r.method == "uniform" for r in run.results())
        gens = max(1, left // (EVO_RACE["offspring"] + EVO_RACE["stages"][0][0] + 1))
        race = {**EVO_RACE, "stages": [[2, tokens // 2], [1, tokens]]}
        search(run, p, e, "evo", {**race, "generations": gens, "init_x": list(u.best())})
        out["evo"].append(run)
    log(f"evo sweep: {sum(len(r.results()) for r in out['evo'])} evaluations, {time.perf_counter() - t0:.0f} s")
    ev = session.evaluator(problem)
    try:
        from planner.sensitivity import Score, SensitivityConfig, session_sensitivity
    except ImportError:
        log("hessian: planner.sensitivity is absent: no Hessian sweep")
        return out
    t0 = time.perf_counter()
    sens = session_sensitivity(session, SensitivityConfig(score=Score.HUTCHINSON))
    run = run_dir(root, "hessian", problem, "lagrange")
    run.write("sensitivity.json", {"score": sens.score, "units": list(sens.units), "value": list(sens.value),
                                   "stderr": list(sens.stderr)})        # what `planner search` writes: the dashboard shows it
    search(run, problem, ev, "lagrange", {"damage": sens.rows(problem), "score": sens.score, "points": evals,
                                          "tokens": tokens})
    out["hessian"] = [run]
    log(f"hessian sweep: {len(run.results())} evaluations, {time.perf_counter() - t0:.0f} s (+ sensitivity, cached)")
    t0 = time.perf_counter()
    hull = make_searcher("lagrange", problem, {"damage": sens.rows(problem), "points": 16}, 0).plans
    run = run_dir(root, "nsga2-hessian", problem, "nsga2")
    search(run, problem, ev, "nsga2", {**nsga2, "init_xs": [list(x) for x, _, _ in hull] + seeds})
    out["nsga2+hess"] = [run]
    log(f"nsga2 seeded with the hull: {len(run.results())} evaluations, {time.perf_counter() - t0:.0f} s")
    return out


def judge(session, problem, runs: list[RunDir], front: int, windows) -> dict:
    """Every plan of a method's runs within the budget; its search front, re-measured on held-out."""
    merged = load_runs([r.path for r in runs])
    plans = merged.plans[merged.plans.bits <= problem.budget.value * (1 + 1e-12)]
    rows = merged.rows
    hv_search = plans_hypervolume(problem, ("kl", "bits"), [merged.xs[i] for i in plans.index], plans.kl.tolist())
    pts = plans[["bits", "kl"]].to_numpy(dtype=float)
    fr = plans[nondominated(pts)].sort_values("bits")
    m = min(front, len(fr))
    pick = sorted({round(i * (len(fr) - 1) / max(m - 1, 1)) for i in range(m)})
    ev = session.evaluator(problem)
    held = []
    for pid in fr.index[pick]:
        s = ev.score(problem.decode(merged.xs[pid]), windows)
        held.append((merged.xs[pid], s.kl, problem.cost(merged.xs[pid]).bits))
    hv_held = plans_hypervolume(problem, ("kl", "bits"), [x for x, _, _ in held], [k for _, k, _ in held])
    at_budget = min((k for _, k, _ in held), default=math.nan)
    return {"evals": len(rows), "tokens": int(rows.tokens.sum()), "seconds": float(rows.seconds.sum()),
            "plans": len(plans), "front": len(fr), "judged": len(held), "hv_search": hv_search, "hv_held": hv_held,
            "best_held": at_budget, "held": held}


def screenshot(page: Path, png: Path) -> bool:
    """A full-page PNG of the dashboard in headless Chromium (False when there is no browser)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return False
    if chromium is None:
        return False
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-quic", "--no-first-run", "--disable-background-networking",
                               "--disable-component-update", "--disable-sync"])
        pg = b.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(page.resolve().as_uri())
        pg.wait_for_function("document.getElementById('scatter').data !== undefined")
        pg.screenshot(path=str(png), full_page=True)
        b.close()
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evals", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per search evaluation")
    ap.add_argument("--judge-tokens", type=int, default=2048, help="held-out tokens the fronts are re-measured on")
    ap.add_argument("--budget", default="3.0bits")
    ap.add_argument("--sweep", type=int, default=3, help="evo budgets in the sweep")
    ap.add_argument("--front", type=int, default=5, help="front plans per method re-measured on held-out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=f"runs/bench-pareto-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--dashboard", default="reports/dashboard-example.html")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    session = prepare(ModelData(), load_space("gptq-g128"), quiet=True)
    problem = session.problem(parse_budget(args.budget))
    log(f"prepared in {time.perf_counter() - t_all:.0f} s")
    root = Path(args.out)
    by_method = run_methods(session, problem, root, args.evals, args.sweep, args.tokens)
    windows = session.windows.heldout[: max(1, args.judge_tokens // session.spec.seqlen)]
    results = {m: judge(session, problem, runs, args.front, windows) for m, runs in by_method.items()}
    merged_held = [(m, x, k, b) for m, r in results.items() for x, k, b in r["held"]]
    mask = nondominated(np.array([[b, k] for _, _, k, b in merged_held]))
    share = {m: sum(1 for (mm, *_), keep in zip(merged_held, mask, strict=True) if keep and mm == m) for m in results}

    print(f"bench/pareto.py: SmolLM2-135M (default), gptq-g128 levels, budget <= {problem.budget} (upper bound), "
          f"~{args.evals} evaluations of {args.tokens} tokens per method, torch threads {args.threads}")
    print("hypervolume: KL log-scaled 1e-3..10 nats x bits from the cheapest plan to the budget, reference 10% past "
          "both, normalized (1 = ideal); held-out = each method's search front (<= "
          f"{args.front} plans) re-measured on {len(windows) * session.spec.seqlen} held-out tokens\n")
    head = f"{'method':<11} {'evals':>5} {'tokens':>8} {'eval s':>7} {'plans':>5} {'front':>5} {'HV search':>9} " \
           f"{'HV held-out':>11} {'best held-out KL':>16} {'merged front':>12}"
    print(head)
    print("-" * len(head))
    for m, r in results.items():
        print(f"{m:<11} {r['evals']:>5} {r['tokens']:>8} {r['seconds']:>7.0f} {r['plans']:>5} {r['front']:>5} "
              f"{r['hv_search']:>9.4f} {r['hv_held']:>11.4f} {r['best_held']:>16.4f} {share[m]:>5}/{int(mask.sum()):<6}")
    if "hessian" not in results:
        print("hessian: absent (no planner.sensitivity / lagrange searcher)")
    print("\nmerged held-out front (bits, KL, method):")
    for (m, _, k, b), keep in sorted(zip(merged_held, mask, strict=True), key=lambda t: t[0][3]):
        if keep:
            print(f"  {b:6.3f}  {k:8.4f}  {m}")
    runs = [r.path for rs in by_method.values() for r in rs] + [root / "uniform"]
    out = write_dashboard(runs, Path(args.dashboard))
    png = out.with_suffix(".png")
    shot = f", screenshot {png}" if screenshot(out, png) else " (no chromium: no screenshot)"
    print(f"\nrun dirs under {root}; dashboard of all of them: {out}{shot}; "
          f"total {(time.perf_counter() - t_all) / 60:.1f} min")


if __name__ == "__main__":
    main()
