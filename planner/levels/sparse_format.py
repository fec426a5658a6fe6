"""Sparse patterns and the stored form of a sparse (optionally quantized) weight, with exact costs.

A weight ``W[out, in]`` keeps ``kept(shape)`` of its entries; the rest are zero and not stored.
What is stored (row-major order everywhere, bitstreams as in `pack.py`):

    dense (sparsity 0)      values only
    unstructured (s > 0)    mask: 1 bit per weight (1 = kept), then the kept values
    N:M (keep n of every    index: ceil(log2 m) bits per kept value = its column within its group
         m consecutive      of m (the groups of a row, ascending), then the kept values. A ragged
         columns of a row)  last group of r < m columns keeps min(n, r).

Kept values are fp16 (`bits` 0), or integer codes of `bits` bits on the group-wise grid of
`quant.py` (one fp16 scale, and a `bits`-bit zero point unless symmetric, per row and group of
`group_size` columns; the grid covers every group even where most of it is pruned).

    code_bits   = kept * (16 if fp16 else bits)           nominal bits of the kept values
    stored_bits = positions + kept values + scales/zeros  everything the format writes

Unstructured counts are exact functions of the shape. A level with sparsity s and weight offset
d (EvoPress's fixed-size steps: d = k x step_weights, see sparse.py) prunes weights at the rate
``rate = clamp(s * out + d / in, 0, out)`` per column, ``P(c) = floor(rate * c + 1/2)`` in the
first c columns, so ``P(in) = floor(s * out * in + 1/2) + d`` in all (clamped to [0, out * in];
s as the exact decimal given). Solvers that choose a mask block by block prune ``P(c2) - P(c1)``
in columns [c1, c2); row-wise ones prune ``R(r + 1) - R(r)`` in row r, ``R(r) = floor(rate * in /
out * r + 1/2)``. With d = 0 and 0 < s, the level stores a mask; a level that prunes nothing does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from planner.levels.pack import pack_codes, packed_nbytes, unpack_codes
from planner.levels.quant import QuantSpec, _expand_groups, dequantize_codes, n_groups


def exact(s: float) -> Fraction:
    """The sparsity as the exact decimal the user wrote (0.6 -> 3/5, not the nearest double)."""
    return Fraction(repr(float(s)))


def round_half_up(q: Fraction) -> int:
    return math.floor(q + Fraction(1, 2))


@dataclass(frozen=True)
class Pattern:
    """Which weights are kept: unstructured at `sparsity`, or N:M (keep `n` of every `m`)."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0
    offset: int = 0      # weights pruned beyond round(sparsity * numel) (negative: fewer); unstructured only

    def __post_init__(self) -> None:
        if self.m:
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 1 <= self.n < self.m <= 256):
                raise ValueError(f"N:M needs integers 1 <= n < m <= 256, got {self.n}:{self.m}")
            if self.offset:
                raise ValueError("an N:M pattern takes no weight offset")
        elif not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def id(self) -> str:
        if self.is_nm:
            return f"{self.n}of{self.m}"
        return f"s{float(exact(self.sparsity) * 100):g}" + (f"{self.offset:+d}w" if self.offset else "")

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.m))) if self.is_nm else 0

    def rate(self, shape: tuple[int, int]) -> Fraction:
        """Unstructured: weights pruned per column (over all rows), clamped to [0, out]."""
        out, inp = shape
        return min(max(exact(self.sparsity) * out + Fraction(self.offset, inp), Fraction(0)), Fraction(out))

    def pruned_before(self, shape: tuple[int, int], cols: int) -> int:
        """Unstructured: weights pruned among the first `cols` columns, P(cols)."""
        return round_half_up(self.rate(shape) * cols)

    def kept(self, shape: tuple[int, int]) -> int:
        out, inp = shape
        if self.is_nm:
            full, tail = divmod(inp, self.m)
            return out * (full * self.n + min(self.n, tail))
        return out * inp - self.pruned_before(shape, inp)

    def position_bits(self, shape: tuple[int, int]) -> int:
        if self.is_nm:
            return self.kept(shape) * self.index_bits
        return 0 if self.kept(shape) == shape[0] * shape[1] else shape[0] * shape[1]

    def to_json(self) -> dict:
        if self.is_nm:
            return {"nm": f"{self.n}:{self.m}"}
        return {"sparsity": self.sparsity, **({"offset": self.offset} if self.offset else {})}


