"""Candidate evaluations per second with and without prefix caching, for one-switch mutations
(EvoPress's same-size swaps) and for our default cost-aware mutations; the cost of a generation
with and without racing; the whole default search's time from a finished run dir.

    python bench/evo_speed.py [--reps 3] [--run runs/<name>] [--out reports/evo_speed.txt]

Prefix caching is bit-exact (tests/test_prefix_cache.py), so "equal final quality" holds by
construction: the same fitness values, computed with fewer decoder blocks.
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
from planner.evaluate.kl import cross_term, kl_and_nll, log_probs  # noqa: E402
from planner.pipeline import ModelData, prepare  # noqa: E402
from planner.rundir import RunDir  # noqa: E402
from planner.search.evo import SCHEDULES  # noqa: E402
from planner.search.operators import level_switch, n_switches  # noqa: E402
from planner.search.uniform import uniform_x  # noqa: E402
from planner.space import load_space  # noqa: E402


def offspring(problem, parent, rng, n, same_size, switches, local=False):
    out = []
    while len(out) < n:
        k = switches if switches else n_switches(rng, 3)
        x = tuple(int(v) for v in level_switch(parent, problem, rng, k, same_size, local=local))
        if x != tuple(parent):
            out.append(x)
    return out


def timed(ev, xs, windows, cache: bool, reps: int) -> tuple[float, float]:
    """Median seconds for scoring xs, and the fraction of decoder blocks actually run."""
    ev.prefix_cache = cache
    times, fracs = [], []
    for _ in range(reps):
        b0 = ev.blocks_run
        t0 = time.perf_counter()
        ev.score_many(xs, windows)
        times.append(time.perf_counter() - t0)
        fracs.append((ev.blocks_run - b0) / (len(xs) * ev.n_blocks * len(ev._batches(np.asarray(windows)))))
    return statistics.median(times), statistics.median(fracs)


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cost_split(ev, windows, reps: int) -> dict[str, float]:
    """Milliseconds per window of the decoder blocks, the lm_head matmul, and the KL + NLL: chunked
    (planner.evaluate.kl) and the whole-window log-softmax it replaced."""
    w = int(windows[0])
    idx = np.asarray([w])
    head, ref, ids = ev.model.get_output_embeddings(), ev._ref[w], ev.windows.ids[w]
    with torch.no_grad():
        hidden = ev._hidden(idx)[0]
        logits = head(hidden)

        def whole_window():
            logq = log_probs(logits)
            return cross_term(ref.p, logq), -float(logq[:-1].gather(1, ids[1:, None]).sum())

        return {"decoder blocks": median_ms(lambda: ev._hidden(idx), reps),
                "lm_head matmul": median_ms(lambda: head(hidden), reps),
                "KL + NLL, whole-window log-softmax": median_ms(whole_window, reps),
                "KL + NLL, 16-position chunks (ours)": median_ms(lambda: kl_and_nll(logits, ref, ids), reps)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", default=None, help="a finished default run dir, for the total search time")
    ap.add_argument("--out", default="reports/evo_speed.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def emit(s: str = "") -> None:
        print(s)
        lines.append(s)

    session = prepare(ModelData(), load_space("gptq-g128"), quiet=True)
    problem = session.problem(parse_budget("3.0bits"))
    ev = session.evaluator(problem)
    parent = uniform_x(problem, 1)
    windows = session.windows.draw(args.tokens, 1)
    ev.score(None, windows)                                   # reference and weights loaded once
    ev.score(problem.decode(parent), windows)
    emit(f"# bench/evo_speed.py  default model, 3.0 bits, {args.offspring} offspring on {args.tokens} tokens, "
         f"median of {args.reps}, {args.threads} threads")
    emit(f"{'mutation':<38} {'no cache ev/s':>13} {'cache ev/s':>11} {'speed-up':>9} {'blocks run':>11}")
    rng = np.random.default_rng(0)
    fracs = {}
    for label, same, k, local in (("one switch, same-size (EvoPress)", True, 1, False),
                                  ("one switch, cost-aware", False, 1, False),
                                  ("1-3 switches, cost-aware (default)", False, 0, False),
                                  ("one switch, cost-aware, local repair", False, 1, True),
                                  ("1-3 switches, local repair", False, 0, True)):
        xs = offspring(problem, parent, rng, args.offspring, same, k, local)
        t_off, _ = timed(ev, xs, windows, False, args.reps)
        t_on, frac = timed(ev, xs, windows, True, args.reps)
        fracs[label] = frac
        emit(f"{label:<38} {len(xs) / t_off:>13.2f} {len(xs) / t_on:>11.2f} {t_off / t_on:>8.2f}x {frac:>10.0%}")

    split = cost_split(ev, windows, max(5, args.reps))
    blocks, head, kl = (split[k] for k in ("decoder blocks", "lm_head matmul", "KL + NLL, 16-position chunks (ours)"))
    emit(f"\n# where one candidate's time goes, per {ev.windows.seqlen}-token window (median of {max(5, args.reps)})")
    emit(f"{'part':<38} {'ms':>8} {'share':>7}")
    for part, ms in split.items():
        emit(f"{part:<38} {ms:>8.1f} {ms / (blocks + head + kl):>7.0%}")
    emit("ceiling of the prefix cache's speed-up at the blocks-run fractions above, the rest of a candidate fixed:")
    for label, frac in fracs.items():
        emit(f"  {label:<36} {frac:>4.0%} of blocks -> {(blocks + head + kl) / (frac * blocks + head + kl):.2f}x")
    need = ((blocks + head + kl) / 2 - head - kl) / blocks
    emit(f"a 2x speed-up needs at most {need:.0%} of blocks rerun; a one-switch offspring reruns from the earlier of its "
         f"two switched units, uniform over the model: 2/3 of it expected, so no exact cache reaches 2x "
         f"(even a free lm_head and KL would cap it at 1/(2/3) = 1.5x)")

    emit("\n# one generation: racing (cpu schedule) vs every offspring at the last stage's tokens")
    cpu = SCHEDULES["cpu"]
    per_tok = {}
    for tokens in sorted({t for _, t in cpu["stages"]}):
        w = session.windows.draw(tokens, 2)
        xs = offspring(problem, parent, rng, 4, False, 0)
        ev.score_many(xs[:1] + xs[:1], w)                      # reference for these windows
        t, _ = timed(ev, xs, w, True, 1)
        per_tok[tokens] = t / len(xs)
    sizes = [cpu["offspring"]] + [s for s, _ in cpu["stages"][:-1]]
    racing = sum(n * per_tok[t] for n, (_, t) in zip(sizes, cpu["stages"], strict=True)) + per_tok[cpu["stages"][-1][1]]
    flat = (cpu["offspring"] + 1) * per_tok[cpu["stages"][-1][1]]
    emit(f"{'generation':<34} {'seconds':>9} {'ratio':>7}")
    emit(f"{'no racing (all @ last stage)':<34} {flat:>9.1f} {1.0:>7.2f}")
    emit(f"{'racing ' + ','.join(f'{s}@{t}' for s, t in cpu['stages']):<34} {racing:>9.1f} {racing / flat:>7.2f}")
    if args.run:
        run = RunDir.open(args.run)
        rows = run.results()
        secs = sum(r.seconds for r in rows)
        emit(f"\n# {args.run}: {len(rows)} evaluations, {secs / 60:.1f} min of evaluation in the journal")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
