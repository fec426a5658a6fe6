"""CPU weight-only matmul for packed weights; the weights stay packed in memory.

Three forms, chosen per weight by `prepare_cpu` (see `CpuKind`):

- INT4PACK (4 bits, N % 16 == 0, a torch group size that tiles our groups; on request also 1-3
  bit codes, widened to 4 bits: faster, at 4 bits of memory per weight): torch's
  ``_weight_int4pack_mm_for_cpu``. Its convention (measured in torch 2.13) is
  ``w = (q - 8) * scale + zero_f`` with ``scale`` and ``zero_f`` in one
  ``[K / qgs, N, 2]`` tensor of the activation dtype, qgs in {32, 64, 128, 256}. Ours is
  ``w = scale * (q - z)`` with an integer z, so ``zero_f = scale * (8 - z)``: exact in fp32,
  rounded to bf16 for bf16 activations (the op wants scales in the activation dtype). A ragged
  last group is served by a smaller qgs that divides both the group size and K (576 columns in
  groups of 128 -> qgs 64, each scale repeated per 64 columns). The codes live in torch's
  blocked nibble layout (N/BN blocks x K x BN/2 bytes, BN = 64/32/16); `_int4pack_codes` reads it
  back for prefill and for saving.
- INT8PACK (8 bits, every group's width a multiple of 16): torch's per-channel
  ``_weight_int8pack_mm`` once per group on the codes shifted to int8 (q - 128), plus a rank-G
  correction for the zero points:
  ``y = sum_g x_g @ (s_g (q_g - 128))^T - sum_g (sum_k x_g) s_g (z_g - 128)``.
  (torch 2.13's bf16 kernel crashes for more than one row when K % 16 != 0, hence the rule.)
- UNPACK (2 and 3 bits, and any weight the torch ops do not take): the runtime format itself,
  dequantized on every call, then a dense matmul.

Torch's int4/int8 ops are fast for a few rows (decode) and slow for many (int4 at 512 rows: 2.8x a
bf16 matmul, measured on 1536x576 with one thread); beyond `INT4_OP_MAX_ROWS` / `INT8_OP_MAX_ROWS`
rows (the measured crossovers) every form dequantizes the whole weight into a temporary and runs
one dense matmul.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.format import PackedWeight, pack, unpack_words

INT4_OP_MAX_ROWS = 96
INT8_OP_MAX_ROWS = 12
INT4_GROUP_SIZES = (256, 128, 64, 32)


class CpuKind(enum.Enum):
    INT4PACK = "int4pack"
    INT8PACK = "int8pack"
    UNPACK = "unpack"


def _group_dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """scale * (q - z) per group, in fp32 in place, then one cast; no [N, K] scale/zero expansion."""
    N, K = codes.shape
    w = codes if codes.dtype == torch.float32 and codes.is_contiguous() else codes.to(torch.float32).contiguous()
    s, z = scales.float(), zeros.float()
    full = K // group_size
    if full:
        w[:, :full * group_size].view(N, full, group_size).sub_(z[:, :full, None]).mul_(s[:, :full, None])
    if full * group_size < K:
        w[:, full * group_size:].sub_(z[:, full:]).mul_(s[:, full:])
    return w.to(dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@dataclass
class UnpackWeight:
    packed: PackedWeight
    kind: CpuKind = CpuKind.UNPACK

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        p = self.packed
        codes = unpack_words(p.qweight, p.bits, p.in_features, torch.float32)
        return _group_dequant(codes, p.scales, p.zero_points(), p.group_size, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def to_packed(self) -> PackedWeight:
        return self.packed

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


def int4_group_size(pw: PackedWeight) -> int | None:
    """The torch int4 group size that serves this weight, or None if the int4 op does not apply."""
    N, K = pw.shape
    if pw.bits > 4 or N % 16:
        return None
    return next((q for q in INT4_GROUP_SIZES if pw.group_size % q == 0 and K % q == 0), None)


def int8_applies(pw: PackedWeight) -> bool:
    return pw.bits == 8 and pw.in_features % 16 == 0 and pw.group_size % 16 == 0


def _int4pack_block(N: int) -> int:
    return 64 if N % 64 == 0 else 32 if N % 32 == 0 else 16


def _int4pack_codes(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Codes [N, K] (uint8) back from torch's CPU int4 layout: for each block of BN rows and each k,
    BN/2 bytes; BN = 64 pairs row i with row i + 32 (low, high nibble), BN = 32/16 pair rows 2i, 2i+1."""
    bn = _int4pack_block(N)
    b = packed.reshape(N // bn, K, bn // 2)
    lo, hi = b & 15, b >> 4
    rows = torch.cat([lo, hi], dim=2) if bn == 64 else torch.stack([lo, hi], dim=3).reshape(N // bn, K, bn)
    return rows.permute(0, 2, 1).reshape(N, K)


@dataclass
class Int4Weight:
    packed: torch.Tensor          # uint8 [N, K/2], torch's CPU int4 layout
    scales: torch.Tensor          # fp16 [N, G] (ours, kept for dequantize / saving: small)
    zeros: torch.Tensor           # uint8 [N, G]
    group_size: int
    qgs: int                      # torch's group size, divides group_size and K
    symmetric: bool
    bits: int = 4                 # the codes' own width (< 4: widened, exactly: w = s * (q - z) either way)
    kind: CpuKind = CpuKind.INT4PACK
    _sz: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_packed(cls, pw: PackedWeight, qgs: int) -> Int4Weight:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(pw.codes().to(torch.int32), 1)
        return cls(packed, pw.scales, pw.zero_points(), pw.group_size, qgs, pw.symmetric, pw.bits)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.packed.shape[0]), 2 * int(self.packed.shape[1])

    def scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """[K / qgs, N, 2] in ``dtype``: per torch group, scale and zero_f = scale * (8 - z)."""
        if dtype not in self._sz:
            N, K = self.shape
            s = self.scales.float().repeat_interleave(self.group_size // self.qgs, dim=1)[:, :K // self.qgs]
            z = self.zeros.float().repeat_interleave(self.group_size // self.qgs, dim=1)[:, :K // self.qgs]
            self._sz[dtype] = torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous().to(dtype)
        return self._sz[dtype]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        N, K = self.shape
        return _group_dequant(_int4pack_codes(self.packed, N, K), self.scales, self.zeros, self.group_size, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        if x2.shape[0] > INT4_OP_MAX_ROWS or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return F.linear(x, self.dequantize(x.dtype))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.qgs,
                                                        self.scales_and_zeros(x.dtype))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def to_packed(self) -> PackedWeight:
        N, K = self.shape
        zeros = None if self.symmetric else self.zeros
        return pack(_int4pack_codes(self.packed, N, K), self.scales, zeros, self.bits, self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros, *self._sz.values()))


@dataclass
class Int8Weight:
    slices: list[torch.Tensor]    # int8 [N, g] per group (q - 128), contiguous as the op wants
    scales: torch.Tensor          # fp16 [N, G]
    zeros: torch.Tensor           # uint8 [N, G]
    group_size: int
    symmetric: bool
    kind: CpuKind = CpuKind.INT8PACK
    _act: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_packed(cls, pw: PackedWeight) -> Int8Weight:
        q = (pw.codes().to(torch.int16) - 128).to(torch.int8)
        slices = [s.contiguous() for s in q.split(pw.group_size, dim=1)]
        return cls(slices, pw.scales, pw.zero_points(), pw.group_size, pw.symmetric)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.scales.shape[0]), sum(int(s.shape[1]) for s in self.slices)

    def _scales(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per group scales [N] in ``dtype``, and the zero correction s * (z - 128) as fp32 [G, N]."""
        if dtype not in self._act:
            s = self.scales.float()
            self._act[dtype] = ([c.contiguous() for c in s.to(dtype).t()],
                                (s * (self.zeros.float() - 128)).t().contiguous())
        return self._act[dtype]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        codes = (torch.cat(self.slices, dim=1).to(torch.int16) + 128).to(torch.uint8)
        return _group_dequant(codes, self.scales, self.zeros, self.group_size, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        if x2.shape[0] > INT8_OP_MAX_ROWS or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return F.linear(x, self.dequantize(x.dtype))
        s, zc = self._scales(x.dtype)
        parts = x2.split(self.group_size, dim=1)
        y = torch.zeros(x2.shape[0], zc.shape[1], dtype=torch.float32)
        for xg, qg, sg in zip(parts, self.slices, s, strict=True):
            y += torch.ops.aten._weight_int8pack_mm(xg.contiguous(), qg, sg).float()
        xsum = torch.stack([xg.float().sum(1) for xg in parts], dim=1)   # [M, G]
        y -= xsum @ zc
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])

    def to_packed(self) -> PackedWeight:
        codes = (torch.cat(self.slices, dim=1).to(torch.int16) + 128).to(torch.uint8)
        return pack(codes, self.scales, None if self.symmetric else self.zeros, 8, self.group_size)

    @property
    def nbytes(self) -> int:
        acts = [t for s, zc in self._act.values() for t in (*s, zc)]
        return sum(t.numel() * t.element_size() for t in (*self.slices, self.scales, self.zeros, *acts))


CpuWeight = UnpackWeight | Int4Weight | Int8Weight


def prepare_cpu(pw: PackedWeight, kind: CpuKind | None = None) -> CpuWeight:
    """The CPU form of a packed weight: torch's int4/int8 ops where they apply, else unpack-then-matmul.
    ``kind`` forces one form (UNPACK always applies)."""
    pw = pw.to("cpu")
    qgs = int4_group_size(pw)
    if kind is None:
        kind = CpuKind.INT4PACK if qgs and pw.bits == 4 else CpuKind.INT8PACK if int8_applies(pw) else CpuKind.UNPACK
    if kind is CpuKind.INT4PACK:
        if qgs is None:
            raise ValueError(f"torch's int4 op does not take a {pw.bits}-bit {pw.shape} weight in groups of "
                             f"{pw.group_size}")
        return Int4Weight.from_packed(pw, qgs)
    if kind is CpuKind.INT8PACK:
        if not int8_applies(pw):
            raise ValueError(f"torch's int8 op does not take a {pw.bits}-bit {pw.shape} weight in groups of "
                             f"{pw.group_size}")
        return Int8Weight.from_packed(pw)
    return UnpackWeight(pw)


def cpu_matmul(x: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    return w.matmul(x)


__all__ = ["CpuKind", "CpuWeight", "INT4_OP_MAX_ROWS", "INT8_OP_MAX_ROWS", "Int4Weight", "Int8Weight", "UnpackWeight", "cpu_matmul",
           "int4_group_size", "int8_applies", "prepare_cpu"]
