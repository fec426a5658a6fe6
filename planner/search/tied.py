"""Searching a problem with raw ties (`Problem.ties`: fused q/k/v, gate/up) as its fused problem.

Population searchers move one unit at a time, which would split a tie group. Searching
`Problem.fused()` instead (each group one unit, its ladder the level ids all members share, costs
summed) keeps every group on one level by construction; a `Fusion` maps the fused vectors back to
the problem's own (every member gets the group's level) and the problem's vectors (seed plans,
results) to fused ones. Without ties it is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.problem import Problem

X = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Fusion:
    outer: Problem                      # the problem as given (its vectors are the searcher's interface)
    inner: Problem                      # what is searched: outer.fused()
    members: tuple[np.ndarray, ...]     # per inner unit, the outer unit indices it stands for
    index: tuple[np.ndarray, ...]       # per inner unit, [inner ladder, members]: each member's outer ladder index

    @classmethod
    def of(cls, problem: Problem) -> Fusion:
        inner = problem.fused()
        if inner is problem:
            return cls(problem, problem, (), ())
        pos = {u: i for i, u in enumerate(problem.units)}
        members = tuple(np.array([pos[n] for n in g]) for g in inner.members)
        index = tuple(np.array([[problem.levels[m].index(lv) for m in ms] for lv in inner.levels[r]], dtype=np.int64)
                      for r, ms in enumerate(members))
        return cls(problem, inner, members, index)

    @property
    def identity(self) -> bool:
        return self.inner is self.outer

    def to_outer(self, x) -> X:
        """The problem's vector of a fused one: every member at its group's level."""
        if self.identity:
            return tuple(int(v) for v in x)
        out = np.zeros(self.outer.n_units, dtype=np.int64)
        for r, ms in enumerate(self.members):
            out[ms] = self.index[r][int(x[r])]
        return tuple(int(v) for v in out)

    def to_inner(self, x) -> X:
        """The fused vector of a problem's one. A split group (a seed plan that ignores the ties)
        takes the dearest shared level that raises none of its members, else its cheapest."""
        if self.identity:
            return tuple(int(v) for v in x)
        x = np.asarray(x, dtype=np.int64)
        out = []
        for r, ms in enumerate(self.members):
            fits = np.flatnonzero((self.index[r] <= x[ms]).all(axis=1))
            same = np.flatnonzero((self.index[r] == x[ms]).all(axis=1))
            out.append(int(same[0]) if same.size else int(fits.max()) if fits.size else 0)
        return tuple(out)
