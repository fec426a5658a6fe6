"""Real low-bit inference: `PackedLinear` keeps a weight packed in memory and multiplies through the
kernels (torch's int4/int8 ops or unpack-then-matmul on CPU, Triton on CUDA).

    model = pack_model(model, plan, db)         # the plan's linears become PackedLinear, in place
    model = load_packed("out/")                 # a `planner export --format packed` directory

The packed form comes straight from the levels DB (`QuantizedWeight`: codes, fp16 scales, integer
zeros), so a packed model computes the same numbers as the evaluator's fake-quant path up to the
activation dtype's rounding (bf16 scales inside torch's int4 op; summation order).

Other level kinds (`runtime_linear` decides, per layer):

    kernel    a level whose values are an integer grid with fp16 scales and integer zero points is
              converted exactly (`kernel_form`) and runs as a PackedLinear: format levels `intB-gG-sym`
              with fp16 scales, gguf levels stored as Q4_0 / Q5_0 / Q8_0 (scale d, zero 2**(bits-1))
    dequant   any other level (nf / iq4nl / k-means grids, super-block scales, Q4_1, K-quants, sparse
              levels, ...) has no packed kernel here: a `DequantLinear` keeps the level's stored payload
              (its packed bytes, exactly as in the levels DB) and dequantizes it at every forward; no
              dense weight is kept between calls, and its repr says `kernel=dequant-per-forward`
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kernels.cpu import CpuKind, CpuWeight, prepare_cpu
from kernels.format import PackedWeight, pack
from planner.errors import BadPlan
from planner.levels.db import LevelsDB
from planner.levels.formats import FormatWeight, format_id
from planner.levels.gguf_levels import GGUFWeight, block_of
from planner.levels.grids import Grid
from planner.levels.quant import QuantizedWeight, QuantSpec
from planner.levels.registry import Stored
from planner.plan import Plan


def packed_from_quantized(qw: QuantizedWeight) -> PackedWeight:
    """The levels DB's form -> the runtime format (same codes, scales and zero points)."""
    zeros = None if qw.spec.symmetric else qw.zeros_unpacked()
    return pack(qw.codes_unpacked(), qw.scales, zeros, qw.spec.bits, qw.spec.group_width(qw.shape[1]))


_GGUF_INTEGER = {"Q4_0": 4, "Q5_0": 5, "Q8_0": 8}   # w = d * (q - 2**(bits-1)), fp16 d at the start of each block