def _value_bits(shape: tuple[int, int], kept: int, quant: QuantSpec | None) -> int:
    if quant is None:
        return 16 * kept
    per_group = 16 + (0 if quant.symmetric else quant.bits)
    return quant.bits * kept + shape[0] * n_groups(shape[1], quant.group_size) * per_group


def code_bits(shape: tuple[int, int], pattern: Pattern, quant: QuantSpec | None) -> int:
    return pattern.kept(shape) * (16 if quant is None else quant.bits)


def stored_bits(shape: tuple[int, int], pattern: Pattern, quant: QuantSpec | None) -> int:
    return pattern.position_bits(shape) + _value_bits(shape, pattern.kept(shape), quant)


def nbytes(shape: tuple[int, int], pattern: Pattern, quant: QuantSpec | None) -> int:
    """Bytes as written: each bitstream rounded up to whole bytes."""
    kept = pattern.kept(shape)
    pos = packed_nbytes(pattern.position_bits(shape), 1)
    if quant is None:
        return pos + 2 * kept
    groups = shape[0] * n_groups(shape[1], quant.group_size)
    zeros = 0 if quant.symmetric else packed_nbytes(groups, quant.bits)
    return pos + packed_nbytes(kept, quant.bits) + 2 * groups + zeros


# --- masks <-> positions ------------------------------------------------------------------------
def nm_groups(inp: int, m: int) -> torch.Tensor:
    """Column -> N:M group index within a row."""
    return torch.arange(inp) // m


