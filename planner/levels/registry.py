"""Level builders behind one interface, registered by the `method` name a search space uses.

A builder turns one unit's weight (and, if it asks, the Hessian of its input) into compressed
forms at several levels at once, so one factorization or one pass serves every level. Adding a
builder = one module that calls `register_builder` + one import line in `planner/levels/__init__.py`.

A level spec (frozen dataclass) knows its id and its exact costs for a unit shape; a stored
level knows how to write itself as tensors and how to dequantize for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


class Spec(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def builder(self) -> str: ...
    def code_bits(self, shape: tuple[int, int]) -> int: ...
    def stored_bits(self, shape: tuple[int, int]) -> int: ...
    def nbytes(self, shape: tuple[int, int]) -> int: ...
    def to_json(self) -> dict: ...


class Stored(Protocol):
    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]: ...
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


@dataclass(frozen=True)
class BuildOptions:
    damp: float = 0.01        # Hessian damping, fraction of mean(diag H)
    block_size: int = 128     # columns per lazy-batch update (GPTQ / SparseGPT)


@dataclass(frozen=True)
class Builder:
    name: str
    parse: Callable[[dict, str], list]                          # one YAML level family -> specs
    build: Callable[[torch.Tensor, torch.Tensor | None, list, BuildOptions], dict[str, Stored]]
    load: Callable[[dict[str, torch.Tensor], str], Stored]     # tensors of a unit file, level id
    needs_hessian: bool = False


BUILDERS: dict[str, Builder] = {}


def register_builder(builder: Builder) -> Builder:
    BUILDERS[builder.name] = builder
    return builder
