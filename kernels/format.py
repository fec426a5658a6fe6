"""The runtime packing format of group-wise quantized weights (2, 3, 4 and 8 bits; any of 1..8 works).

A weight ``W[N, K]`` (out_features x in_features) is cut along the input dim K into groups of
``group_size`` columns; the last group may be shorter (ragged). Each (row, group) has a scale
and, if asymmetric, an integer zero point:

    w = scale * (q - zero)          q in [0, 2**bits), zero in [0, 2**bits) (symmetric: zero = 2**(bits-1))

Tensors (all row-major, rows = output features):

    qweight  int32 [N, bits * ceil(K / 32)]   codes packed along K
    scales   fp16 or bf16 [N, G]              G = ceil(K / group_size)
    zeros    uint8 [N, G]                     integer zero points; absent (None) if symmetric

Code packing. Each row is a little-endian bitstream: code k occupies bits [k*bits, (k+1)*bits),
bit j of the stream is bit (j % 32) of word j // 32. The row is padded with zero codes to a
multiple of 32 codes, so 32 codes always fill exactly ``bits`` words. For 2, 4 and 8 bits no code
crosses a word (16, 8, 4 codes per word). For 3 bits, 32 codes share 3 words and codes 10 and 21
of each block straddle two words (bits 30-32 and 63-65 of the 96-bit block); 5, 6 and 7 bits
(levels the planner also builds) follow the same rule with more straddling codes.

Exact bytes of one packed weight (no hidden padding besides the 32-code row padding):

    4 * N * bits * ceil(K / 32)  +  N * G * scale_bytes (2)  +  (asymmetric) N * G

Zero points are stored as one byte each (not `bits` bits): G is small (K / group_size) and a byte
is what the kernels read directly; the planner's own accounting (`bits` per zero) differs from
these runtime bytes by N * G * (8 - bits) / 8 bytes.

This module knows shapes and tensors only (kernels/ never imports planner): converters take
plain codes/scales/zeros tensors, as `planner.levels.quant.QuantizedWeight` holds them unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
CODES_PER_BLOCK = 32  # one block of 32 codes fills exactly `bits` int32 words


def n_words(in_features: int, bits: int) -> int:
    """int32 words per row."""
    return bits * -(-in_features // CODES_PER_BLOCK)


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def packed_nbytes(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool,
                  scale_bytes: int = 2) -> int:
    """Exact bytes of the three tensors of a packed weight."""
    g = n_groups(in_features, group_size)
    return 4 * out_features * n_words(in_features, bits) + out_features * g * (scale_bytes + (0 if symmetric else 1))


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [N, K] (0 <= q < 2**bits) -> int32 words [N, bits * ceil(K/32)]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    N, K = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    nblk = -(-K // CODES_PER_BLOCK)
    c = torch.nn.functional.pad(c, (0, nblk * CODES_PER_BLOCK - K)).view(N, nblk, CODES_PER_BLOCK)
    # each code's bit position inside its 96/64/128/256-bit block, then its word and shift
    pos = torch.arange(CODES_PER_BLOCK, device=c.device) * bits
    word, shift = pos // 32, pos % 32
    words = torch.zeros(N, nblk, bits, dtype=torch.int64, device=c.device)
    words.index_add_(2, word, c << shift)                    # low part (sums of disjoint bits = OR)
    spill = shift + bits > 32                                # 3-bit codes 10 and 21
    if spill.any():
        words.index_add_(2, word[spill] + 1, c[..., spill] >> (32 - shift[spill]))
    words = words & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.view(N, nblk * bits).to(torch.int32)


def unpack_words(words: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of `pack_words`: codes [N, in_features] in ``dtype`` (float32 saves a pass when dequantizing)."""
    N = words.shape[0]
    nblk = words.shape[1] // bits
    mask = 2**bits - 1
    if 32 % bits == 0:   # 1, 2, 4, 8 bits: no code crosses a word
        shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
        c = (words[..., None] >> shifts) & mask   # arithmetic shift is fine: the mask drops sign bits
    elif bits == 3:      # per 3 words: codes 0-10 start in word 0, 11-21 in word 1, 22-31 in word 2
        v = words.view(N, nblk, 3)
        shift = (torch.arange(CODES_PER_BLOCK, device=words.device, dtype=torch.int32) * 3) % 32
        c = torch.cat([v[..., 0:1] >> shift[:11], v[..., 1:2] >> shift[11:22], v[..., 2:3] >> shift[22:]], dim=-1)
        c &= mask
        c[..., 10] = (c[..., 10] & 3) | ((v[..., 1] & 1) << 2)      # bits 30, 31 | 32
        c[..., 21] = (c[..., 21] & 1) | ((v[..., 2] & 3) << 1)      # bit 63 | 64, 65
    else:                # 5, 6, 7 bits: read each code from the two bytes that hold it (offset + bits <= 15)
        b = words.contiguous().view(torch.uint8).view(N, nblk, 4 * bits).to(torch.int32)
        pos = torch.arange(CODES_PER_BLOCK, device=words.device) * bits
        lo, off = pos // 8, (pos % 8).to(torch.int32)
        hi = (lo + 1).clamp(max=4 * bits - 1)
        c = ((b[..., lo] | (b[..., hi] << 8)) >> off) & mask
    return c.reshape(N, nblk * CODES_PER_BLOCK)[:, :in_features].to(dtype)


