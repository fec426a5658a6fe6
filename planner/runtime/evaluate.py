"""Real evaluation: the in-process evaluator with the plan's linears swapped for their runtime
modules (`runtime_linear`: PackedLinear with packed weights and real kernels, or, for levels without
a kernel — format grids other than int-symmetric, K-quants, Q4_1, ... — a DequantLinear that keeps
the level's stored payload and dequantizes it at each forward) instead of dequantized dense weights.

Everything else — reference distributions, batching, prefix caching, KL — is the in-process
evaluator's: only `apply` differs. Packed modules are built on first use per (unit, level) and
kept, so a search repacks nothing it has seen (memory: the packed bytes of every level used).
"""

from __future__ import annotations

from kernels.cpu import CpuKind
from planner.errors import BadPlan
from planner.evaluate.evaluator import InProcessEvaluator
from planner.plan import Plan
from planner.runtime.packed import DequantLinear, PackedLinear, replace_module, runtime_linear


class RealEvaluator(InProcessEvaluator):
    def __init__(self, *args, cpu_kind: CpuKind | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cpu_kind = cpu_kind
        self._packed: dict[tuple[str, str], PackedLinear | DequantLinear] = {}

    def packed_linear(self, unit: str, level: str) -> PackedLinear | DequantLinear:
        key = (unit, level)
        if key not in self._packed:
            dense = self._modules[unit]
            self._packed[key] = runtime_linear(self.db.load(unit, level), dense.bias, self.cpu_kind,
                                               level).to(dense.weight.device)
        return self._packed[key]

    def apply(self, plan: Plan | None) -> None:
        """Put each planned unit's runtime module in its parent module; every other unit gets its dense Linear back."""
        chosen = plan.as_dict() if plan else {}
        for u, level in chosen.items():
            i = self.problem._index.get(u)
            if i is None or level not in self.problem.levels[i]:
                raise BadPlan(f"plan gives {u!r} the level {level!r}, which this model/search space lacks")
        for u, dense in self._modules.items():
            replace_module(self.model, u, self.packed_linear(u, chosen[u]) if u in chosen else dense)


def real_evaluator(session, problem, cpu_kind: CpuKind | None = None) -> RealEvaluator:
    """A RealEvaluator over a pipeline Session's model, DB and windows, installed as the session's
    evaluator so that every verb of the pipeline (search, finish, eval) measures through it."""
    from planner.moe.experts import refuse_fused_experts
    from planner.pipeline import DTYPES

    refuse_fused_experts(problem.model_units, "the packed runtime (--real)", "evaluate without --real "
                         "(dequantized weights, the same levels)", session.loaded.model)
    ev = RealEvaluator(session.loaded.model, session.db, problem, session.windows,
                       dtype=DTYPES[session.spec.dtype], kl_topk=getattr(session.spec, "kl_topk", None),
                       cpu_kind=cpu_kind)
    session._evaluator = ev
    return ev


__all__ = ["RealEvaluator", "real_evaluator"]
