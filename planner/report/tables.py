"""One or more run dirs as pandas tables, and the tables `planner report --format` writes.

`load_runs` merges runs of one model and search space: every journal row of every run (`rows`),
and one row per distinct plan (`plans`, keyed by plan_id, so a plan found by two methods or two
runs is one point) whose KL is the mean of its measurements at the most tokens it was measured on.
The budget of a merge is the largest of its runs' budgets (an evo sweep over budgets merges whole).

Tables: `top_plans` (lowest KL within the budget), `allocation` (per unit, the level of each
method's best plan), `methods` (evaluations, best KL, front share and hypervolume per method).
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from planner.budget import Budget
from planner.errors import BadRunDir, PlannerError
from planner.problem import Problem
from planner.rundir import RunDir
from planner.search.hypervolume import nondominated, plans_hypervolume

SIZES = ("bits", "bpw", "bytes")       # the size columns of rows and plans (Metric values)


class TableFormat(str, enum.Enum):
    CSV = "csv"
    PARQUET = "parquet"
    MARKDOWN = "markdown"


@dataclass
class Runs:
    runs: list[RunDir]
    names: list[str]
    problem: Problem               # the first run's problem with the merged (largest) budget
    rows: pd.DataFrame             # every journal row: run, order (journal position), Row fields, predicted
    plans: pd.DataFrame            # one row per plan_id (see the module doc), index = plan_id
    heldout: pd.DataFrame          # every held-out row, with its run
    xs: dict[str, list[int]]       # plan_id -> level vector

    @property
    def budget(self) -> Budget:
        return self.problem.budget

    def best_id(self, method: str | None = None) -> str | None:
        """Lowest-KL plan within the budget (of one method, or of all)."""
        p = self.plans[self.plans.within]
        if method is not None:
            p = p[p.method == method]
        return None if p.empty else str(p.kl.idxmin())


def _same_space(a: Problem, b: Problem) -> bool:
    return a.units == b.units and a.levels == b.levels and np.array_equal(a.code_bits, b.code_bits, equal_nan=True)


def load_runs(paths) -> Runs:
    """Open and merge run dirs; PlannerError when they plan different units or levels."""
    runs = [RunDir.open(p) for p in paths]
    if not runs:
        raise PlannerError("no run dir given: pass one or more runs/<name>")
    problems = []
    for run in runs:
        if not (run.path / "problem.json").is_file():
            raise BadRunDir(f"run dir {str(run.path)!r} has no problem.json yet: the search never started")
        problems.append(run.load_problem())
    names = _names(runs)
    for name, p in zip(names, problems, strict=True):
        if not _same_space(problems[0], p):
            raise PlannerError(f"run {name!r} plans other units or levels than {names[0]!r}: "
                               "only runs of one model and search space merge")
    metric = problems[0].budget.metric
    top = max(p.budget.value for p in problems if p.budget.metric is metric)
    problem = problems[0]
    problem = Problem(units=problem.units, numel=problem.numel, levels=problem.levels, code_bits=problem.code_bits,
                      stored_bits=problem.stored_bits, budget=Budget(top, metric), kinds=problem.kinds,
                      blocks=problem.blocks, ties=problem.ties, kept=problem.kept)
    records, held, xs = [], [], {}
    for name, run in zip(names, runs, strict=True):
        for i, r in enumerate(run.results()):
            d = asdict(r)
            xs.setdefault(r.plan_id, list(r.x))
            records.append({"run": name, "order": i, **{k: v for k, v in d.items() if k not in ("x", "extra")},
                            "predicted": r.extra.get("predicted"), "latency": r.extra.get("latency")})
        held += [{"run": name, **{k: v for k, v in asdict(r).items() if k not in ("x", "extra")}} for r in run.heldout()]
    rows = pd.DataFrame.from_records(records, columns=_ROW_COLUMNS)
    return Runs(runs, names, problem, rows, _plans(rows, problem, pd.DataFrame(held)), pd.DataFrame(held), xs)


_ROW_COLUMNS = ["run", "order", "method", "generation", "stage", "tokens", "seed", "kl", "ppl", "bits", "bpw", "bytes",
                "plan_id", "seconds", "error", "label", "predicted", "latency"]


def _names(runs: list[RunDir]) -> list[str]:
    names = [run.path.name for run in runs]
    return names if len(set(names)) == len(names) else [str(run.path) for run in runs]


def ok_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with a measurement: no error, a finite KL."""
    return rows[rows.error.isna() & np.isfinite(rows.kl.astype(float))]


