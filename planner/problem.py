"""What is optimized, apart from how (pymoo's Problem): units, each unit's ordered level ladder,
exact costs per (unit, level), and the budget. Numpy only: searchers import this, never torch.

A solution is an integer vector x with x[u] = index into unit u's ladder (cheapest first).

Hardware costs (latency, whole-model memory) are not in the levels DB: they arrive as `HwCost`
tables (`with_hardware`), each a per-(unit, level) part plus a constant for the rest of the model,
and then count like any other cost: a budget limit on them is one more row for repair and the ILP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from planner.budget import HARDWARE, Budget, Metric
from planner.errors import BadBudget, BadPlan
from planner.plan import Plan


@dataclass(frozen=True)
class Costs:
    bits: float      # nominal code bits per planned weight
    bpw: float       # stored bits per planned weight (scales/zeros included)
    nbytes: int      # stored bytes of the planned weights
    density: float = 1.0   # kept (not pruned) fraction of the planned weights: 1 - sparsity
    latency: float = math.nan   # predicted seconds of one decode step (nan: no latency table)
    memory: float = math.nan    # bytes of the whole packed model (nan: not attached)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def value(self, metric: Metric) -> float:
        return {Metric.BITS: self.bits, Metric.BPW: self.bpw, Metric.BYTES: float(self.nbytes),
                Metric.DENSITY: self.density, Metric.LATENCY: self.latency, Metric.MEMORY: self.memory}[metric]

    def hardware(self) -> dict[str, float]:
        """The hardware costs that are known, by metric name (a journal row's `extra`)."""
        return {m.value: self.value(m) for m in HARDWARE if math.isfinite(self.value(m))}


@dataclass(frozen=True, eq=False)
class HwCost:
    """A hardware cost: what each (unit, level) adds, plus what every plan pays for the parts of
    the model outside the plan (attention, norms, embeddings, lm_head)."""

    table: np.ndarray      # [U, L] (nan pad, like code_bits)
    base: float = 0.0


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
    members: tuple[tuple[str, ...], ...] = ()   # per unit, the model units it stands for (fused ties); () : itself
    hardware: dict[Metric, HwCost] = field(default_factory=dict)   # LATENCY / MEMORY costs (with_hardware)
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index.update({name: i for i, name in enumerate(self.units)})
        for i, names in enumerate(self.members):
            self._index.update({name: i for name in names})

    @property
    def model_units(self) -> tuple[str, ...]:
        """The model's units a plan names: the members of fused units, in order."""
        return tuple(n for i, u in enumerate(self.units) for n in (self.members[i] if self.members else (u,)))

    def unit_index(self, name: str) -> int:
        """The index of the (possibly fused) unit that covers model unit `name`."""
        return self._index[name]

    def fused(self) -> Problem:
        """Each tie group becomes ONE unit whose ladder is the level ids all members share, with
        costs summed: every searcher then keeps fused groups on one level without knowing about
        ties, and plans still decode to every member. A problem without ties is returned as is."""
        groups = {int(g[0]): g for g in self.tie_groups()}
        if not groups:
            return self
        in_group = {int(i) for g in groups.values() for i in g}
        order = [[i] for i in range(self.n_units) if i not in in_group] + [list(map(int, g)) for g in groups.values()]
        order.sort(key=lambda g: g[0])
        ladders = [[lv for lv in self.levels[g[0]] if all(lv in self.levels[m] for m in g)] for g in order]
        width = max(len(lad) for lad in ladders)
        tables = {"code": self.code_bits, "stored": self.stored_bits, "kept": self.unit_cost(Metric.DENSITY),
                  **{m: hw.table for m, hw in self.hardware.items()}}
        cols = {k: np.full((len(order), width), np.nan) for k in tables}
        for r, (g, lad) in enumerate(zip(order, ladders, strict=True)):
            idx = [[self.levels[m].index(lv) for m in g] for lv in lad]
            for k, table in tables.items():
                cols[k][r, :len(lad)] = [sum(table[m, j] for m, j in zip(g, js, strict=True)) for js in idx]
        name = lambda g: self.units[g[0]] + "".join("+" + self.units[m].rsplit(".", 1)[-1] for m in g[1:])  # noqa: E731
        return Problem(units=tuple(name(g) for g in order), numel=np.array([self.numel[g].sum() for g in order]),
                       levels=tuple(tuple(lad) for lad in ladders), code_bits=cols["code"], stored_bits=cols["stored"],
                       budget=self.budget, kinds=tuple("+".join(self.kinds[m] for m in g) for g in order) if self.kinds else (),
                       blocks=tuple(self.blocks[g[0]] for g in order) if self.blocks else (),
                       kept=cols["kept"] if self.kept is not None else None,
                       members=tuple(tuple(self.units[m] for m in g) for g in order),
                       hardware={m: HwCost(cols[m], hw.base) for m, hw in self.hardware.items()})

    def with_hardware(self, metric: Metric, table: np.ndarray, base: float = 0.0) -> Problem:
        """This problem with a hardware cost attached ([U, L] per unit and level, plus `base`)."""
        if metric not in HARDWARE or np.shape(table) != self.code_bits.shape:
            raise ValueError(f"with_hardware: {metric} needs a {self.code_bits.shape} table, got {np.shape(table)}")
        return replace(self, hardware={**self.hardware, metric: HwCost(np.asarray(table, dtype=np.float64), float(base))},
                       _index={})

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
        names = self.model_units
        extra = set(m) - set(names)
        missing = [u for u in names if u not in m]
        if extra or missing:
            which = f"unknown unit {sorted(extra)[0]!r}" if extra else f"no level for {missing[0]!r}"
            raise BadPlan(f"plan does not fit this model/search space ({which}): was it made for another model or space?")
        bad = [(u, m[u]) for u in names if m[u] not in self.levels[self.unit_index(u)]]
        if bad:
            raise BadPlan(f"plan gives {bad[0][0]} the level {bad[0][1]!r}, which this search space lacks: pass --space")
        split = [u for i, g in enumerate(self.members) if len({m[n] for n in g}) > 1 for u in g[:1]]
        if split:
            raise BadPlan(f"plan gives the fused group of {split[0]} more than one level: fused units share one")
        first = [g[0] for g in self.members] if self.members else self.units
        return np.array([self.levels[i].index(m[u]) for i, u in enumerate(first)], dtype=np.int64)

    def decode(self, x) -> Plan:
        if self.members:
            return Plan.of({n: self.levels[i][int(x[i])] for i, g in enumerate(self.members) for n in g})
        return Plan.of({u: self.levels[i][int(x[i])] for i, u in enumerate(self.units)})

    # --- costs -------------------------------------------------------------------------
    def unit_cost(self, metric: Metric) -> np.ndarray:
        """[U, L] cost of each (unit, level) in the budget's additive currency (bits or bytes)."""
        if metric is Metric.BITS:
            return self.code_bits
        if metric is Metric.DENSITY:      # kept weights: sparsity >= s  <=>  kept <= (1 - s) * numel
            return self.kept if self.kept is not None else np.where(np.isnan(self.code_bits), np.nan,
                                                                     self.numel[:, None].astype(np.float64))
        if metric in HARDWARE:
            return self._hw(metric).table
        return self.stored_bits / 8.0 if metric is Metric.BYTES else self.stored_bits

    def _hw(self, metric: Metric) -> HwCost:
        if metric not in self.hardware:
            flag = {Metric.LATENCY: "--max-latency / --objectives ...,latency", Metric.MEMORY: "--max-memory"}[metric]
            raise BadBudget(f"this problem has no {metric.value} costs: they are attached by {flag} "
                            "(planner/runtime/latency.py), not by the levels DB")
        return self.hardware[metric]

    def cost(self, x) -> Costs:
        idx = (np.arange(self.n_units), np.asarray(x))
        code = float(self.code_bits[idx].sum())
        stored = float(self.stored_bits[idx].sum())
        n = self.total_numel
        kept = float(self.unit_cost(Metric.DENSITY)[idx].sum())
        hw = {m.value: h.base + float(h.table[idx].sum()) for m, h in self.hardware.items()}
        return Costs(bits=code / n, bpw=stored / n, nbytes=int(np.ceil(stored / 8)), density=kept / n, **hw)

    def limit(self, b: Budget) -> float:
        """One limit in the additive currency of `unit_cost(b.metric)` (total bits, bytes or kept
        weights; seconds or bytes of the planned units for hardware limits: the base taken off)."""
        if b.metric in HARDWARE:
            return b.value - self._hw(b.metric).base
        return b.value if b.metric is Metric.BYTES else b.value * self.total_numel

    def in_budget_units(self, metric: Metric, spend: float) -> float:
        """The inverse of `limit`: an additive spend in `metric` as a budget would state it."""
        if metric in HARDWARE:
            return spend + self._hw(metric).base
        return spend if metric is Metric.BYTES else spend / self.total_numel

    def extent(self, metric: Metric) -> tuple[float, float]:
        """(lowest, highest) cost any plan can have in `metric`, as a budget states it: per-unit
        minima and maxima, since a hardware cost need not grow along a ladder."""
        c = self.unit_cost(metric)
        return (self.in_budget_units(metric, float(np.nansum(np.nanmin(c, axis=1)))),
                self.in_budget_units(metric, float(np.nansum(np.nanmax(c, axis=1)))))

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
                raise BadBudget(f"budget limit {b} is beyond the cheapest plan ({_fmt(self.in_budget_units(b.metric, lo), b)}): "
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
