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
    # a MoE expert's matrix: its index in the block's experts (-1: not an expert). Fused 3-D expert
    # tensors have no module per expert: `planner.moe.experts.unit_weight` resolves such names
    expert: int = -1


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at `path`, or None where the path is absent or holds None."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def find_units(model: nn.Module) -> list[Unit]:
    """The decoder-block linears of a supported family, in block order then table order."""
    fam = family_of(model.config.model_type)
    if fam is None:
        raise BadModel(f"model type {model.config.model_type!r} is not supported yet: "
                       "supported are llama, mistral, qwen2/3, olmo, granite, phi3, and the MoE families "
                       "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2/v3")
    blocks = model.get_submodule(fam.blocks)
    units = []
    for i in range(len(blocks)):
        for lk in fam.linears:
            name = f"{fam.blocks}.{i}.{lk.path}"
            if lk.optional and module_at(blocks[i], lk.path) is None:
                continue      # e.g. the dense MLP in a MoE model's MoE block, MLA's q_proj with q_lora_rank
            mod = model.get_submodule(name)
            if not isinstance(mod, nn.Linear):
                raise BadModel(f"{name} is a {type(mod).__name__}, not a Linear: this checkpoint layout is not supported")
            out_f, in_f = mod.weight.shape
            units.append(Unit(name, (out_f, in_f), out_f * in_f, i, lk.kind, f"{i}.{lk.group}"))
        if fam.moe is not None:
            from planner.moe.experts import moe_block_units

            units += moe_block_units(model, fam, i)
    return units