def check_mask(keep: torch.Tensor, pattern: Pattern) -> None:
    """ValueError unless `keep` [out, in] is a valid mask of `pattern` with its exact count."""
    shape = tuple(keep.shape)
    if int(keep.sum()) != pattern.kept(shape):
        raise ValueError(f"mask keeps {int(keep.sum())} weights, pattern {pattern.id} keeps {pattern.kept(shape)}")
    if pattern.is_nm:
        out, inp = shape
        per = torch.zeros(out, -(-inp // pattern.m), dtype=torch.int64)
        per.index_add_(1, nm_groups(inp, pattern.m), keep.to(torch.int64))
        sizes = torch.bincount(nm_groups(inp, pattern.m))
        if not torch.equal(per, torch.minimum(sizes, torch.tensor(pattern.n)).expand_as(per)):
            raise ValueError(f"mask is not {pattern.n}:{pattern.m}: some group keeps another count")


def _encode_positions(keep: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    if pattern.is_nm:
        cols = keep.nonzero()[:, 1]                     # row-major, ascending within each row
        return pack_codes(cols % pattern.m, pattern.index_bits)
    if pattern.position_bits(tuple(keep.shape)) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return pack_codes(keep.to(torch.uint8), 1)


def _decode_positions(positions: torch.Tensor, pattern: Pattern, shape: tuple[int, int]) -> torch.Tensor:
    out, inp = shape
    if not pattern.is_nm:
        if pattern.position_bits(shape) == 0:
            return torch.ones(shape, dtype=torch.bool)
        return unpack_codes(positions, 1, shape).bool()
    idx = unpack_codes(positions, pattern.index_bits, (pattern.kept(shape),)).to(torch.int64)
    per_group = torch.minimum(torch.bincount(nm_groups(inp, pattern.m)), torch.tensor(pattern.n))
    group_of_kept = torch.repeat_interleave(torch.arange(len(per_group)), per_group)   # one row's kept values
    cols = (group_of_kept.repeat(out) * pattern.m + idx).clamp(max=inp - 1)
    rows = torch.arange(out).repeat_interleave(len(group_of_kept))
    keep = torch.zeros(shape, dtype=torch.bool)
    keep[rows, cols] = True
    return keep


@dataclass
class SparseWeight:
    """The stored form: positions (mask or N:M indices), kept values (fp16 or codes), grid."""

    shape: tuple[int, int]
    pattern: Pattern
    quant: QuantSpec | None
    positions: torch.Tensor      # uint8 bitstream (empty when dense)
    values: torch.Tensor         # fp16 [kept], or the packed bitstream of the kept codes
    scales: torch.Tensor         # fp16 [out, n_groups] (quantized values) or empty
    zeros: torch.Tensor          # packed zero points (asymmetric grid) or empty

    @classmethod
    def from_dense(cls, W_hat: torch.Tensor, keep: torch.Tensor, pattern: Pattern) -> SparseWeight:
        """fp16 values: `W_hat` must already be fp16-exact where kept."""
        check_mask(keep, pattern)
        vals = W_hat[keep].to(torch.float16)
        return cls(tuple(W_hat.shape), pattern, None, _encode_positions(keep, pattern), vals.contiguous(),
                   torch.empty(0, dtype=torch.float16), torch.empty(0, dtype=torch.uint8))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, keep: torch.Tensor,
                   pattern: Pattern, quant: QuantSpec) -> SparseWeight:
        """Quantized values: codes [out, in] (only kept ones are stored), grid [out, n_groups]."""
        check_mask(keep, pattern)
        scales = scale.to(torch.float16)
        zeros = torch.empty(0, dtype=torch.uint8) if quant.symmetric else pack_codes(zero.round().to(torch.int64), quant.bits)
        return cls(tuple(codes.shape), pattern, quant, _encode_positions(keep, pattern),
                   pack_codes(codes[keep], quant.bits), scales.contiguous(), zeros)

    def mask(self) -> torch.Tensor:
        return _decode_positions(self.positions, self.pattern, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        keep = self.mask()
        W = torch.zeros(self.shape, dtype=torch.float32)
        if self.quant is None:
            W[keep] = self.values.float()
            return W.to(dtype)
        q, inp = self.quant, self.shape[1]
        codes = unpack_codes(self.values, q.bits, (self.pattern.kept(self.shape),))
        zero = (torch.full(self.scales.shape, float(2 ** (q.bits - 1))) if q.symmetric
                else unpack_codes(self.zeros, q.bits, self.scales.shape).float())
        scale = _expand_groups(self.scales.float(), inp, q)[keep]
        W[keep] = dequantize_codes(codes, scale, _expand_groups(zero, inp, q)[keep])
        return W.to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.positions, self.values, self.scales, self.zeros))

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """meta = [out, in, n, m, sparsity numerator, denominator, bits (0: fp16), group_size, symmetric,
        offset] (files without the offset hold 0)."""
        s = exact(self.pattern.sparsity)
        q = self.quant
        meta = torch.tensor([*self.shape, self.pattern.n, self.pattern.m, s.numerator, s.denominator,
                             q.bits if q else 0, q.group_size if q else 0, int(q.symmetric) if q else 0,
                             self.pattern.offset])
        return {f"{prefix}.positions": self.positions, f"{prefix}.values": self.values,
                f"{prefix}.scales": self.scales, f"{prefix}.zeros": self.zeros, f"{prefix}.meta": meta}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> SparseWeight:
        out, inp, n, m, num, den, bits, gs, sym, *offset = (int(v) for v in tensors[f"{prefix}.meta"].tolist())
        pattern = Pattern(sparsity=float(Fraction(num, den)), n=n, m=m, offset=offset[0] if offset else 0)
        quant = QuantSpec(bits, gs, bool(sym)) if bits else None
        sw = cls((out, inp), pattern, quant, *(tensors[f"{prefix}.{k}"] for k in ("positions", "values", "scales", "zeros")))
        want = nbytes((out, inp), pattern, quant)
        if sw.nbytes != want:
            raise ValueError(f"tensors under {prefix!r} hold {sw.nbytes} bytes, their meta says {want}")
        return sw
