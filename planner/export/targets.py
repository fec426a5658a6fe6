"""Deployment targets: what each serving engine can run, checked before anything is written.

    violations = check_deployable(plan, problem, Target.VLLM, shapes)     # [] when servable
    r = restrict_space(problem, Target.VLLM, shapes)   # allowed level indices per unit + tied groups
    r.problem()                                        # the Problem with only those levels

The rules (one row per target in `RULES`):

    target     bits         group sizes                       other
    vllm       4, 8         per channel, 32, 64, 128          columns divisible by the group size;
                                                              fused q/k/v and gate/up share one scheme
    llamacpp   2-6, 8       any                               a GGUF type with the level's bits must fit
                                                              the rows (K-quants need multiples of 256)
    gptqmodel  2, 3, 4, 8   per channel, 16 ... 1024          columns a multiple of 32
    packed     any          any                               -

Both symmetric and asymmetric (zero-point) levels pass everywhere: vLLM's compressed-tensors
W4A16/W8A16 kernels take zero points, GPTQ stores them, GGUF types carry a min or are symmetric.
Level ids are read back into specs by `level_ids.level_spec`.

Other level kinds: llama.cpp serves every `gguf` level (it is a GGUF tensor) and each `format` level
whose layout is a GGUF type's (`gguf_types.native_type`); vLLM and GPTQModel serve integer (gptq /
rtn) levels only; `packed` serves every level of the levels DB.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from planner.export.base import NotDeployable
from planner.export.gguf_types import gguf_type, native_type
from planner.export.level_ids import level_spec, parse_level
from planner.model.families import FAMILIES
from planner.plan import Plan
from planner.problem import Problem
from planner.space import LevelSpec


class Target(str, enum.Enum):
    VLLM = "vllm"
    LLAMACPP = "llamacpp"
    GPTQMODEL = "gptqmodel"
    PACKED = "packed"


@dataclass(frozen=True)
class Rules:
    bits: frozenset[int] | None            # None: any
    group_sizes: frozenset[int] | None     # 0 = per output channel; None: any
    groups_divide_columns: bool = False
    columns_multiple_of: int = 1
    fused_share_scheme: bool = False
    needs_gguf_type: bool = False


RULES: dict[Target, Rules] = {
    Target.VLLM: Rules(frozenset({4, 8}), frozenset({0, 32, 64, 128}), groups_divide_columns=True,
                       fused_share_scheme=True),
    Target.LLAMACPP: Rules(None, None, needs_gguf_type=True),
    Target.GPTQMODEL: Rules(frozenset({2, 3, 4, 8}), frozenset({0, 16, 32, 64, 128, 256, 512, 1024}),
                            columns_multiple_of=32),
    Target.PACKED: Rules(None, None),
}

# kind -> fused group, from the family table ("q_proj" -> "qkv")
_KIND_GROUP = {lk.kind: lk.group for fam in FAMILIES for lk in fam.linears}


def parse_target(name: str) -> Target:
    try:
        return Target(name)
    except ValueError:
        raise NotDeployable(f"unknown target {name!r}: choose one of {', '.join(t.value for t in Target)}") from None


def scheme(level_id: str) -> tuple | None:
    """What a serving engine sees of a level: (bits, group size, symmetric). GPTQ and RTN levels with
    the same scheme are interchangeable for fused-group purposes."""
    s = parse_level(level_id)
    return None if s is None else (s.bits, s.group_size, s.symmetric)


def level_problem(level_id: str, target: Target, in_features: int | None) -> str | None:
    """Why `target` cannot serve this level on a matrix with `in_features` columns (None: it can)."""
    rules = RULES[target]
    if target is Target.PACKED:
        return None
    s = level_spec(level_id)
    if rules.needs_gguf_type and s is not None and not isinstance(s, LevelSpec):
        return native_type(s, in_features)[1] or None
    if not isinstance(s, LevelSpec):
        kind = f"the {s.builder} level" if s is not None else "the level"
        return (f"{target.value} serves only integer group-wise (gptq / rtn) levels, not {kind} {level_id!r}: "
                "export it with --format packed" + (" or llamacpp" if s is not None and native_type(s, None)[0] else ""))
    if rules.bits is not None and s.bits not in rules.bits:
        return f"{target.value} serves {'/'.join(map(str, sorted(rules.bits)))}-bit weights, not {s.bits}-bit"
    if rules.group_sizes is not None and s.group_size not in rules.group_sizes:
        allowed = ", ".join("per-channel" if g == 0 else str(g) for g in sorted(rules.group_sizes))
        return f"{target.value} serves group sizes {allowed}, not {s.group_size}"
    if in_features is None:
        return None
    if rules.groups_divide_columns and s.group_size and in_features % s.group_size:
        return f"{target.value} needs the group size to divide the columns ({in_features} % {s.group_size} != 0)"
    if in_features % rules.columns_multiple_of:
        return f"{target.value} needs columns in multiples of {rules.columns_multiple_of}, not {in_features}"
    if rules.needs_gguf_type:
        choice = gguf_type(s.bits, s.symmetric, in_features)
        if choice is None:
            return f"no GGUF type holds {s.bits}-bit rows of {in_features} weights"
        if not choice.exact:
            return choice.note
    return None


@dataclass(frozen=True)
class Violation:
    unit: str
    level: str
    reason: str

    def __str__(self) -> str:
        return f"{self.unit} at {self.level}: {self.reason}"


def _fused_groups(problem: Problem) -> list[list[int]]:
    """Unit indices that share one input in a block (q/k/v; gate/up), from the family table."""
    groups: dict[tuple[int, str], list[int]] = {}
    for i, kind in enumerate(problem.kinds):
        block = problem.blocks[i] if problem.blocks else -1
        groups.setdefault((block, _KIND_GROUP.get(kind, kind + f"#{i}")), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _in_features(problem: Problem, shapes: Mapping[str, tuple[int, int]] | None, unit: str) -> int | None:
    return None if shapes is None else int(shapes[unit][1])


def check_deployable(plan: Plan, problem: Problem, target: Target,
                     shapes: Mapping[str, tuple[int, int]] | None = None) -> list[Violation]:
    """Every reason `target` cannot serve `plan` ([] when it can). Without `shapes` ((out, in) per
    unit), the checks that depend on matrix columns are skipped."""
    x = problem.encode(plan)
    levels = plan.as_dict()
    out = []
    for unit in problem.model_units:       # a fused unit's members (search --target) are checked one by one
        why = level_problem(levels[unit], target, _in_features(problem, shapes, unit))
        if why:
            out.append(Violation(unit, levels[unit], why))
    chosen = [problem.levels[i][int(x[i])] for i in range(problem.n_units)]
    if RULES[target].fused_share_scheme and not problem.members:   # fused units share one level by construction
        for group in _fused_groups(problem):
            schemes = {scheme(chosen[i]) for i in group}
            if len(schemes) > 1:
                names = ", ".join(f"{problem.units[i].rsplit('.', 1)[-1]}={chosen[i]}" for i in group)
                out.append(Violation(problem.units[group[0]], chosen[group[0]],
                                     f"{target.value} fuses these into one matrix, so they need one scheme ({names})"))
    return out


def require_deployable(plan: Plan, problem: Problem, target: Target,
                       shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Raise NotDeployable with one line naming the first violation and the count."""
    v = check_deployable(plan, problem, target, shapes)
    if v:
        more = f" (and {len(v) - 1} more)" if len(v) > 1 else ""
        raise NotDeployable(f"plan {plan.id} cannot be served by {target.value}: {v[0]}{more}; "
                            f"search with --target {target.value}, or export --format packed")


