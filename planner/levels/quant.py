"""The group-wise integer grid shared by every quantizing level builder (RTN, GPTQ).

Each row of a weight ``W[out, in]`` is cut along the input dim into groups of ``group_size``
columns (the last group may be shorter); each (row, group) has an fp16 scale and an integer
zero point:

    q     = clamp(round(w / scale) + zero, 0, 2**bits - 1)
    w_hat = scale * (q - zero)

The scale is rounded *up* to fp16 before any code is computed, so the codes are chosen
against the stored scale and `QuantizedWeight.dequantize` reproduces the solver's w_hat bit
for bit. Rounding up (not to nearest) keeps the whole min-max range on the grid, so the
error stays within scale/2 everywhere. Symmetric grids fix zero = 2**(bits-1) and do not
store it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from planner.levels.pack import pack_codes, packed_nbytes, unpack_codes

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantSpec:
    bits: int  # 1..8
    group_size: int  # columns per group along the input dim; <= 0 means one group per row
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be an int in 1..8, got {self.bits!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_width(self, in_features: int) -> int:
        """Columns per group for a matrix with ``in_features`` columns (last group may be shorter)."""
        return in_features if self.group_size <= 0 else self.group_size


def n_groups(in_features: int, group_size: int) -> int:
    """Groups per row: ceil(in / gs) with a ragged last group; one group if gs <= 0."""
    if group_size <= 0 or in_features == 0:
        return 1
    return -(-in_features // group_size)


def code_bits(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Nominal code bits: out * in * bits."""
    out, inp = shape
    return out * inp * spec.bits


def stored_bits(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Exact stored bits: codes + per group an fp16 scale and (asymmetric) a `bits`-bit zero point."""
    out, inp = shape
    per_group = 16 + (0 if spec.symmetric else spec.bits)
    return code_bits(shape, spec) + out * n_groups(inp, spec.group_size) * per_group


def _ceil_fp16(s: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= s (s >= 0, float64), returned as float32."""
    s = s.clamp(max=_FP16_MAX)
    h = s.half()
    # for positive fp16 numbers, bit pattern + 1 is the next larger value; this also lifts
    # scales that underflow fp16 to its smallest subnormal instead of 0
    h = (h.view(torch.int16) + (h.double() < s).to(torch.int16)).view(torch.float16)
    return h.float()


def grid_params(W_group: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid for one group of columns ``W_group[out, g]``: (scale, zero), both fp32 [out, 1].

    The range always includes 0 (so 0 and dead columns are exact); scale is fp16-representable.
    """
    W = W_group.double()
    xmin = W.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = W.max(dim=1, keepdim=True).values.clamp(min=0)
    if spec.symmetric:
        amax = torch.maximum(-xmin, xmax)
        s = 2 * amax / spec.maxq
    else:
        s = (xmax - xmin) / spec.maxq
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero group: any scale, code = zero
    scale = _ceil_fp16(s)
    if spec.symmetric:
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        zero = torch.round(-xmin.float() / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize_codes(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (uint8) of ``W`` on the grid (scale, zero broadcast against W)."""
    q = torch.round(W.float() / scale) + zero
    return q.clamp(0, spec.maxq).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = scale * (q - zero), in fp32 (scale, zero broadcast against codes)."""
    return scale.float() * (codes.float() - zero.float())


def _expand_groups(t: torch.Tensor, in_features: int, spec: QuantSpec) -> torch.Tensor:
    """[out, n_groups] -> [out, in]: each column gets its group's value."""
    return t.repeat_interleave(spec.group_width(in_features), dim=1)[:, :in_features]


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # packed uint8 bitstream of the [out, in] codes
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor  # packed uint8 bitstream of the [out, n_groups] zero points; empty if symmetric
    shape: tuple[int, int]
    spec: QuantSpec

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
    ) -> QuantizedWeight:
        """Pack unpacked codes [out, in], fp16-exact scales and integer zeros [out, n_groups]."""
        out, inp = codes.shape
        scales = scale.to(torch.float16)
        if not torch.equal(scales.float(), scale.float()):
            raise ValueError("scales must be exactly representable in float16")
        zeros = (
            torch.empty(0, dtype=torch.uint8) if spec.symmetric else pack_codes(zero.round().to(torch.int64), spec.bits)
        )
        return cls(pack_codes(codes, spec.bits), scales.contiguous(), zeros, (int(out), int(inp)), spec)

    def codes_unpacked(self) -> torch.Tensor:
        return unpack_codes(self.codes, self.spec.bits, self.shape)

    def zeros_unpacked(self) -> torch.Tensor:
        """Integer zero points as float32 [out, n_groups] (the fixed midpoint if symmetric)."""
        if self.spec.symmetric:
            return torch.full(self.scales.shape, float(2 ** (self.spec.bits - 1)))
        return unpack_codes(self.zeros, self.spec.bits, self.scales.shape).float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        inp = self.shape[1]
        scale = _expand_groups(self.scales.float(), inp, self.spec)
        zero = _expand_groups(self.zeros_unpacked(), inp, self.spec)
        return dequantize_codes(self.codes_unpacked(), scale, zero).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    @property
    def bpw(self) -> float:
        """Stored bits per weight, exact (without byte rounding of the bitstreams)."""
        return stored_bits(self.shape, self.spec) / (self.shape[0] * self.shape[1])

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors; ``meta`` = [out, in, bits, group_size, symmetric] (int64)."""
        meta = torch.tensor([*self.shape, self.spec.bits, self.spec.group_size, int(self.spec.symmetric)])
        return {
            f"{prefix}.codes": self.codes,
            f"{prefix}.scales": self.scales,
            f"{prefix}.zeros": self.zeros,
            f"{prefix}.meta": meta,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> QuantizedWeight:
        out, inp, bits, group_size, symmetric = (int(v) for v in tensors[f"{prefix}.meta"].tolist())
        spec = QuantSpec(bits=bits, group_size=group_size, symmetric=bool(symmetric))
        qw = cls(tensors[f"{prefix}.codes"], tensors[f"{prefix}.scales"], tensors[f"{prefix}.zeros"], (out, inp), spec)
        if qw.codes.numel() != packed_nbytes(out * inp, bits) or qw.scales.shape != (out, n_groups(inp, group_size)):
            raise ValueError(
                f"tensors under {prefix!r} do not match their meta {tuple(tensors[f'{prefix}.meta'].tolist())}"
            )
        return qw


def rtn_quantize(W: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest baseline: min-max grid per group, every weight rounded independently."""
    if W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"W must be a non-empty 2-D [out, in] matrix, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("W has non-finite values")
    W = W.float()
    gw = spec.group_width(W.shape[1])
    codes, scales, zeros = [], [], []
    for g0 in range(0, W.shape[1], gw):
        scale, zero = grid_params(W[:, g0 : g0 + gw], spec)
        codes.append(quantize_codes(W[:, g0 : g0 + gw], scale, zero, spec))
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight.from_codes(torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1), spec)
