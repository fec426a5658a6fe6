"""Unstructured sparsity and sub-block dropping on the default model: uniform, OWL-style and evo
allocations of SparseGPT levels at 50/60/70% average sparsity (magnitude and Wanda uniform for
reference), and dropping 10/20/25% of the attention/MLP sub-blocks chosen by ShortGPT-style
cosine similarity or by evo. Every final plan is measured on held-out windows (KL to the base
model and perplexity); the summary table is printed last.

    python bench/sparsity_quality.py [--sparsities 0.5,0.6,0.7] [--drops 0.1,0.2,0.25]
                                     [--generations 10] [--out reports/sparsity_quality.txt]

(~53 min on the shared 2-core CPU, most of it the 6 evo runs and 27 held-out measurements.)

Rows:
  magnitude / wanda   every linear at the target sparsity (one-shot masks, no weight update)
  uniform             every linear at the target with SparseGPT
  owl                 OWL (Yin et al., 2024): a block's sparsity falls with its outlier ratio (share of
                      Wanda scores above M=5 x the block mean), spread over S +- lambda=0.08, snapped to
                      the level grid and repaired to the exact budget
  evo                 EvoPress-style search over the SparseGPT levels, warm-started from uniform
  shortgpt            drop the sub-blocks whose output is most similar to their input (mean cosine
                      of the residual stream before and after the sub-block, on calibration windows)
  evo (depth)         search over keep/drop, warm-started from the ShortGPT choice
The depth budget counts sub-blocks (every sub-block costs 1; 60 in the model), so the drop
fractions are "of sub-blocks"; the table also gives the weights removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.budget import Budget, Metric  # noqa: E402
from planner.evaluate.evaluator import InProcessEvaluator  # noqa: E402
from planner.levels.db import build_levels  # noqa: E402
from planner.model.load import fingerprint  # noqa: E402
from planner.pipeline import ModelData, prepare  # noqa: E402
from planner.problem import Problem  # noqa: E402
from planner.rundir import RunDir  # noqa: E402
from planner.search import make_searcher, run_search  # noqa: E402
from planner.search.operators import repair  # noqa: E402
from planner.space import parse_space  # noqa: E402
from planner.units import subblock_units  # noqa: E402

GRID = [0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85]   # SparseGPT levels of every linear
OWL_M, OWL_LAMBDA = 5.0, 0.08


def restrict(problem: Problem, builder: str) -> Problem:
    """The same units with only the levels of one builder (ladders keep their cheapest-first order)."""
    keep = [[j for j, lv in enumerate(lad) if lv.startswith(builder + "-")] for lad in problem.levels]
    width = max(len(k) for k in keep)

    def cut(a: np.ndarray) -> np.ndarray:
        out = np.full((problem.n_units, width), np.nan)
        for i, k in enumerate(keep):
            out[i, :len(k)] = a[i, k]
        return out
    return dataclasses.replace(problem, levels=tuple(tuple(problem.levels[i][j] for j in k) for i, k in enumerate(keep)),
                               code_bits=cut(problem.code_bits), stored_bits=cut(problem.stored_bits),
                               kept=cut(problem.unit_cost(Metric.DENSITY)), _index={})


def at_level(problem: Problem, level: str) -> np.ndarray:
    return np.array([lad.index(level) for lad in problem.levels])


@torch.no_grad()
def input_norms(model, units, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X_j|| per input column of every fused group (Wanda's activation norm), on `calib`."""
    first = {}
    for u in units:
        first.setdefault(u.group, u)
    sq = {g: torch.zeros(u.shape[1]) for g, u in first.items()}

    def add(g: str):
        def hook(_m, a) -> None:                  # returns None: a pre-hook's return value would replace the input
            sq[g].add_(a[0].float().reshape(-1, a[0].shape[-1]).pow(2).sum(0))
        return hook
    hooks = [model.get_submodule(u.name).register_forward_pre_hook(add(g)) for g, u in first.items()]
    try:
        for s in range(0, len(calib), 4):
            model(calib[s:s + 4], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {g: v.sqrt() for g, v in sq.items()}


def outlier_ratios(model, units, norms) -> dict[int, float]:
    """OWL's layerwise outlier distribution: per block, the share of Wanda scores |W| ||X|| of all
    its linears that exceed M times their mean."""
    ratio = {}
    for b in sorted({u.block for u in units}):
        scores = torch.cat([(model.get_submodule(u.name).weight.detach().float().abs() * norms[u.group][None, :]).flatten()
                            for u in units if u.block == b])
        ratio[b] = float((scores > OWL_M * scores.mean()).float().mean())
    return ratio


def owl_plan(ratios: dict[int, float], units, problem: Problem, sparsity: float, seed: int) -> np.ndarray:
    """OWL: block densities spread over 2 lambda by outlier ratio, mean 1 - S; snapped, then repaired."""
    blocks = sorted(ratios)
    r = np.array([ratios[b] for b in blocks])
    r = (r - r.min()) / max(r.max() - r.min(), 1e-12) * 2 * OWL_LAMBDA
    density = r - r.mean() + (1 - sparsity)
    target = {b: 1 - d for b, d in zip(blocks, density, strict=True)}
    x = np.zeros(problem.n_units, dtype=np.int64)
    for i, u in enumerate(units):
        levels = [float(lv.split("-s")[1]) / 100 for lv in problem.levels[i]]
        x[i] = int(np.argmin([abs(s - target[u.block]) for s in levels]))
    return repair(x, problem, np.random.default_rng(seed))


@torch.no_grad()
def subblock_cosines(model, calib: torch.Tensor) -> dict[tuple[int, str], float]:
    """Mean cosine similarity of the residual stream before and after each sub-block (ShortGPT's
    block influence is 1 - this): attention = block input -> post-attention residual, MLP = that
    residual -> block output."""
    layers = model.model.layers
    acc: dict[tuple[int, str], list[float]] = {}
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def keep(i, key):
        return lambda _m, a, *rest: seen.setdefault(i, {}).__setitem__(key, (rest[-1] if rest else a[0]).float())
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(keep(i, "in")))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(keep(i, "mid")))
        hooks.append(layer.register_forward_hook(keep(i, "out")))
    try:
        for s in range(0, len(calib), 4):
            seen.clear()
            model(calib[s:s + 4], use_cache=False)
            for i, h in seen.items():
                for kind, a, b in (("attn", h["in"], h["mid"]), ("mlp", h["mid"], h["out"])):
                    acc.setdefault((i, kind), []).append(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()))
    finally:
        for h in hooks:
            h.remove()
    return {k: float(np.mean(v)) for k, v in acc.items()}