@dataclass(frozen=True)
class Restriction:
    """Which levels each unit may take for a target, and which units must take the same level."""

    base: Problem
    allowed: tuple[tuple[int, ...], ...]    # per unit: indices into base.levels[u], cheapest first
    tied: tuple[tuple[int, ...], ...]       # groups of unit indices that must take the same level id

    def problem(self) -> Problem:
        """`base` with every ladder cut to its allowed levels (plans decode to the same level ids).
        Every per-(unit, level) table is cut alike (costs, kept weights, hardware costs) and the
        rest is kept as is (ties, a fused unit's members), so any problem can be cut."""
        p = self.base
        width = max(len(a) for a in self.allowed)

        def cut(table: np.ndarray) -> np.ndarray:
            out = np.full((p.n_units, width), np.nan)
            for u, a in enumerate(self.allowed):
                out[u, :len(a)] = table[u, list(a)]
            return out

        levels = tuple(tuple(p.levels[u][j] for j in a) for u, a in enumerate(self.allowed))
        return dataclasses.replace(p, levels=levels, code_bits=cut(p.code_bits), stored_bits=cut(p.stored_bits),
                                   kept=None if p.kept is None else cut(p.kept), _index={},
                                   hardware={m: dataclasses.replace(h, table=cut(h.table)) for m, h in p.hardware.items()})


def restrict_space(problem: Problem, target: Target,
                   shapes: Mapping[str, tuple[int, int]] | None = None) -> Restriction:
    """The target's part of the search space. Tied units (vLLM's fused groups) get the same allowed
    level ids (the intersection), so tying them never leaves the space. Raises NotDeployable when
    some unit has no level the target can serve."""
    allowed_ids = [
        [lv for lv in problem.levels[u] if level_problem(lv, target, _in_features(problem, shapes, name)) is None]
        for u, name in enumerate(problem.units)]
    tied = _fused_groups(problem) if RULES[target].fused_share_scheme else []
    for group in tied:
        common = set.intersection(*(set(allowed_ids[u]) for u in group))
        for u in group:
            allowed_ids[u] = [lv for lv in allowed_ids[u] if lv in common]
    for u, ids in enumerate(allowed_ids):
        if not ids:
            why = level_problem(problem.levels[u][-1], target, _in_features(problem, shapes, problem.units[u]))
            raise NotDeployable(f"no level of this search space can be served by {target.value} for "
                                f"{problem.units[u]} ({why or 'its fused group shares no level'}): "
                                f"use a search space with levels {target.value} serves")
    allowed = tuple(tuple(problem.levels[u].index(lv) for lv in ids) for u, ids in enumerate(allowed_ids))
    return Restriction(problem, allowed, tuple(tuple(g) for g in tied))


def search_problem(problem: Problem, target: Target, shapes: Mapping[str, tuple[int, int]] | None = None) -> Problem:
    """What `planner search --target` optimizes: the levels the target serves, and each group that
    must share one scheme fused into a single unit (`Problem.fused`), so that every searcher's
    plans are deployable by construction."""
    r = restrict_space(problem, target, shapes)
    ties = [""] * problem.n_units
    for k, group in enumerate(r.tied):
        for u in group:
            ties[u] = f"fused{k}"
    restricted = dataclasses.replace(r.problem(), ties=tuple(ties), _index={}).fused()
    restricted.check_budget()
    return restricted