def _gguf_as_quantized(gw: GGUFWeight) -> QuantizedWeight | None:
    bits = _GGUF_INTEGER.get(gw.gguf_type)
    if bits is None:
        return None
    (out, inp), (bs, ts) = gw.shape, block_of(gw.gguf_type)
    d = gw.blocks.reshape(out, inp // bs, ts)[:, :, :2].contiguous().view(torch.float16).reshape(out, -1)
    w = gw.dequantize(torch.float32)
    scale = d.float().repeat_interleave(bs, dim=1)
    half = 2 ** (bits - 1)
    # w = fp32(d * (q - half)) holds the integer q - half exactly (<= 8 bits times an fp16 value)
    q = torch.where(scale == 0, torch.zeros_like(w), w / torch.where(scale == 0, torch.ones_like(scale), scale))
    codes = (q.round() + half).clamp(0, 2**bits - 1).to(torch.uint8)
    return QuantizedWeight.from_codes(codes, d.float(), torch.full(d.shape, float(half)), QuantSpec(bits, bs, True))


def kernel_form(stored: Stored) -> QuantizedWeight | None:
    """The level as the kernels' integer grid, exactly (its dequantized weight is bit-identical), or
    None when its values are no integer grid with fp16 scales and integer zero points."""
    if isinstance(stored, QuantizedWeight):
        return stored
    if isinstance(stored, FormatWeight):
        f = stored.fmt
        if f.grid is not Grid.INT or not f.symmetric or f.double or stored.colscale.numel():
            return None
        qw = QuantizedWeight(stored.codes, stored.scales, torch.empty(0, dtype=torch.uint8), stored.shape,
                             QuantSpec(f.bits, f.group_size, True))
    elif isinstance(stored, GGUFWeight):
        qw = _gguf_as_quantized(stored)
    else:
        return None
    return qw if qw is not None and torch.equal(qw.dequantize(), stored.dequantize()) else None


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


def stored_format(stored: Stored) -> str | None:
    """The name of a stored level's layout independent of how its values were chosen ("gguf Q4_K" as
    stored, after any fallback; "format nf4-g32" without the rounding), None for kinds without one."""
    if isinstance(stored, GGUFWeight):
        return f"gguf {stored.gguf_type}"
    if isinstance(stored, FormatWeight):
        return f"format {format_id(stored.fmt)}"
    return None


def describe(stored: Stored) -> str:
    """A short name of a stored level's kind, for reprs where the level id is not known."""
    return stored_format(stored) or type(stored).__name__


class DequantLinear(nn.Module):
    """A Linear for levels without a packed kernel: ``y = x @ dequantize(stored)^T + b``.

    Holds the level's stored payload (the levels DB's tensors; on the CPU whatever the module's
    device) and dequantizes it at every forward, in the input's dtype, onto the input's device: the
    same numbers as the evaluator's dequantized weights, without a dense copy kept in memory (slower
    than a kernel: the point is memory and exactness, not speed)."""

    kind = "dequant"

    def __init__(self, stored: Stored, bias: torch.Tensor | None = None, level: str = ""):
        super().__init__()
        self.stored = stored
        self.out_features, self.in_features = stored.shape
        self.level = level or describe(stored)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def bits(self) -> int | None:
        fmt = getattr(self.stored, "fmt", None) or getattr(self.stored, "spec", None)
        return getattr(fmt, "bits", None)

    @property
    def weight_nbytes(self) -> int:
        """Bytes the stored payload occupies (no dense weight is kept)."""
        return sum(t.numel() * t.element_size() for t in self.stored.to_tensors("w").values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.stored.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.stored.dequantize(x.dtype).to(x.device)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, level={self.level}, "
                f"kernel=dequant-per-forward (payload {self.weight_nbytes} bytes, no dense weight kept), "
                f"bias={self.bias is not None}")


def runtime_linear(stored: Stored, bias: torch.Tensor | None = None, cpu_kind: CpuKind | None = None,
                   level: str = "") -> PackedLinear | DequantLinear:
    """The runtime module of one stored level: a PackedLinear when `kernel_form` converts it exactly,
    else a DequantLinear (documented above)."""
    qw = kernel_form(stored)
    return PackedLinear.from_quantized(qw, bias, cpu_kind) if qw is not None else DequantLinear(stored, bias, level)


def scheme(spec: QuantSpec) -> str:
    """What decides a packed kernel's speed and bytes: bits, group size, symmetry (not how the codes
    were chosen, so a GPTQ, an RTN, an int-sym format and a GGUF Q4_0 level can share it)."""
    return f"b{spec.bits}-g{max(spec.group_size, 0)}-{'sym' if spec.symmetric else 'asym'}"


def runtime_kind(stored: Stored, level: str) -> str:
    """The kind of the module `runtime_linear` builds for a stored level, as far as its time and bytes
    go: the kernel's `scheme` for a PackedLinear, `dequant:<stored format>` for a DequantLinear (the
    level id for kinds without a format name, e.g. sparse levels). The latency table keys rows by it."""
    qw = kernel_form(stored)
    return scheme(qw.spec) if qw is not None else f"dequant:{stored_format(stored) or level}"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, attr = name.rpartition(".")
    old = model.get_submodule(name)
    setattr(model.get_submodule(parent) if parent else model, attr, module)
    return old


def pack_model(model: nn.Module, plan: Plan, db: LevelsDB, cpu_kind: CpuKind | None = None) -> nn.Module:
    """Replace every linear the plan names by its runtime module at its planned level (`runtime_linear`;
    in place; returns `model`). The replaced dense weights are dropped: memory really falls once nothing
    else holds them."""
    for name, level in plan.as_dict().items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise BadPlan(f"plan names {name!r}, which this model lacks: was it made for another model?") from None
        if not isinstance(old, nn.Linear):
            raise BadPlan(f"plan names {name!r}, a {type(old).__name__}, not a Linear")
        if name not in db.units or level not in {lv.id for lv in db.levels(name)}:
            raise BadPlan(f"the levels DB has no level {level!r} for {name!r}")
        new = runtime_linear(db.load(name, level), old.bias, cpu_kind, level)
        replace_module(model, name, new.to(old.weight.device))
    return model


def packed_modules(model: nn.Module) -> dict[str, PackedLinear | DequantLinear]:
    """The model's runtime modules (packed kernels and dequantize-per-forward layers)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear | DequantLinear)}


def load_packed(path: str | Path, dtype: torch.dtype = torch.bfloat16, cpu_kind: CpuKind | None = None) -> nn.Module:
    """A model from a packed export directory (`planner.export.packed`), its linears as runtime modules
    (`runtime_linear`: PackedLinear, or DequantLinear for levels without a kernel)."""
    from planner.export.packed import load_packed as load_export

    def build(stored: Stored, old: nn.Linear, _dtype: torch.dtype) -> nn.Module:
        return runtime_linear(stored, old.bias, cpu_kind)

    return load_export(path, dtype=dtype, linear=build)
