"""Evo against uniform plans, simple rules, a per-layer-error proxy and EvoPress's own default
configuration on the default model; every final plan measured on held-out windows of the
calibration corpus and on a second corpus the search never saw.

    python bench/evo_quality.py [--budgets 2.5,3.0,3.5] [--generations 20] [--out reports/evo_quality.txt]
    python bench/evo_quality.py --budgets 2.5 --rows baselines,evo-hessian --hessian-generations 100   # a longer run

Rows per budget:
  uniform            the highest single level within budget
  best mix           the best two-adjacent-level mix over the uniform searcher's orders
  rule: <order>      one-line rules (first/last/sandwich layers, attention+down_proj first)
  proxy (ilp)        exact allocation of the summed per-layer weight error ||W - Q||^2 (HiGHS)
  evopress-default   evo with swaps only between same-size units and EvoPress's super-fast
                     racing (16 offspring, 1@512, 1@8192), given our number of evaluations
  hessian: ilp       exact allocation of the Fisher sensitivity's predicted damage (issue 4, HiGHS)
  evo (ours)         cost-aware swaps, the `cpu` schedule, warm-started from the best mix
  evo (ours, local repair)  the same with `--local-repair` (the budget repair stays at or after the
                     first switched block: more prefix-cache reuse, bench/evo_speed.py)
  evo (ours, ...)    evo warm-started from the hessian plan (`--init hessian`)
  evo (..., screened) from the hessian plan, breeding --screen x 16 offspring and racing the 16 the
                     Fisher damage predicts best (`--init hessian --screen N`)
  evo refine         a second run from the best evo plan above (or --refine-from PLAN.json) with the
                     `refine` schedule (its stages, generations and screen unless overridden) and search
                     seed + 1: `planner search --init PLAN.json --schedule refine --seed 1`

Every evo row's plan is written to --plans DIR (default reports/plans) as <budget>bits-<row>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.budget import parse_budget  # noqa: E402
from planner.cli import _parse_stages  # noqa: E402
from planner.data.corpus import BUILTIN_DOCS, load_text  # noqa: E402
from planner.data.windows import make_windows, tokenize  # noqa: E402
from planner.evaluate.evaluator import InProcessEvaluator  # noqa: E402
from planner.pipeline import DTYPES, ModelData, prepare  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.rundir import RunDir  # noqa: E402
from planner.search import (  # noqa: E402
    ilp,  # noqa: E402,F401  (registers 'ilp')
    make_searcher,
    run_search,
)
from planner.search.evo import SCHEDULES  # noqa: E402
from planner.sensitivity import proxy_inputs  # noqa: E402
from planner.space import load_space  # noqa: E402

ROWS = ("baselines", "evopress", "evo", "evo-local", "evo-hessian", "evo-screen", "refine")
RULES = ("by-block-asc", "by-block-desc", "sandwich", "attention+down-first")


def weight_error_damage(session, problem) -> list[list[float]]:
    """||W - Q||_F^2 per (unit, level): the 'sum of per-layer errors' proxy."""
    model = session.loaded.model
    out = []
    for u, name in enumerate(problem.units):
        W = model.get_submodule(name).weight.detach().float()
        out.append([float((W - session.db.weight(name, lv, torch.float32)).pow(2).sum()) for lv in problem.levels[u]])
    return out


def search(method, problem, evaluator, config, seed, workdir):
    run = RunDir.create(Path(tempfile.mkdtemp(dir=workdir)) / "run", {"method": method})
    s = make_searcher(method, problem, config, seed)
    t0 = time.perf_counter()
    n0 = evaluator.evaluations
    run_search(s, problem, evaluator.evaluate, run)
    return s, run, evaluator.evaluations - n0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="2.5,3.0,3.5")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="reports/evo_quality.txt")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"which searches to run, comma-separated from {','.join(ROWS)} (the baselines are cheap)")
    ap.add_argument("--hessian-generations", type=int, default=None,
                    help="generations of the evo-from-hessian rows (default: --generations)")
    refine = SCHEDULES["refine"]
    ap.add_argument("--screen", type=int, default=refine["screen"], help="the evo-screen and refine rows' screen")
    ap.add_argument("--refine-from", default=None, help="refine row: start from this plan file (default: the best "
                    "evo row of this run)")
    ap.add_argument("--refine-generations", type=int, default=refine["generations"])
    ap.add_argument("--refine-stages", default=",".join(f"{n}@{t}" for n, t in refine["stages"]))
    ap.add_argument("--refine-seed", type=int, default=None, help="the refine row's search seed (default --seed + 1; "
                    "--seed also picks the windows)")
    ap.add_argument("--plans", default="reports/plans", help="where each evo row's plan is written")
    args = ap.parse_args()
    wanted = set(args.rows.split(","))
    if not wanted <= set(ROWS) or "baselines" not in wanted:
        ap.error(f"--rows: choose from {','.join(ROWS)}, baselines included (every ratio is against them)")
    torch.set_num_threads(args.threads)
    out = open(args.out, "w")
    Path(args.plans).mkdir(parents=True, exist_ok=True)

    def emit(line: str = "") -> None:
        print(line)
        out.write(line + "\n")
        out.flush()

    md = ModelData(seed=args.seed)
    session = prepare(md, load_space("gptq-g128"), quiet=True)
    docs = make_windows(tokenize(session.loaded.tokenizer, load_text(BUILTIN_DOCS)), md.seqlen, md.calib_tokens,
                        md.eval_tokens, md.seed)
    workdir = tempfile.mkdtemp(prefix="evo-quality-")
    cpu = SCHEDULES["cpu"]
    ours_per_gen = cpu["offspring"] + sum(s for s, _ in cpu["stages"][:-1]) + 1
    ep_stages = ((1, 512), (1, 8192))
    ep_per_gen = 16 + 1 + 1
    emit(f"# bench/evo_quality.py  model {md.model}  space gptq-g128  seed {args.seed}  generations {args.generations}")
    emit(f"# held-out: {md.eval_tokens} tokens of 'builtin' (calibration corpus, never searched on) "
         f"and {md.eval_tokens} tokens of '{BUILTIN_DOCS}' (never seen)")
    summary = []
    for b in args.budgets.split(","):
        problem = session.problem(parse_budget(f"{b}bits"))
        ev = session.evaluator(problem)
        ev_docs = InProcessEvaluator(session.loaded.model, session.db, problem, docs, dtype=DTYPES[md.dtype])
        rows: list[tuple] = []
        notes: list[str] = []

        def measure(label, x, evals, seconds, problem=problem, ev=ev, ev_docs=ev_docs, rows=rows, b=b):
            plan = problem.decode(x)
            a = ev.score(plan, session.windows.heldout)
            d = ev_docs.score(plan, docs.heldout)
            c = problem.cost(x)
            rows.append((label, evals, seconds, c.bits, c.bpw, a.kl, a.ppl, d.kl, d.ppl, tuple(x)))
            if label.startswith("evo"):
                slug = "-".join("".join(ch if ch.isalnum() else " " for ch in label).split())
                Path(args.plans, f"{b}bits-{slug}.json").write_text(json.dumps(
                    plan.to_json(row=label, heldout_kl=a.kl, docs_kl=d.kl, evaluations=evals), indent=1))

        uni, urun, n, t = search("uniform", problem, ev, {"tokens": 2048}, args.seed, workdir)
        res = [r for r in urun.results() if r.error is None]
        top = max((r for r in res if r.label.startswith("uniform ")), key=lambda r: r.bits)
        measure(f"uniform {problem.levels[0][int(top.label.split()[1])]}", top.x, 1, top.seconds)
        mixes = [r for r in res if r.label.startswith("mix ")]
        if mixes:
            best_mix = min(mixes, key=lambda r: r.kl)
            measure(f"best mix ({best_mix.label.split(' ', 2)[2]})", best_mix.x, len(mixes), sum(r.seconds for r in mixes))
            for rule in RULES:
                r = next((r for r in mixes if r.label.endswith(" " + rule)), None)
                if r is not None:
                    measure(f"rule: {rule}", r.x, 1, r.seconds)
        t0 = time.perf_counter()
        damage = weight_error_damage(session, problem)
        proxy, _, n, t = search("ilp", problem, ev, {"damage": damage, "score": "weight-mse"}, args.seed, workdir)
        measure("proxy: ilp on sum ||W-Q||^2", proxy.best(), n, time.perf_counter() - t0)
        t0 = time.perf_counter()
        fisher = proxy_inputs(session, problem, None, "ilp", {}, None, "fisher", args.seed)
        hess, _, n, t = search("ilp", problem, ev, fisher, args.seed, workdir)
        measure("hessian: ilp on fisher damage", hess.best(), n, time.perf_counter() - t0)
        init = list(uni.best())
        ours_evals = args.generations * ours_per_gen
        ep = {"generations": math.ceil(ours_evals / ep_per_gen), "offspring": 16, "stages": ep_stages,
              "same_size_only": True, "init_x": init}
        if "evopress" in wanted:
            s, _, n, t = search("evo", problem, ev, ep, args.seed, workdir)
            measure("evopress-default (same-size swaps)", s.best(), n, t)
        mine = {**cpu, "generations": args.generations, "init_x": init}
        if "evo" in wanted:
            s, _, n, t = search("evo", problem, ev, mine, args.seed, workdir)
            measure("evo (ours)", s.best(), n, t)
        if "evo-local" in wanted:
            s, _, n, t = search("evo", problem, ev, {**mine, "local_repair": True}, args.seed, workdir)
            measure("evo (ours, local repair)", s.best(), n, t)
        gens = args.hessian_generations or args.generations
        from_hess = {**mine, "generations": gens, "init_x": list(hess.best())}
        span = "" if gens == args.generations else f", {gens} gens"
        if "evo-hessian" in wanted:
            s, _, n, t = search("evo", problem, ev, from_hess, args.seed, workdir)
            measure(f"evo (ours, from hessian{span})", s.best(), n, t)
        if "evo-screen" in wanted:
            s, _, n, t = search("evo", problem, ev, {**from_hess, "screen": args.screen, "damage": fisher["damage"]},
                                args.seed, workdir)
            measure(f"evo (ours, from hessian, screen {args.screen}{span})", s.best(), n, t)
        if "refine" in wanted:
            if args.refine_from:
                start, origin = problem.encode(Plan.load(args.refine_from)), Path(args.refine_from).name
            else:
                best = min((r for r in rows if r[0].startswith("evo")), key=lambda r: r[5], default=None)
                if best is None:
                    ap.error("--rows refine needs an evo row before it, or --refine-from PLAN.json")
                start, origin = best[-1], best[0]
            config = {**mine, "generations": args.refine_generations, "stages": _parse_stages(args.refine_stages),
                      "screen": args.screen, "damage": fisher["damage"], "init_x": [int(v) for v in start]}
            rseed = args.seed + 1 if args.refine_seed is None else args.refine_seed
            s, _, n, t = search("evo", problem, ev, config, rseed, workdir)
            measure(f"evo refine ({args.refine_generations} gens)", s.best(), n, t)
            notes.append(f"# refine: {args.refine_generations} generations, stages {args.refine_stages}, screen "
                         f"{args.screen}, seed {rseed}, from {origin}")

        base = rows[0][5]
        emit(f"\n## budget {b} bits")
        emit(f"{'plan':<38} {'evals':>6} {'wall s':>7} {'bits':>6} {'bpw':>6} {'KL':>8} {'ppl':>8} "
             f"{'KL docs':>8} {'ppl docs':>9} {'KL/uniform':>10}")
        for label, evals, sec, bits, bpw, kl, ppl, dkl, dppl, _ in rows:
            emit(f"{label:<38} {evals:>6} {sec:>7.0f} {bits:>6.3f} {bpw:>6.3f} {kl:>8.4f} {ppl:>8.2f} "
                 f"{dkl:>8.4f} {dppl:>9.2f} {kl / base:>10.3f}")
        for line in notes:
            emit(line)
        summary.append((b, rows))
    emit("\n## summary: held-out KL (builtin / builtin-docs), ratio to uniform")
    emit(f"{'bits':>5} {'uniform':>16} {'best mix':>16} {'best rule':>16} {'proxy':>16} {'hessian ilp':>16} "
         f"{'evopress-def':>16} {'evo (ours)':>16} {'evo from ilp':>16} {'ours/uniform':>12} {'ours/mix':>9}")
    for b, rows in summary:
        by = {r[0].split(" (")[0].split(":")[0]: r for r in rows}
        rule = min((r for r in rows if r[0].startswith("rule:")), key=lambda r: r[5], default=None)
        evo = next((r for r in rows if r[0] == "evo (ours)"), None)
        from_ilp = min((r for r in rows if r[0].startswith(("evo (ours, from", "evo refine"))), key=lambda r: r[5],
                       default=None)
        ours = min((r for r in (evo, from_ilp) if r), key=lambda r: r[5], default=rows[0])   # the best evo row
        mix = by.get("best mix")
        cells = [rows[0], mix, rule, by.get("proxy"), by.get("hessian"), by.get("evopress-default"), evo, from_ilp]
        fmt = [f"{c[5]:.3f}/{c[7]:.3f}" if c else "-" for c in cells]
        emit(f"{b:>5} " + " ".join(f"{f:>16}" for f in fmt) + f" {ours[5] / rows[0][5]:>12.3f}"
             + (f" {ours[5] / mix[5]:>9.3f}" if mix else f" {'-':>9}"))


if __name__ == "__main__":
    main()
