"""What is optimized, apart from how (pymoo's Problem): units, each unit's ordered level ladder,
exact costs per (unit, level), and the budget. Numpy only: searchers import this, never torch.

A solution is an integer vector x with x[u] = index into unit u's ladder (cheapest first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from planner.budget import Budget, Metric
from planner.errors import BadBudget, BadPlan
from planner.plan import Plan


@dataclass(frozen=True)
class Costs:
    bits: float      # nominal code bits per planned weight
    bpw: float       # stored bits per planned weight (scales/zeros included)
    nbytes: int      # stored bytes of the planned weights
    density: float = 1.0   # kept (not pruned) fraction of the planned weights: 1 - sparsity

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def value(self, metric: Metric) -> float:
        return {Metric.BITS: self.bits, Metric.BPW: self.bpw, Metric.BYTES: float(self.nbytes),
                Metric.DENSITY: self.density}[metric]


@dataclass(frozen=True, eq=False)
class Problem:
    units: tuple[str, ...]
    numel: np.ndarray                 # [U] element count per unit
    levels: tuple[tuple[str, ...], ...]  # per unit, level ids ordered cheapest -> most expensive
    code_bits: np.ndarray             # [U, L] total nominal code bits of unit u at level l (nan pad)
    stored_bits: np.ndarray           # [U, L] total stored bits (codes + scales + zeros) (nan pad)
    budget: Budget
    kinds: tuple[str, ...] = ()       # per unit kind ("q_proj", ...): lets operators restrict swaps
    blocks: tuple[int, ...] = ()      # per unit decoder-block index (for reports and position rules)
    ties: tuple[str, ...] = ()        # per unit tie-group id: units sharing a non-empty id take one level id
    kept: np.ndarray | None = None    # [U, L] weights kept (not pruned) of unit u at level l; None: all
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index.update({name: i for i, name in enumerate(self.units)})

    # --- shape -------------------------------------------------------------------------
    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def n_levels(self) -> np.ndarray:
        return np.array([len(lv) for lv in self.levels])

    @property
    def total_numel(self) -> int:
        return int(self.numel.sum())

    def tie_groups(self) -> list[np.ndarray]:
        """Unit indices that must share one level id (fused q/k/v, gate/up), one array per group of
        two or more units; empty when the problem has no ties (the default)."""
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self.ties):
            if t:
                groups.setdefault(t, []).append(i)
        return [np.array(g) for g in groups.values() if len(g) > 1]

    # --- encoding ----------------------------------------------------------------------
    def encode(self, plan: Plan) -> np.ndarray:
        """Level indices of a plan; BadPlan if it does not name exactly this problem's units and levels."""
        m = plan.as_dict()
        extra = set(m) - set(self._index)
        missing = [u for u in self.units if u not in m]
        if extra or missing:
            which = f"unknown unit {sorted(extra)[0]!r}" if extra else f"no level for {missing[0]!r}"
            raise BadPlan(f"plan does not fit this model/search space ({which}): was it made for another model or space?")
        bad = [(u, m[u]) for i, u in enumerate(self.units) if m[u] not in self.levels[i]]
        if bad:
            raise BadPlan(f"plan gives {bad[0][0]} the level {bad[0][1]!r}, which this search space lacks: pass --space")
        return np.array([self.levels[i].index(m[u]) for i, u in enumerate(self.units)], dtype=np.int64)

    def decode(self, x) -> Plan:
        return Plan.of({u: self.levels[i][int(x[i])] for i, u in enumerate(self.units)})

    # --- costs -------------------------------------------------------------------------
    def unit_cost(self, metric: Metric) -> np.ndarray:
        """[U, L] cost of each (unit, level) in the budget's additive currency (bits or bytes)."""
        if metric is Metric.BITS:
            return self.code_bits
        if metric is Metric.DENSITY:      # kept weights: sparsity >= s  <=>  kept <= (1 - s) * numel
            return self.kept if self.kept is not None else np.where(np.isnan(self.code_bits), np.nan,
                                                                     self.numel[:, None].astype(np.float64))
        return self.stored_bits / 8.0 if metric is Metric.BYTES else self.stored_bits

    def cost(self, x) -> Costs:
        idx = (np.arange(self.n_units), np.asarray(x))
        code = float(self.code_bits[idx].sum())
        stored = float(self.stored_bits[idx].sum())
        n = self.total_numel
        kept = float(self.unit_cost(Metric.DENSITY)[idx].sum())
        return Costs(bits=code / n, bpw=stored / n, nbytes=int(np.ceil(stored / 8)), density=kept / n)

    def limit(self, b: Budget) -> float:
        """One limit in the additive currency of `unit_cost(b.metric)` (total bits, bytes or kept weights)."""
        return b.value if b.metric is Metric.BYTES else b.value * self.total_numel

    def budget_total(self) -> float:
        """The budget expressed in the additive currency of `unit_cost` (total bits or bytes)."""
        return self.limit(self.budget)

    def spend(self, x, metric: Metric | None = None) -> float:
        """Total cost of x in the budget's additive currency (or in `metric`'s)."""
        c = self.unit_cost(metric or self.budget.metric)
        return float(c[np.arange(self.n_units), np.asarray(x)].sum())

    def feasible(self, x) -> bool:
        """Every limit of the budget holds (`4.0bits,50%sparsity`: both)."""
        return all(self.spend(x, b.metric) <= self.limit(b) * (1 + 1e-12) for b in self.budget.limits)

    def check_budget(self) -> None:
        """Raise BadBudget when no plan (or every plan) meets the budget."""
        for b in self.budget.also:
            lo = float(np.nansum(np.nanmin(self.unit_cost(b.metric), axis=1)))
            if self.limit(b) < lo * (1 - 1e-12):
                per = lo if b.metric is Metric.BYTES else lo / self.total_numel
                raise BadBudget(f"budget limit {b} is beyond the cheapest plan ({_fmt(per, b)}): "
                                "relax it or add lower levels to the search space")
        c = self.unit_cost(self.budget.metric)
        lo = float(np.nansum(np.nanmin(c, axis=1)))
        hi = float(np.nansum(np.nanmax(c, axis=1)))
        total = self.budget_total()
        if total < lo * (1 - 1e-12):
            cheapest = self.cost(np.zeros(self.n_units, dtype=int)).value(self.budget.metric)
            raise BadBudget(f"budget {self.budget} is below the cheapest plan ({_fmt(cheapest, self.budget)}): "
                            "raise the budget or add lower levels to the search space")
        if total > hi * (1 + 1e-12) and not self.budget.also:
            top = self.cost(self.n_levels - 1).value(self.budget.metric)
            raise BadBudget(f"budget {self.budget} is above the most expensive plan ({_fmt(top, self.budget)}): "
                            "nothing to search; lower the budget or add higher levels")


def _fmt(value: float, budget: Budget) -> str:
    return str(Budget(value, budget.metric))
