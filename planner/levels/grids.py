"""Weight formats: what is stored per weight, per group and per super-block, and how it decodes.

A format cuts each row of ``W[out, in]`` into groups of ``group_size`` columns (the last group may
be shorter). Every weight is a ``bits``-bit code q into a value table v; every group has a scale s
and, if asymmetric, a min m:

    w_hat = s * v[q] - m

Value tables (`Grid`):
    int     v = q - 2**(bits-1) (symmetric) or v = q (asymmetric): the uniform grid
    nf      normal-float: quantiles of N(0, 1) with an exact zero (QLoRA's NF4 for any bits)
    iq4nl   llama.cpp's non-uniform 4-bit table of IQ4_NL / IQ4_XS
    km      a k-means codebook learned per tensor: 2**bits fp16 values stored with the level

Scales are stored as fp16 per group (``scale_bits`` 16; s and m are fp16 numbers), or quantized
in a second level (double quantization, the K-quant super-block): ``super_groups`` consecutive
groups of a row share an fp16 super-scale d (and super-min dmin), and each group stores a
``scale_bits``-bit code c:

    symmetric   s = d * (c - 2**(scale_bits-1))         signed, as Q3_K / Q6_K / IQ4_XS
    asymmetric  s = d * c,   m = dmin * c_m             unsigned, as Q2_K / Q4_K / Q5_K

Decoding computes s and m in float32 first and then ``s * v - m``: the operation order of
llama.cpp's (and gguf-py's) dequantizers, so a level in a GGUF layout decodes bit for bit alike.
Fitting (which s, m; weighted by an importance per input column) and code assignment (nearest
table value) live here too; the rounding strategies that drive them are in `formats.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from statistics import NormalDist

import torch

from planner.levels.pack import packed_nbytes
from planner.levels.quant import n_groups

_FP16_MAX = 65504.0
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_NF_OFFSET = 0.9677083  # QLoRA's: the outermost quantile, so that +-1 are the extreme values


class Grid(str, enum.Enum):
    INT = "int"
    NF = "nf"
    IQ4NL = "iq4nl"
    KMEANS = "km"


def nf_table(bits: int) -> torch.Tensor:
    """Normal-float values (float64, ascending, in [-1, 1], with 0): 2**(bits-1) positive quantiles,
    2**(bits-1) - 1 negative ones, as QLoRA builds NF4 (bits=4 gives its 16 values)."""
    nd, half = NormalDist(), 2 ** (bits - 1)

    def quantiles(n: int) -> list[float]:
        return [nd.inv_cdf(_NF_OFFSET + (0.5 - _NF_OFFSET) * i / n) for i in range(n)]

    pos, neg = quantiles(half), [-v for v in quantiles(half - 1)] if half > 1 else []
    v = torch.tensor(sorted(pos + neg + [0.0]), dtype=torch.float64)
    return v / v.abs().max()


@dataclass(frozen=True)
class Format:
    grid: Grid
    bits: int
    group_size: int               # columns per group; 0 = one group per row (fp16 scales only)
    symmetric: bool = True        # int only: nf / iq4nl / km always take a signed scale and no min
    scale_bits: int = 16          # 16: fp16 scale (and min) per group; 2..8: codes under super-blocks
    super_groups: int = 0         # groups per super-block when scale_bits < 16

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 1..8, got {self.bits!r}")
        if self.grid is Grid.IQ4NL and self.bits != 4:
            raise ValueError("the iq4nl grid has 4 bits")
        if self.grid is not Grid.INT and not self.symmetric:
            raise ValueError(f"the {self.grid.value} grid is symmetric (a signed scale, no min)")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")
        if self.scale_bits != 16:
            if not 2 <= self.scale_bits <= 8 or self.super_groups < 2 or self.group_size == 0:
                raise ValueError("quantized scales need scale_bits in 2..8, super_groups >= 2 and a group size")
        elif self.super_groups:
            raise ValueError("super_groups needs scale_bits < 16")

    @property
    def double(self) -> bool:
        return self.scale_bits != 16

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def has_min(self) -> bool:
        return not self.symmetric

    def group_width(self, in_features: int) -> int:
        return self.group_size if self.group_size > 0 else in_features

    def n_groups(self, in_features: int) -> int:
        return n_groups(in_features, self.group_size)

    def n_super(self, in_features: int) -> int:
        return -(-self.n_groups(in_features) // self.super_groups) if self.double else 0

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes as stored: codes, per-group scale (and min) fields, super-block fp16 fields, codebook."""
        out, inp = shape
        fields = 2 if self.has_min else 1
        groups = out * self.n_groups(inp)
        if self.double:
            per_group = fields * packed_nbytes(groups, self.scale_bits) + fields * 2 * out * self.n_super(inp)
        else:
            per_group = fields * 2 * groups
        table = 2 * self.levels if self.grid is Grid.KMEANS else 0
        return packed_nbytes(out * inp, self.bits) + per_group + table

    def values(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """The value table v (float32, ascending) that codes index."""
        if self.grid is Grid.INT:
            return torch.arange(self.levels, dtype=torch.float32) - (2 ** (self.bits - 1) if self.symmetric else 0)
        if self.grid is Grid.NF:
            return nf_table(self.bits).float()
        if self.grid is Grid.IQ4NL:
            return torch.tensor(IQ4NL_VALUES, dtype=torch.float32)
        if table is None or table.numel() != self.levels:
            raise ValueError(f"a km format needs its {self.levels}-entry codebook")
        return table.float()


@dataclass
class Params:
    """Per-group parameters of one span of columns, as stored and as decoded (float32 [out, G])."""

    scale: torch.Tensor           # effective s
    mn: torch.Tensor              # effective m (zeros if symmetric)
    sc: torch.Tensor              # stored: fp16 s, or int64 codes c
    mc: torch.Tensor | None       # stored: fp16 m, or int64 codes c_m (asymmetric only)
    d: torch.Tensor | None        # fp16 [out, SB] super-scales (double only)
    dmin: torch.Tensor | None     # fp16 [out, SB] super-mins (double, asymmetric only)

    @staticmethod
    def cat(parts: list[Params]) -> Params:
        def c(name):
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts, 1)

        return Params(c("scale"), c("mn"), c("sc"), c("mc"), c("d"), c("dmin"))


