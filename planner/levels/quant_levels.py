"""Integer-grid levels: GPTQ (one Hessian factorization for every bitwidth) and round-to-nearest."""

from __future__ import annotations

import torch

from planner.errors import BadSearchSpace
from planner.levels.gptq import gptq_quantize
from planner.levels.quant import QuantizedWeight, QuantSpec, rtn_quantize
from planner.levels.registry import Builder, BuildOptions, register_builder
from planner.space import LevelSpec, Method

_KEYS = {"method", "bits", "group_size", "symmetric"}


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise BadSearchSpace(f"{where}: {msg}")


def parse_quant(fam: dict, at: str) -> list[LevelSpec]:
    extra = set(fam) - _KEYS
    _need(not extra, at, f"unknown key(s) {sorted(extra)}; allowed: {', '.join(sorted(_KEYS))}")
    bits = fam.get("bits")
    bits = [bits] if isinstance(bits, int) else bits
    _need(isinstance(bits, list) and bits and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8
                                                  for b in bits), at, "bits must be an integer or list of integers in 1..8")
    gs = fam.get("group_size", 128)
    _need(isinstance(gs, int) and not isinstance(gs, bool) and gs >= 0, at,
          "group_size must be a non-negative integer (0 = per channel)")
    sym = fam.get("symmetric", False)
    _need(isinstance(sym, bool), at, "symmetric must be true or false")
    return [LevelSpec(Method(fam["method"]), b, gs, sym) for b in bits]


def _qspec(s: LevelSpec) -> QuantSpec:
    return QuantSpec(bits=s.bits, group_size=s.group_size, symmetric=s.symmetric)


def build_gptq(W: torch.Tensor, H: torch.Tensor | None, specs: list[LevelSpec], opt: BuildOptions) -> dict:
    qws = gptq_quantize(W, H, [_qspec(s) for s in specs], percdamp=opt.damp, block_size=opt.block_size)
    return {s.id: q for s, q in zip(specs, qws, strict=True)}


def build_rtn(W: torch.Tensor, H: torch.Tensor | None, specs: list[LevelSpec], opt: BuildOptions) -> dict:
    return {s.id: rtn_quantize(W, _qspec(s)) for s in specs}


register_builder(Builder("gptq", parse_quant, build_gptq, QuantizedWeight.from_tensors, needs_hessian=True))
register_builder(Builder("rtn", parse_quant, build_rtn, QuantizedWeight.from_tensors))
