"""Units: the things a plan decides about (here: the linear weights of the decoder blocks)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from planner.errors import BadModel
from planner.model.families import family_of


@dataclass(frozen=True)
class Unit:
    name: str                 # full module path, e.g. "model.layers.3.self_attn.q_proj"
    shape: tuple[int, int]    # (out_features, in_features)
    numel: int
    block: int
    kind: str                 # "q_proj", ...
    group: str                # fused group id within the block, e.g. "3.qkv"


def find_units(model: nn.Module) -> list[Unit]:
    """The decoder-block linears of a supported family, in block order then table order."""
    fam = family_of(model.config.model_type)
    if fam is None:
        raise BadModel(f"model type {model.config.model_type!r} is not supported yet: "
                       "supported are llama, mistral, qwen2/3, olmo, granite, phi3")
    blocks = model.get_submodule(fam.blocks)
    units = []
    for i in range(len(blocks)):
        for lk in fam.linears:
            name = f"{fam.blocks}.{i}.{lk.path}"
            mod = model.get_submodule(name)
            if not isinstance(mod, nn.Linear):
                raise BadModel(f"{name} is a {type(mod).__name__}, not a Linear: this checkpoint layout is not supported")
            out_f, in_f = mod.weight.shape
            units.append(Unit(name, (out_f, in_f), out_f * in_f, i, lk.kind, f"{i}.{lk.group}"))
    return units