# --- decoding ------------------------------------------------------------------------------
def decode_scales(fmt: Format, sc: torch.Tensor, mc: torch.Tensor | None, d: torch.Tensor | None,
                  dmin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, m) float32 [out, G] from the stored fields (the one place that defines them)."""
    if not fmt.double:
        s = sc.float()
        m = mc.float() if fmt.has_min else torch.zeros_like(s)
        return s, m
    G = sc.shape[1]
    dd = d.float().repeat_interleave(fmt.super_groups, dim=1)[:, :G]
    if fmt.has_min:
        dm = dmin.float().repeat_interleave(fmt.super_groups, dim=1)[:, :G]
        return dd * sc.float(), dm * mc.float()
    s = dd * (sc - 2 ** (fmt.scale_bits - 1)).float()
    return s, torch.zeros_like(s)


def expand(t: torch.Tensor, fmt: Format, in_features: int) -> torch.Tensor:
    """[out, G] -> [out, in]: every column gets its group's value."""
    return t.repeat_interleave(fmt.group_width(in_features), dim=1)[:, :in_features]


def dequantize(fmt: Format, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """w_hat = s * v[q] - m in float32 (q [out, in] integer codes; s, m [out, G])."""
    inp = q.shape[1]
    w = expand(s, fmt, inp) * values[q.long()]
    return w - expand(m, fmt, inp) if fmt.has_min else w


# --- fitting -------------------------------------------------------------------------------
def _groups(X: torch.Tensor, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, c] -> ([out, G, gw] zero-padded, valid mask [G, gw])."""
    out, c = X.shape
    G = -(-c // gw)
    pad = G * gw - c
    Xg = torch.nn.functional.pad(X, (0, pad)).reshape(out, G, gw)
    valid = torch.ones(G * gw, dtype=torch.bool)
    if pad:
        valid[c:] = False
    return Xg, valid.reshape(G, gw)


def assign(X: torch.Tensor, s: torch.Tensor, m: torch.Tensor, values: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Nearest codes of X given per-element (broadcast) s and m; int64."""
    r = (X + m) / torch.where(s == 0, torch.ones_like(s), s)     # s == 0: every code decodes to -m
    if fmt.grid is Grid.INT:
        off = 2 ** (fmt.bits - 1) if fmt.symmetric else 0
        return (torch.round(r) + off).clamp(0, fmt.levels - 1).long()
    mid = ((values[1:] + values[:-1]) / 2).to(r.dtype)
    return torch.bucketize(r.contiguous(), mid)


# relative scale candidates tried by the search (0 = the plain min-max / absmax scale)
_SYM_STEPS = torch.linspace(-1.0, 3.0, 9).tolist()     # in half grid steps at the extreme (> 0 clips)
_ASYM_STEPS = torch.linspace(-1.0, 1.0, 9).tolist()    # added to 2**bits - 1 (llama.cpp's make_qkx2 range)


def fit_groups(Xg: torch.Tensor, w: torch.Tensor, valid: torch.Tensor, fmt: Format, values: torch.Tensor,
               search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float scales and mins [out, G] for groups Xg [out, G, gw] under importance w [G, gw].

    Without `search`: min-max (asymmetric) or signed absmax (extreme -> end of the table). With it:
    candidate scales around that start, each refitted by weighted least squares on its codes,
    keeping the one with the least sum_i w_i (w_i - w_hat_i)^2 (llama.cpp's make_qx / make_qkx
    idea, here for every table)."""
    X = Xg.double()
    w = (w * valid).double()
    v = values.double()
    if fmt.has_min:
        big = torch.finfo(X.dtype).max
        xmin = torch.where(valid, X, big).amin(-1)
        xmax = torch.where(valid, X, -big).amax(-1)
        if fmt.double:   # mins are stored as unsigned codes: the range must hold 0
            xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        rng = xmax - xmin
        scale, mn = rng / (fmt.levels - 1), -xmin
        if not search:
            return scale, mn
        return _search_asym(X, w, fmt, v, scale, mn, xmin, rng)
    ext = torch.gather(X, -1, X.abs().argmax(-1, keepdim=True))[..., 0]
    vend = v[0] if -v[0] >= v[-1] else v[-1]
    scale = ext / vend
    if not search:
        return scale, torch.zeros_like(scale)
    step = (v[1:] - v[:-1]).abs().mean() / 2 / vend.abs()     # half a mean grid step, relative
    best_err = _err(X, w, scale, torch.zeros_like(scale), fmt, v)
    for u in _SYM_STEPS:
        cand = ext / (vend * (1 + u * step))
        vq = v[assign(X, cand[..., None], 0.0, v, fmt)]
        svv = (w * vq * vq).sum(-1)
        a = torch.where(svv > 0, (w * X * vq).sum(-1) / svv.clamp_min(1e-300), cand)
        err = _err(X, w, a, torch.zeros_like(a), fmt, v)
        better = err < best_err
        scale, best_err = torch.where(better, a, scale), torch.where(better, err, best_err)
    return scale, torch.zeros_like(scale)


def _err(X, w, s, m, fmt, v) -> torch.Tensor:
    q = assign(X, s[..., None], m[..., None], v, fmt)
    return (w * (s[..., None] * v[q] - m[..., None] - X) ** 2).sum(-1)


def _search_asym(X, w, fmt, v, scale, mn, xmin, rng):
    best_err = _err(X, w, scale, mn, fmt, v)
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    sw = w.sum(-1)
    sx = (w * X).sum(-1)
    for t in _ASYM_STEPS:
        iscale = (fmt.levels - 1 + t) / safe
        L = torch.round((X - xmin[..., None]) * iscale[..., None]).clamp(0, fmt.levels - 1)
        sl, sll, sxl = (w * L).sum(-1), (w * L * L).sum(-1), (w * X * L).sum(-1)
        det = sw * sll - sl * sl
        ok = det > 1e-300
        a = torch.where(ok, (sw * sxl - sl * sx) / det.clamp_min(1e-300), scale)
        b = torch.where(ok, (sll * sx - sl * sxl) / det.clamp_min(1e-300), -mn)
        if fmt.double:   # min must stay <= 0 (unsigned min codes): refit the scale alone
            clip = b > 0
            b = torch.where(clip, torch.zeros_like(b), b)
            a = torch.where(clip & (sll > 0), sxl / sll.clamp_min(1e-300), a)
        ok = ok & (a > 0)
        a, b = torch.where(ok, a, scale), torch.where(ok, b, -mn)
        err = _err(X, w, a, -b, fmt, v)
        better = err < best_err
        scale, mn = torch.where(better, a, scale), torch.where(better, -b, mn)
        best_err = torch.where(better, err, best_err)
    return scale, mn


def store_params(fmt: Format, scale: torch.Tensor, mn: torch.Tensor) -> Params:
    """Quantize float per-group (scale, min) [out, G] into the stored fields; the effective
    values are decoded from those fields exactly as the dequantizer will."""
    if not fmt.double:
        sc = scale.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        mc = mn.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16) if fmt.has_min else None
        s, m = decode_scales(fmt, sc, mc, None, None)
        return Params(s, m, sc, mc, None, None)
    out, G = scale.shape
    S, top = fmt.super_groups, 2**fmt.scale_bits - 1
    SB = -(-G // S)
    pad = SB * S - G

    def blocks(t):
        return torch.nn.functional.pad(t.double(), (0, pad)).reshape(out, SB, S)

    def codes(t, dd, lo, hi):
        safe = torch.where(dd == 0, torch.ones_like(dd), dd)
        return (torch.round(t / safe[..., None]) - lo).clamp(0, hi - lo).long().reshape(out, SB * S)[:, :G]

    if fmt.has_min:
        sb, mb = blocks(scale), blocks(mn)
        d = (sb.amax(-1) / top).clamp(max=_FP16_MAX).to(torch.float16)
        dmin = (mb.amax(-1) / top).clamp(max=_FP16_MAX).to(torch.float16)
        sc, mc = codes(sb, d.double(), 0, top), codes(mb, dmin.double(), 0, top)
    else:
        half = 2 ** (fmt.scale_bits - 1)
        sb = blocks(scale)
        ext = torch.gather(sb, -1, sb.abs().argmax(-1, keepdim=True))[..., 0]
        d = (ext / -half).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        sc, mc, dmin = codes(sb, d.double(), -half, half - 1), None, None
    s, m = decode_scales(fmt, sc, mc, d, dmin)
    return Params(s, m, sc, mc, d, dmin)


def fit_span(X: torch.Tensor, imp: torch.Tensor | None, fmt: Format, values: torch.Tensor, search: bool) -> Params:
    """Stored and effective parameters for columns X [out, c] (c spans whole super-blocks, or the
    rest of the row); `imp` [c] weighs the columns (None: all alike)."""
    gw = fmt.group_width(X.shape[1])
    Xg, valid = _groups(X, gw)
    w = torch.ones(valid.shape, dtype=torch.float64) if imp is None else _groups(imp[None].double(), gw)[0][0]
    scale, mn = fit_groups(Xg, w, valid, fmt, values, search)
    return store_params(fmt, scale, mn)


def quantize_with(X: torch.Tensor, p: Params, fmt: Format, values: torch.Tensor) -> torch.Tensor:
    """Codes [out, c] of X given the span's parameters (nearest value, in float64)."""
    inp = X.shape[1]
    return assign(X.double(), expand(p.scale, fmt, inp).double(), expand(p.mn, fmt, inp).double(),
                  values.double(), fmt)