def search(problem: Problem, evaluate, config: dict, seed: int, workdir: str):
    run = RunDir.create(Path(tempfile.mkdtemp(dir=workdir)) / "run", {"method": "evo"})
    s = make_searcher("evo", problem, config, seed)
    t0 = time.perf_counter()
    run_search(s, problem, evaluate, run)
    return s.best(), len(run.results()), time.perf_counter() - t0


def through(ev: InProcessEvaluator, problem: Problem):
    """Evaluate candidates of `problem` (a restriction of ev's problem) with ev: same units, same ids."""
    def evaluate(cands):
        mapped = [dataclasses.replace(c, x=tuple(int(v) for v in ev.problem.encode(problem.decode(c.x)))) for c in cands]
        return [dataclasses.replace(r, candidate=c) for r, c in zip(ev.evaluate(mapped), cands, strict=True)]
    return evaluate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--drops", default="0.1,0.2,0.25")
    ap.add_argument("--generations", type=int, default=10)           # the committed report's settings
    ap.add_argument("--depth-generations", type=int, default=8)
    ap.add_argument("--offspring", type=int, default=6)
    ap.add_argument("--stages", default="2@512,1@1024")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="reports/sparsity_quality.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = open(args.out, "w")
    t_start = time.perf_counter()

    def emit(line: str = "") -> None:
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)

    targets = [float(s) for s in args.sparsities.split(",")]
    drops = [float(f) for f in args.drops.split(",")]
    stages = [[int(a) for a in s.split("@")] for s in args.stages.split(",")]
    refs = sorted({0.5, 0.6, 0.7, *targets})     # fixed, so a smaller run reuses the same levels DB
    md = ModelData(seed=args.seed)
    space = parse_space({"name": "bench-sparsity", "levels": [
        {"method": "sparsegpt", "sparsity": GRID},
        {"method": "wanda", "sparsity": refs}, {"method": "magnitude", "sparsity": refs}]})
    log("levels DB (SparseGPT grid + Wanda/magnitude targets)")
    session = prepare(md, space, quiet=True)
    model, units, windows = session.loaded.model, session.units, session.windows
    calib = windows.ids[windows.calib]
    log("activation norms, sub-block cosines, depth levels")
    ratios = outlier_ratios(model, units, input_norms(model, units, calib))
    cos = subblock_cosines(model, calib[:8])
    sub = subblock_units(model, units)
    depth_db = build_levels(model, sub, parse_space({"name": "depth", "units": "subblock", "levels": [{"method": "drop"}]}),
                            calib, fingerprint(model))
    p_all = session.db.problem(units, Budget(1.0, Metric.DENSITY))
    ev = InProcessEvaluator(model, session.db, p_all, windows, ref_cache_bytes=2e9)
    workdir = tempfile.mkdtemp(prefix="sparsity-quality-")
    evo_cfg = {"offspring": args.offspring, "stages": stages}
    emit(f"# bench/sparsity_quality.py  model {md.model}  seed {args.seed}  evo: {args.generations} generations "
         f"(depth {args.depth_generations}), {args.offspring} offspring, stages {args.stages}, KL fitness")
    emit(f"# held-out: {len(windows.heldout) * windows.seqlen} tokens of '{md.dataset}' never used for calibration or "
         f"search; SparseGPT levels {GRID} per linear; 1-bit mask + fp16 values")

    def measure(problem: Problem, x, evaluator=ev) -> tuple[float, float]:
        s = evaluator.score(problem.decode(x), windows.heldout)
        return s.kl, s.ppl

    base_ppl = ev.score(None, windows.heldout).ppl
    sparse_rows = []
    for S in targets:
        budget = Budget(1 - S, Metric.DENSITY)
        sg = dataclasses.replace(restrict(p_all, "sparsegpt"), budget=budget, _index={})
        level = f"sparsegpt-s{S * 100:g}"
        for ref in ("magnitude", "wanda"):
            p = restrict(p_all, ref)
            x = at_level(p, f"{ref}-s{S * 100:g}")
            sparse_rows.append((S, ref, p.cost(x).sparsity, *measure(p, x), 0, 0.0))
        x_uni = at_level(sg, level)
        sparse_rows.append((S, "uniform (sparsegpt)", sg.cost(x_uni).sparsity, *measure(sg, x_uni), 0, 0.0))
        x_owl = owl_plan(ratios, units, sg, S, args.seed)
        sparse_rows.append((S, "owl (sparsegpt)", sg.cost(x_owl).sparsity, *measure(sg, x_owl), 0, 0.0))
        log(f"evo at {S:.0%} sparsity")
        x_evo, n, sec = search(sg, through(ev, sg), {**evo_cfg, "generations": args.generations,
                                                     "init_x": [int(v) for v in x_uni]}, args.seed, workdir)
        sparse_rows.append((S, "evo (sparsegpt)", sg.cost(x_evo).sparsity, *measure(sg, x_evo), n, sec))
        emit(f"\n## {S:.0%} average sparsity")
        for r in sparse_rows[-5:]:
            emit(f"{r[1]:<22} sparsity {r[2]:.4f}  KL {r[3]:.4f}  ppl {r[4]:8.2f}  evals {r[5]:4d}  {r[6]:6.0f} s")

    p_depth = depth_db.problem(sub, Budget(1.0, Metric.DENSITY))
    per = p_depth.total_numel / p_depth.n_units       # count-based: every sub-block costs the same
    counted = dataclasses.replace(p_depth, kept=np.where(p_depth.kept > 0, per, 0.0), _index={})
    ev_d = InProcessEvaluator(model, depth_db, counted, windows, ref_cache_bytes=2e9)
    ev_d._ref = ev._ref            # same base model and windows: share the reference log-probs
    order = sorted(range(len(sub)), key=lambda i: -cos[(sub[i].block, sub[i].kind)])   # most redundant first
    depth_rows = []
    for f in drops:
        k = int(round(f * len(sub)))
        prob = dataclasses.replace(counted, budget=Budget(1 - k / len(sub), Metric.DENSITY), _index={})
        x_short = np.ones(len(sub), dtype=np.int64)     # ladder: drop (0 bits) first, keep second
        x_short[order[:k]] = 0
        log(f"evo dropping {k} sub-blocks")
        x_evo, n, sec = search(prob, ev_d.evaluate, {**evo_cfg, "generations": args.depth_generations,
                                                     "init_x": [int(v) for v in x_short]}, args.seed, workdir)
        for label, x, evals, s in (("shortgpt (cosine)", x_short, 0, 0.0), ("evo", x_evo, n, sec)):
            dropped = [i for i in range(len(sub)) if x[i] == 0]
            attn = sum(sub[i].kind == "attn" for i in dropped)
            removed = sum(sub[i].numel for i in dropped) / p_depth.total_numel
            depth_rows.append((f, k, label, attn, len(dropped) - attn, removed, *measure(prob, x, ev_d), evals, s,
                               sorted(f"{sub[i].block}.{sub[i].kind}" for i in dropped)))
        emit(f"\n## drop {k} of {len(sub)} sub-blocks ({f:.0%})")
        for r in depth_rows[-2:]:
            emit(f"{r[2]:<18} attn {r[3]:2d} mlp {r[4]:2d}  weights removed {r[5]:.3f}  KL {r[6]:.4f}  ppl {r[7]:8.2f}  "
                 f"evals {r[8]:4d} {r[9]:6.0f} s  dropped {' '.join(r[10])}")

    emit(f"\n## summary (held-out; base model perplexity {base_ppl:.3f}; {(time.perf_counter() - t_start) / 60:.0f} min)")
    emit(f"{'sparsity':>8}  {'plan':<22} {'actual':>7} {'KL':>8} {'ppl':>9} {'evals':>6}")
    for S, label, actual, kl, ppl, n, _ in sparse_rows:
        emit(f"{S:>8.0%}  {label:<22} {actual:>7.4f} {kl:>8.4f} {ppl:>9.2f} {n:>6}")
    emit(f"\n{'dropped':>8}  {'plan':<22} {'attn+mlp':>8} {'weights':>8} {'KL':>8} {'ppl':>9} {'evals':>6}")
    for f, k, label, attn, mlp, removed, kl, ppl, n, _, _ in depth_rows:
        emit(f"{f'{k} ({f:.0%})':>8}  {label:<22} {f'{attn}+{mlp}':>8} {removed:>8.3f} {kl:>8.4f} {ppl:>9.2f} {n:>6}")


if __name__ == "__main__":
    main()
