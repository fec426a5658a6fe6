"""Real low-bit inference: `PackedLinear` keeps a weight packed in memory and multiplies through the
kernels (torch's int4/int8 ops or unpack-then-matmul on CPU, Triton on CUDA).

    model = pack_model(model, plan, db)         # the plan's linears become PackedLinear, in place
    model = load_packed("out/")                 # a `planner export --format packed` directory

The packed form comes straight from the levels DB (`QuantizedWeight`: codes, fp16 scales, integer
zeros), so a packed model computes the same numbers as the evaluator's fake-quant path up to the
activation dtype's rounding (bf16 scales inside torch's int4 op; summation order).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kernels.cpu import CpuKind, CpuWeight, prepare_cpu
from kernels.format import PackedWeight, pack
from planner.errors import BadPlan
from planner.levels.db import LevelsDB
from planner.levels.quant import QuantizedWeight
from planner.plan import Plan


def packed_from_quantized(qw: QuantizedWeight) -> PackedWeight:
    """The levels DB's form -> the runtime format (same codes, scales and zero points)."""
    zeros = None if qw.spec.symmetric else qw.zeros_unpacked()
    return pack(qw.codes_unpacked(), qw.scales, zeros, qw.spec.bits, qw.spec.group_width(qw.shape[1]))


class PackedLinear(nn.Module):
    """A bias-optional Linear whose weight stays packed: ``y = x @ W_hat^T + b``.

    On CPU it holds the CPU kernel form (see `kernels.cpu`), on CUDA the runtime format itself.
    `.to(device)` moves it; `.to(dtype)` changes nothing stored (scales stay fp16): outputs follow
    the input's dtype."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None, cpu_kind: CpuKind | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bits, self.group_size = weight.bits, weight.group_size
        self.cpu_kind = cpu_kind
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._set(weight)

    def _set(self, weight: PackedWeight) -> None:
        self._cuda: PackedWeight | None = weight if weight.qweight.is_cuda else None
        self._cpu: CpuWeight | None = None if self._cuda is not None else prepare_cpu(weight, self.cpu_kind)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       cpu_kind: CpuKind | None = None) -> PackedLinear:
        return cls(packed_from_quantized(qw), bias, cpu_kind)

    def packed(self) -> PackedWeight:
        return self._cuda if self._cuda is not None else self._cpu.to_packed()

    @property
    def kind(self) -> str:
        return "triton" if self._cuda is not None else self._cpu.kind.value

    @property
    def weight_nbytes(self) -> int:
        """Bytes the packed weight occupies in memory now (kernel form included)."""
        return self._cuda.nbytes if self._cuda is not None else self._cpu.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from kernels.reference import dequantize

        return dequantize(self._cuda, dtype) if self._cuda is not None else self._cpu.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cuda is not None:
            from kernels.triton_wq import wq_matmul

            y = wq_matmul(x, self._cuda)
        else:
            y = self._cpu.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):
        """Follow device moves only: a probe tensor tells where `fn` sends tensors."""
        super()._apply(fn, recurse)
        device = fn(torch.empty(0)).device
        current = torch.device("cuda") if self._cuda is not None else torch.device("cpu")
        if device.type != current.type:
            self._set(self.packed().to(device))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kind}, bias={self.bias is not None}")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, attr = name.rpartition(".")
    old = model.get_submodule(name)
    setattr(model.get_submodule(parent) if parent else model, attr, module)
    return old


def pack_model(model: nn.Module, plan: Plan, db: LevelsDB, cpu_kind: CpuKind | None = None) -> nn.Module:
    """Replace every linear the plan names by a PackedLinear at its planned level (in place; returns
    `model`). The replaced dense weights are dropped: memory really falls once nothing else holds them."""
    for name, level in plan.as_dict().items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise BadPlan(f"plan names {name!r}, which this model lacks: was it made for another model?") from None
        if not isinstance(old, nn.Linear):
            raise BadPlan(f"plan names {name!r}, a {type(old).__name__}, not a Linear")
        if name not in db.units or level not in {lv.id for lv in db.levels(name)}:
            raise BadPlan(f"the levels DB has no level {level!r} for {name!r}")
        new = PackedLinear.from_quantized(db.load(name, level), old.bias, cpu_kind)
        replace_module(model, name, new.to(old.weight.device))
    return model


def packed_modules(model: nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def load_packed(path: str | Path, dtype: torch.dtype = torch.bfloat16, cpu_kind: CpuKind | None = None) -> nn.Module:
    """A model from a packed export directory (`planner.export.packed`), its linears as PackedLinear."""
    from planner.export.packed import load_packed as load_export

    def build(qw: QuantizedWeight, old: nn.Linear, _dtype: torch.dtype) -> nn.Module:
        return PackedLinear.from_quantized(qw, old.bias, cpu_kind)

    return load_export(path, dtype=dtype, linear=build)