def _plans(rows: pd.DataFrame, problem: Problem, held: pd.DataFrame) -> pd.DataFrame:
    ok = ok_rows(rows)
    if ok.empty:            # typed columns: boolean masks and sorts still work on no plans
        text, flags = ("method", "methods", "run", "label"), ("uniform", "within", "front_latency",
                                                              *(f"front_{s}" for s in SIZES))
        numbers = ("generation", "tokens", "kl", "ppl", *SIZES, "evaluations", "predicted", "latency", "heldout_kl")
        return pd.DataFrame({**{c: pd.Series(dtype=object) for c in text}, **{c: pd.Series(dtype=float) for c in numbers},
                             **{c: pd.Series(dtype=bool) for c in flags}}).rename_axis("plan_id")
    top = ok[ok.tokens == ok.groupby("plan_id").tokens.transform("max")]
    g, first = ok.groupby("plan_id", sort=False), ok.drop_duplicates("plan_id").set_index("plan_id")
    plans = pd.DataFrame({
        "method": first.method, "methods": g.method.agg(lambda m: ", ".join(dict.fromkeys(m))),
        "run": first.run, "generation": first.generation,
        "label": g.label.agg(lambda ls: next((s for s in ls if s), "")),
        "uniform": g.label.agg(lambda ls: any(str(s).startswith("uniform") for s in ls)),
        "tokens": top.groupby("plan_id").tokens.first(), "kl": top.groupby("plan_id").kl.mean(),
        "ppl": top.groupby("plan_id").ppl.mean(), **{s: first[s] for s in SIZES},
        "evaluations": g.size(), "predicted": g.predicted.first(),
        "latency": g.latency.first().astype(float),     # predicted seconds of a decode step (runtime/hardware.py)
    })
    plans["heldout_kl"] = (held[held.error.isna()].groupby("plan_id").kl.min().reindex(plans.index)
                           if not held.empty else np.nan)
    plans["within"] = plans[problem.budget.metric.value] <= problem.budget.value * (1 + 1e-12)
    for s in (*SIZES, "latency"):
        plans[f"front_{s}"] = front_mask(plans, s)
    return plans


def front_mask(plans: pd.DataFrame, size: str) -> np.ndarray:
    """Plans within the budget that no other such plan beats on both `size` and KL."""
    mask = np.zeros(len(plans), dtype=bool)
    idx = np.flatnonzero(plans.within.to_numpy() & np.isfinite(plans[size].to_numpy(dtype=float)))
    if idx.size:
        pts = plans[[size, "kl"]].to_numpy(dtype=float)[idx]
        mask[idx[nondominated(pts)]] = True
    return mask


# --- the three tables ---------------------------------------------------------------------------
def top_plans(runs: Runs, n: int = 20) -> pd.DataFrame:
    p = runs.plans[runs.plans.within].sort_values(["kl", runs.budget.metric.value]).head(n)
    out = p[["method", "methods", "run", "kl", "ppl", "bits", "bpw"]].copy()
    out.insert(0, "rank", range(1, len(out) + 1))
    out["MB"] = p.bytes / 1e6
    out["tokens"], out["on_front"], out["heldout_kl"] = p.tokens, p[f"front_{runs.budget.metric.value}"], p.heldout_kl
    return out.rename_axis("plan_id").reset_index()


def allocation(runs: Runs) -> pd.DataFrame:
    """Per unit (kind, block), the level id of each method's best plan within the budget."""
    p = runs.problem
    out = pd.DataFrame({"unit": p.units, "kind": list(p.kinds) or None, "block": list(p.blocks) or None,
                        "weights": p.numel})
    for method in dict.fromkeys(runs.plans.method):
        pid = runs.best_id(method)
        if pid is not None:
            x = runs.xs[pid]
            out[f"{method} {pid}"] = [p.levels[u][x[u]] for u in range(p.n_units)]
    return out


def methods(runs: Runs) -> pd.DataFrame:
    rows, plans, p = runs.rows, runs.plans, runs.problem
    front = plans[f"front_{runs.budget.metric.value}"]
    out = []
    for method in dict.fromkeys(rows.method):
        r, mine = rows[rows.method == method], plans[plans.method == method]
        best = runs.best_id(method)
        ok = mine[mine.within]
        out.append({"method": method, "runs": r.run.nunique(), "evaluations": len(r), "failed": len(r) - len(ok_rows(r)),
                    "plans": len(mine), "within_budget": len(ok),
                    "best_kl": plans.kl[best] if best else math.nan, "best_plan": best or "",
                    f"best_{runs.budget.metric.value}": plans[runs.budget.metric.value][best] if best else math.nan,
                    "front_plans": int(front[plans.method == method].sum()),
                    "hypervolume": plans_hypervolume(p, ("kl", "size"), [runs.xs[i] for i in ok.index], ok.kl.tolist()),
                    "seconds": float(r.seconds.sum())})
    return pd.DataFrame(out)


def write_tables(runs: Runs, out_dir: Path, fmt: TableFormat | str) -> list[Path]:
    """top_plans / allocation / methods in `fmt` under `out_dir`; returns the files written."""
    fmt = TableFormat(fmt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in (("top_plans", top_plans(runs)), ("allocation", allocation(runs)), ("methods", methods(runs))):
        path = out_dir / f"{name}.{ {'markdown': 'md'}.get(fmt.value, fmt.value)}"
        if fmt is TableFormat.CSV:
            df.to_csv(path, index=False)
        elif fmt is TableFormat.PARQUET:
            df.to_parquet(path, index=False)
        else:
            path.write_text(f"## {name}\n\n{df.to_markdown(index=False, floatfmt='.4g')}\n")
        written.append(path)
    return written
