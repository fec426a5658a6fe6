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
    # a sub-block unit (`units: subblock`): (module, shape) of every linear it stands for; its
    # name is the sub-block's output linear, its numel and level costs are summed over these
    parts: tuple[tuple[str, tuple[int, int]], ...] = ()
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


def subblock_units(model: nn.Module, units: list[Unit]) -> list[Unit]:
    """One unit per attention / MLP sub-block of every block (the family table's `subblocks`),
    named after its output linear (o_proj, down_proj), whose weight its levels replace."""
    fam = family_of(model.config.model_type)
    if fam is None or not fam.subblocks:
        raise BadModel(f"model type {model.config.model_type!r} has no sub-block layout in the family table")
    by_kind = {(u.block, u.kind): u for u in units}
    out = []
    for block in sorted({u.block for u in units}):
        for sub, kinds in fam.subblocks:
            members = [by_kind[(block, k)] for k in kinds]
            carrier = members[-1]
            out.append(Unit(carrier.name, carrier.shape, sum(m.numel for m in members), block, sub, f"{block}.{sub}",
                            tuple((m.name, m.shape) for m in members)))
    return out


def plan_units(model: nn.Module, grouping: str = "linear") -> list[Unit]:
    """The units a search space plans: `linear` (every decoder-block linear) or `subblock`."""
    units = find_units(model)
    return subblock_units(model, units) if grouping == "subblock" else units


def subblock_ties(model: nn.Module, units: list[Unit]) -> tuple[str, ...]:
    """Per linear unit, the id of its attention / MLP sub-block ("3.attn"; "" outside any), for
    `tie: subblock`: a sub-block's linears then share one level, so a `drop` level drops it whole."""
    fam = family_of(model.config.model_type)
    sub_of = {k: sub for sub, kinds in (fam.subblocks if fam else ()) for k in kinds}
    return tuple(f"{u.block}.{sub_of[u.kind]}" if u.kind in sub_of else "" for u in units)


def cost_shapes(unit: Unit) -> list[tuple[int, int]]:
    """The shapes a level's cost is summed over: the unit's own, or its sub-block's linears."""
    return [shape for _, shape in unit.parts] or [unit.shape]
