"""How noisy is a racing stage? One-switch offspring of a plan, each measured beside that plan on
the same fresh batches at several token counts: the spread over batches of (offspring KL / plan KL
- 1) is the noise of the paired comparison that decides evo's last stage, against the true
differences between offspring (their mean over batches). Use it to size --stages: a last stage
whose paired noise is above the differences it must tell apart accepts worse plans by chance.

    python bench/racing_noise.py --plan reports/plans/2.5bits-evo-ours-from-hessian-150-gens.json \
        [--budget 2.5bits] [--tokens 512,2048,8192] [--batches 6] [--offspring 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.budget import parse_budget  # noqa: E402
from planner.pipeline import ModelData, prepare  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.search.operators import level_switch  # noqa: E402
from planner.space import load_space  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True, help="the plan whose offspring are compared with it")
    ap.add_argument("--budget", default="2.5bits")
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="reports/racing_noise.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines: list[str] = []        # the report, printed and written once every row is measured
    emit = lines.append
    session = prepare(ModelData(), load_space("gptq-g128"), quiet=True)
    problem = session.problem(parse_budget(args.budget))
    ev = session.evaluator(problem)
    parent = tuple(int(v) for v in problem.encode(Plan.load(args.plan)))
    rng = np.random.default_rng(args.seed)
    kids = [tuple(int(v) for v in level_switch(parent, problem, rng, 1)) for _ in range(args.offspring)]
    emit(f"# bench/racing_noise.py  {Path(args.plan).name}  {args.budget}  {args.offspring} one-switch offspring "
         f"(cost-aware), {args.batches} fresh batches per token count, {args.threads} threads")
    emit(f"{'tokens':>7} {'plan KL (batch min..max)':>25} {'paired noise':>13} {'offspring effect':>17} "
         f"{'effect range':>16} {'s / eval':>9}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        rel = np.zeros((len(kids), args.batches))
        base = []
        t0 = time.perf_counter()
        for b in range(args.batches):
            scores = ev.score_many([parent, *kids], session.windows.draw(tokens, 10_000 + b))
            base.append(scores[0].kl)
            rel[:, b] = [s.kl / scores[0].kl - 1 for s in scores[1:]]
        per_eval = (time.perf_counter() - t0) / (args.batches * (len(kids) + 1))
        noise = statistics.median(rel.std(axis=1, ddof=1))        # per offspring, over batches
        effect = rel.mean(axis=1)
        emit(f"{tokens:>7} {min(base):>12.3f}..{max(base):<11.3f} {noise:>12.2%} {statistics.median(effect):>+16.2%} "
             f"{effect.min():>+7.2%}..{effect.max():<+7.2%} {per_eval:>9.2f}")
    emit("# paired noise: the median over offspring of the std over batches of (offspring KL / plan KL - 1);")
    emit("# offspring effect: the median over offspring of that ratio's mean over batches (its true difference)")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
