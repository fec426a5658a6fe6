"""GPTQModel export: `quantize_config.json` with per-module `dynamic` overrides, and a checkpoint in
GPTQ's packed layout converted from the levels DB's codes (no re-quantization).

Layout per planned Linear (out x in, G groups along the input dim), as GPTQModel / AutoGPTQ store it:

    qweight  int32 [in * bits / 32, out]   codes packed along the input dim: for each output column
                                           a little-endian bitstream of its `in` codes in 32-bit words
                                           (3-bit codes straddle words, 32 codes per 3 words)
    qzeros   int32 [G, ceil(out*bits/32)]  zero points packed along the output dim, stored minus 1
                                           ("gptq" v1 checkpoint format)
    scales   fp16  [G, out]
    g_idx    int32 [in]                    group of each input column (i // group_size; no act-order)

The base `bits / group_size / sym` is the plan's most common scheme; every module with another
scheme gets a `+:<escaped module name>` entry in `dynamic`, and planned-over block linears the plan
leaves out get `-:` (skip). Planner group size 0 (per output channel) is GPTQ's -1.
An asymmetric level whose zero point is 0 somewhere cannot be stored minus 1: then the whole
checkpoint is written as `gptq_v2` (zero points stored as they are), which GPTQModel also reads.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import torch
from safetensors.torch import save_file

from planner.export.base import ExportContext, ExportResult, planned_units, register, state_dict_without
from planner.levels.pack import pack_codes
from planner.levels.quant import QuantizedWeight


def pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] small ints -> int32 [rows, ceil(n*bits/32)]: each row a little-endian bitstream."""
    rows, n = codes.shape
    width = -(-n // 32) * 32                       # 32 codes of any width fill whole words
    padded = torch.zeros(rows, width, dtype=torch.int64)
    padded[:, :n] = codes.to(torch.int64)
    words = np.frombuffer(pack_codes(padded, bits).numpy().tobytes(), dtype="<i4").reshape(rows, width * bits // 32)
    return torch.from_numpy(words[:, : -(-n * bits // 32)].copy())


def gptq_tensors(qw: QuantizedWeight, zero_offset: int) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales / g_idx of one module (zero points stored minus `zero_offset`)."""
    out_f, in_f = qw.shape
    bits, gs = qw.spec.bits, qw.spec.group_size
    qweight = pack_rows_int32(qw.codes_unpacked(), bits).T.contiguous()
    zeros = (qw.zeros_unpacked().to(torch.int64) - zero_offset).T.contiguous()      # [G, out]
    return {"qweight": qweight, "qzeros": pack_rows_int32(zeros, bits), "scales": qw.scales.T.contiguous(),
            "g_idx": (torch.arange(in_f, dtype=torch.int32) // (gs if gs > 0 else in_f)).to(torch.int32)}


def _scheme(qw: QuantizedWeight) -> dict:
    return {"bits": qw.spec.bits, "group_size": qw.spec.group_size if qw.spec.group_size > 0 else -1,
            "sym": qw.spec.symmetric}


@register
class GPTQModelExporter:
    name = "gptqmodel"
    target = "gptqmodel"
    description = "GPTQ-packed checkpoint + quantize_config.json with per-module dynamic overrides"

    def export(self, ctx: ExportContext) -> ExportResult:
        units = planned_units(ctx)
        qws = {u.name: ctx.quantized(u.name) for u in units}
        v1 = all(qw.spec.symmetric or int(qw.zeros_unpacked().min()) >= 1 for qw in qws.values())
        tensors: dict[str, torch.Tensor] = {}
        for name, qw in qws.items():
            tensors.update({f"{name}.{k}": t for k, t in gptq_tensors(qw, 1 if v1 else 0).items()})
        planned = {f"{n}.weight" for n in qws}
        tensors.update(state_dict_without(ctx.model, lambda n: n in planned, ctx.dtype))
        save_file(tensors, str(ctx.out / "model.safetensors"), metadata={"format": "pt"})

        base = Counter(json.dumps(_scheme(q), sort_keys=True) for q in qws.values()).most_common(1)[0][0]
        dynamic = {f"+:{re.escape(n)}": _scheme(q) for n, q in qws.items() if json.dumps(_scheme(q), sort_keys=True) != base}
        dynamic.update({f"-:{re.escape(u.name)}": {} for u in ctx.units if u.name not in qws})
        fmt = "gptq" if v1 else "gptq_v2"
        qconfig = {**json.loads(base), "dynamic": dynamic, "desc_act": False, "lm_head": False, "method": "gptq",
                   "quant_method": "gptq", "format": fmt, "checkpoint_format": fmt, "pack_dtype": "int32",
                   "true_sequential": True, "meta": {"quantizer": ["planner:0.1.0"], "plan_id": ctx.plan.id}}
        (ctx.out / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
        config = ctx.model.config.to_dict()
        config["quantization_config"] = qconfig
        config["dtype"] = str(ctx.dtype).removeprefix("torch.")
        (ctx.out / "config.json").write_text(json.dumps(config, indent=2))
        ctx.tokenizer.save_pretrained(ctx.out)
        b = json.loads(base)
        lines = [f"{len(qws)} modules; base int{b['bits']} group {b['group_size']}{' sym' if b['sym'] else ''}, "
                 f"{len(dynamic)} dynamic override(s); checkpoint format {fmt}",
                 f"load: GPTQModel.load({str(ctx.shown)!r})"]
        return ExportResult(self.name, ctx.out, sorted(p.name for p in ctx.out.iterdir()), lines,
                            {"gptq_format": fmt, "dynamic_overrides": len(dynamic)})