@dataclass(frozen=True)
class PackedWeight:
    """One packed weight in the runtime format (see the module docstring)."""

    qweight: torch.Tensor            # int32 [N, bits * ceil(K/32)]
    scales: torch.Tensor             # fp16/bf16 [N, G]
    zeros: torch.Tensor | None       # uint8 [N, G], None if symmetric
    bits: int
    group_size: int                  # columns per group (the last one may be shorter)
    in_features: int

    def __post_init__(self) -> None:
        N, K = self.out_features, self.in_features
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.qweight.dtype != torch.int32 or tuple(self.qweight.shape) != (N, n_words(K, self.bits)):
            raise ValueError(f"qweight must be int32 [{N}, {n_words(K, self.bits)}], got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        G = n_groups(K, self.group_size)
        if self.scales.dtype not in (torch.float16, torch.bfloat16) or tuple(self.scales.shape) != (N, G):
            raise ValueError(f"scales must be fp16/bf16 [{N}, {G}], got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.zeros is not None and (self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != (N, G)):
            raise ValueError(f"zeros must be uint8 [{N}, {G}], got {self.zeros.dtype} {tuple(self.zeros.shape)}")

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def codes(self) -> torch.Tensor:
        """uint8 [N, K]."""
        return unpack_words(self.qweight, self.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        """Integer zero points as uint8 [N, G] (the fixed midpoint if symmetric)."""
        if self.zeros is None:
            return torch.full(self.scales.shape, 2 ** (self.bits - 1), dtype=torch.uint8, device=self.scales.device)
        return self.zeros

    def to(self, device: torch.device | str) -> PackedWeight:
        z = None if self.zeros is None else self.zeros.to(device)
        return PackedWeight(self.qweight.to(device), self.scales.to(device), z, self.bits, self.group_size,
                            self.in_features)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors; ``meta`` = [N, K, bits, group_size, symmetric] (int64)."""
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales,
               f"{prefix}.meta": torch.tensor([*self.shape, self.bits, self.group_size, int(self.symmetric)])}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> PackedWeight:
        _, K, bits, gs, sym = (int(v) for v in tensors[f"{prefix}.meta"].tolist())
        zeros = None if sym else tensors[f"{prefix}.zeros"]
        return cls(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scales"], zeros, bits, gs, K)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
         group_size: int) -> PackedWeight:
    """Pack plain tensors: integer codes [N, K], scales [N, G] (fp16/bf16, or fp32 holding fp16 values),
    integer zero points [N, G] (any numeric dtype, integral values) or None for a symmetric grid.
    ``group_size <= 0`` means one group per row."""
    N, K = codes.shape
    gs = K if group_size <= 0 else int(group_size)
    if scales.dtype not in (torch.float16, torch.bfloat16):
        half = scales.to(torch.float16)
        if not torch.equal(half.float(), scales.float()):
            raise ValueError("scales must be fp16/bf16 or exactly representable in fp16")
        scales = half
    z = None
    if zeros is not None:
        zf = zeros.float()
        if not torch.equal(zf, zf.round()) or (zf.numel() and (float(zf.min()) < 0 or float(zf.max()) >= 2**bits)):
            raise ValueError(f"zero points must be integers in [0, {2**bits})")
        z = zf.to(torch.uint8).contiguous()
    # a copy: scales read from a memory-mapped file (safetensors) must not keep the whole file mapped
    return PackedWeight(pack_words(codes, bits), scales.contiguous().clone(), z, int(bits), gs, int(K))
