"""llama.cpp export: a `--tensor-type-file` for llama-quantize, and a GGUF file with the plan's types.

    OUT/tensor-types.txt    one `regex=type` token per line on GGUF names, e.g.
                            ^blk\\.(0|3|12)\\.ffn_down\\.weight$=q4_1
                            (llama-quantize reads whitespace-separated tokens, lower-cases the regex
                            and runs std::regex_search, hence the anchors; the file has no comments)
    OUT/model.gguf          the planned weights in those types (see gguf_file.py), readable by the
                            `gguf` package, transformers (`gguf_file=`) and llama.cpp
    OUT/llamacpp.json       per tensor: level, GGUF type, its real bpw, how it was encoded

Integer levels map to GGUF types by `gguf_types.gguf_type`; the table there lists the real bpw of
each type. `gguf` levels (and `format` levels in a GGUF layout) already are GGUF tensors: their type
is the stored one (`gguf_types.native_type`) and their blocks go into model.gguf unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from planner.export.base import BadExport, ExportContext, ExportResult, register
from planner.export.gguf_file import PlannedTensor, write_gguf
from planner.export.gguf_types import GGUFChoice, gguf_type, native_type, type_block, type_bpw
from planner.model.families import Family
from planner.space import LevelSpec
from planner.units import Unit

GGUF_FILE = "model.gguf"
TYPES_FILE = "tensor-types.txt"


@dataclass(frozen=True)
class TensorType:
    unit: str
    gguf_name: str
    level: str
    type: str
    bpw: float            # real stored bits per weight of the GGUF type
    numel: int


def gguf_name(unit: Unit, family: Family) -> str:
    stem = next(lk.gguf for lk in family.linears if lk.kind == unit.kind)
    return f"blk.{unit.block}.{stem}.weight"


def level_type(spec, in_features: int) -> GGUFChoice | None:
    """The GGUF type of a level (integer: the mapped type; gguf / format: the type it is stored as)."""
    if isinstance(spec, LevelSpec):
        return gguf_type(spec.bits, spec.symmetric, in_features)
    name, why = native_type(spec, in_features)
    return GGUFChoice(name, type_bpw(name), type_block(name), True) if name else GGUFChoice("", 0.0, 0, False, why)


def tensor_types(units: list[Unit], levels: dict[str, str], specs: dict,
                 family: Family) -> list[TensorType]:
    """The GGUF type of every planned unit (BadExport if a level has no exact GGUF type)."""
    out = []
    for u in units:
        choice = level_type(specs[levels[u.name]], u.shape[1])
        if choice is None or not choice.exact:
            raise BadExport(f"{u.name} at {levels[u.name]}: {choice.note if choice else 'no GGUF type fits'}")
        out.append(TensorType(u.name, gguf_name(u, family), levels[u.name], choice.type, choice.bpw, u.numel))
    return out


def tensor_type_lines(types: list[TensorType]) -> list[str]:
    """One `regex=type` line per (GGUF stem, type), listing its blocks: short, exact, anchored."""
    groups: dict[tuple[str, str], list[int]] = {}
    for t in types:
        _, block, stem, _ = t.gguf_name.split(".")
        groups.setdefault((stem, t.type), []).append(int(block))
    lines = []
    for (stem, typ), blocks in sorted(groups.items()):
        alt = "|".join(str(b) for b in sorted(blocks))
        lines.append(f"^blk\\.({alt})\\.{re.escape(stem)}\\.weight$={typ.lower()}")
    return lines


@register
class LlamaCppExporter:
    name = "llamacpp"
    target = "llamacpp"
    description = "llama-quantize --tensor-type-file + a GGUF file with the per-tensor types"

    def export(self, ctx: ExportContext) -> ExportResult:
        from planner.export.base import level_specs

        levels = ctx.plan.as_dict()
        units = [u for u in ctx.units if u.name in levels]
        types = tensor_types(units, levels, level_specs(ctx.space), ctx.family)
        lines = tensor_type_lines(types)
        (ctx.out / TYPES_FILE).write_text("\n".join(lines) + "\n")
        cfg = ctx.model.config
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
        planned = [PlannedTensor(t.gguf_name, ctx.stored(t.unit), t.type, heads.get(t.gguf_name.split(".")[2], 0))
                   for t in types]
        summary = [f"{TYPES_FILE}: {len(lines)} lines for {len(types)} tensors"]
        how: dict[str, str] = {}
        try:
            how = write_gguf(ctx.out / GGUF_FILE, ctx.model, ctx.tokenizer, planned,
                             "F32" if str(ctx.dtype) == "torch.float32" else "F16")
        except BadExport as e:
            summary.append(f"no {GGUF_FILE}: {e}")
        n = sum(t.numel for t in types)
        bpw = sum(t.bpw * t.numel for t in types) / n
        counts: dict[str, int] = {}
        for t in types:
            counts[t.type] = counts.get(t.type, 0) + 1
        summary.append("types: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                       + f"; real GGUF bpw of the planned tensors {bpw:.4f}")
        if how:
            modes = {m: sum(1 for v in how.values() if v == m) for m in sorted(set(how.values()))}
            summary.append(f"{GGUF_FILE}: " + ", ".join(f"{v} {k}" for k, v in modes.items())
                           + " (raw = the level's own GGUF blocks; exact = the DB's codes packed as blocks; "
                             "requant = re-quantized by gguf; f16 = type gguf cannot write)")
        if how and set(how.values()) <= {"raw", "exact"}:
            summary.append(f"deploy: {ctx.shown / GGUF_FILE} holds every planned tensor in its type "
                           f"(llama-cli -m {ctx.shown / GGUF_FILE}); re-quantizing it would lose the levels' rounding")
        else:
            summary.append(f"deploy: llama-quantize --tensor-type-file {ctx.shown / TYPES_FILE} model-f16.gguf out.gguf Q8_0")
        report = {"gguf_bpw": bpw, "tensors": [{**t.__dict__, "encoded": how.get(t.gguf_name)} for t in types]}
        (ctx.out / "llamacpp.json").write_text(json.dumps(report, indent=1))
        return ExportResult(self.name, ctx.out, sorted(p.name for p in ctx.out.iterdir()), summary,
                            {"gguf_bpw": bpw, "gguf_file": GGUF_FILE if how else None})
