"""The `format` builder: levels in any `grids.Format` (int / normal-float / IQ4_NL / k-means tables;
fp16 or double-quantized super-block scales; symmetric or asymmetric) with a chosen rounding.

    levels:
      - method: format
        grid: int               # int | nf | iq4nl | km
        bits: [2, 3, 4]         # an integer or a list
        group_size: [32, 64]    # an integer or a list; 0 = one group per row (fp16 scales only)
        symmetric: false        # int only (default false: a min per group)
        scale_bits: 6           # 16 (default): fp16 scale/min per group; 2..8: codes under super-blocks
        super_groups: 8         # groups per super-block (fp16 super-scale and super-min), with scale_bits
        rounding: diag          # minmax | mse | diag | gptq, or a list (default diag)
        awq: false              # AWQ-style per-input-channel scales (fp16, stored; needs activations)

Level ids spell the format out: `int3-g16-d6x16-diag`, `nf4-g64-mse`, `km3-g128-gptq-awq`,
`int4-g32-sym-minmax` (d6x16 = 6-bit scale codes, 16 groups per super-block).

Roundings (`Rounding`): minmax (plain min-max / absmax scale, nearest codes), mse (scale search,
every weight alike), diag (the same search weighted by the mean squared activation of each input
column, diag(H)/2), gptq (GPTQ's column loop with this format's parameters and table).
Costs are exact: stored bits = 8 x the bytes of the packed tensors (`Format.nbytes`), plus 16 bits
per input column with awq.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch

from planner.errors import BadSearchSpace
from planner.levels import importance as imp_
from planner.levels.grids import Format, Grid, Params, decode_scales, dequantize
from planner.levels.pack import pack_codes, unpack_codes
from planner.levels.registry import Builder, BuildOptions, register_builder

FORMAT_VERSION = 2   # part of every spec's JSON (and so of the levels DB key): bump when numerics change


class Rounding(str, enum.Enum):
    MINMAX = "minmax"
    MSE = "mse"
    DIAG = "diag"
    GPTQ = "gptq"
    REF = "ref"          # GGUF levels only: gguf-py's port of llama.cpp's reference quantizer
    LLAMA = "llama"      # GGUF levels only: llama.cpp's own quantizer (libggml) with an importance matrix


FORMAT_ROUNDINGS = (Rounding.MINMAX, Rounding.MSE, Rounding.DIAG, Rounding.GPTQ)


def format_id(fmt: Format) -> str:
    name = "iq4nl" if fmt.grid is Grid.IQ4NL else f"{fmt.grid.value}{fmt.bits}"
    g = f"g{fmt.group_size}" if fmt.group_size else "pc"
    d = f"-d{fmt.scale_bits}x{fmt.super_groups}" if fmt.double else ""
    sym = "-sym" if fmt.grid is Grid.INT and fmt.symmetric else ""
    return f"{name}-{g}{d}{sym}"


@dataclass(frozen=True)
class FormatSpec:
    fmt: Format
    rounding: Rounding = Rounding.DIAG
    awq: bool = False

    builder = "format"

    @property
    def id(self) -> str:
        return f"{format_id(self.fmt)}-{self.rounding.value}" + ("-awq" if self.awq else "")

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def code_bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] * self.fmt.bits

    def nbytes(self, shape: tuple[int, int]) -> int:
        return self.fmt.nbytes(shape) + (2 * shape[1] if self.awq else 0)

    def stored_bits(self, shape: tuple[int, int]) -> int:
        """Exactly 8 x the stored bytes (bitstreams padded to whole bytes count too)."""
        return 8 * self.nbytes(shape)

    def to_json(self) -> dict:
        f = self.fmt
        return {"method": "format", "grid": f.grid.value, "bits": f.bits, "group_size": f.group_size,
                "symmetric": f.symmetric, "scale_bits": f.scale_bits, "super_groups": f.super_groups,
                "rounding": self.rounding.value, "awq": self.awq, "version": FORMAT_VERSION}


_META = ("out", "in", "grid", "bits", "group_size", "symmetric", "scale_bits", "super_groups", "awq")
_GRIDS = list(Grid)
_EMPTY16 = torch.empty(0, dtype=torch.float16)


@dataclass
class FormatWeight:
    """One unit at one format level: packed codes and every stored field (see grids.py)."""

    fmt: Format
    shape: tuple[int, int]
    codes: torch.Tensor                    # packed uint8 bitstream of [out, in] codes
    scales: torch.Tensor                   # fp16 [out, G], or packed scale codes
    mins: torch.Tensor                     # same as scales (asymmetric), else empty
    d: torch.Tensor = _EMPTY16             # fp16 [out, SB] super-scales (double), else empty
    dmin: torch.Tensor = _EMPTY16          # fp16 [out, SB] super-mins (double, asymmetric), else empty
    table: torch.Tensor = _EMPTY16         # fp16 [2**bits] codebook (km), else empty
    colscale: torch.Tensor = _EMPTY16      # fp16 [in] AWQ column scales (decode divides by them), else empty

    @classmethod
    def from_params(cls, fmt: Format, q: torch.Tensor, p: Params, table: torch.Tensor | None = None,
                    colscale: torch.Tensor | None = None) -> FormatWeight:
        def field(t):
            if t is None:
                return torch.empty(0, dtype=torch.uint8)
            return t.contiguous() if t.dtype == torch.float16 else pack_codes(t, fmt.scale_bits)

        return cls(fmt, (int(q.shape[0]), int(q.shape[1])), pack_codes(q, fmt.bits), field(p.sc), field(p.mc),
                   _EMPTY16 if p.d is None else p.d.contiguous(), _EMPTY16 if p.dmin is None else p.dmin.contiguous(),
                   _EMPTY16 if table is None else table.to(torch.float16),
                   _EMPTY16 if colscale is None else colscale.to(torch.float16))

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Unpacked (codes [out, in], scale fields [out, G], min fields or None, d, dmin)."""
        out, inp = self.shape
        G = self.fmt.n_groups(inp)

        def unpack(t):
            if not t.numel():
                return None
            return t if t.dtype == torch.float16 else unpack_codes(t, self.fmt.scale_bits, (out, G)).long()

        return (unpack_codes(self.codes, self.fmt.bits, self.shape), unpack(self.scales), unpack(self.mins),
                self.d if self.d.numel() else None, self.dmin if self.dmin.numel() else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, sc, mc, d, dmin = self.fields()
        s, m = decode_scales(self.fmt, sc, mc, d, dmin)
        w = dequantize(self.fmt, q, s, m, self.fmt.values(self.table if self.table.numel() else None))
        if self.colscale.numel():
            w = w / self.colscale.float()
        return w.to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins, self.d, self.dmin,
                                                          self.table, self.colscale))

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        f = self.fmt
        meta = torch.tensor([*self.shape, _GRIDS.index(f.grid), f.bits, f.group_size, int(f.symmetric),
                             f.scale_bits, f.super_groups, int(bool(self.colscale.numel()))])
        names = ("codes", "scales", "mins", "d", "dmin", "table", "colscale")
        return {f"{prefix}.meta": meta, **{f"{prefix}.{n}": getattr(self, n) for n in names}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> FormatWeight:
        m = dict(zip(_META, (int(v) for v in tensors[f"{prefix}.meta"].tolist()), strict=True))
        fmt = Format(_GRIDS[m["grid"]], m["bits"], m["group_size"], bool(m["symmetric"]), m["scale_bits"],
                     m["super_groups"])
        t = {n: tensors[f"{prefix}.{n}"] for n in ("codes", "scales", "mins", "d", "dmin", "table", "colscale")}
        w = cls(fmt, (m["out"], m["in"]), **t)
        if w.nbytes != fmt.nbytes(w.shape) + (2 * m["in"] if m["awq"] else 0):
            raise ValueError(f"tensors under {prefix!r} do not match their meta {m}")
        return w


def quantize_format(W: torch.Tensor, fmt: Format, rounding: Rounding, H: torch.Tensor | None = None,
                    awq: bool = False, damp: float = 0.01, block_size: int = 128, factor=None) -> FormatWeight:
    """One unit at one format level. H (the GPTQ Hessian of the unit's input) is needed for
    diag, gptq and awq; minmax and mse use the weights alone. `factor`: H's inverse factor, shared
    by the GPTQ levels of one unit (ignored with awq, whose H is rescaled)."""
    if W.dim() != 2 or W.numel() == 0 or not torch.isfinite(W).all():
        raise ValueError(f"W must be a finite, non-empty [out, in] matrix, got shape {tuple(W.shape)}")
    if rounding not in FORMAT_ROUNDINGS:
        raise ValueError(f"format levels round with {', '.join(r.value for r in FORMAT_ROUNDINGS)}, not {rounding.value}")
    needs_h = awq or rounding in (Rounding.DIAG, Rounding.GPTQ)
    if needs_h and H is None:
        raise ValueError(f"rounding {rounding.value}{' with awq' if awq else ''} needs the input Hessian")
    W = W.detach().float()
    imp = imp_.diag_importance(H) if needs_h else None
    colscale = None
    if awq:
        colscale = imp_.awq_scales(W, imp, fmt, fmt.values(imp_.kmeans_table(W, imp, fmt))
                                   if fmt.grid is Grid.KMEANS else fmt.values())
        W, imp = W * colscale, imp / colscale.double() ** 2
        H, factor = H / (colscale[:, None] * colscale[None, :]), None
    w_imp = imp if rounding in (Rounding.DIAG, Rounding.GPTQ) else None   # minmax/mse: every weight alike
    table = imp_.kmeans_table(W, w_imp, fmt) if fmt.grid is Grid.KMEANS else None
    values = fmt.values(table)
    if rounding is Rounding.GPTQ:
        q, p = imp_.gptq_format(W, H, fmt, values, w_imp, percdamp=damp, block_size=block_size, factor=factor)
    else:
        q, p = imp_.rtn_format(W, fmt, values, w_imp, search=rounding is not Rounding.MINMAX)
    return FormatWeight.from_params(fmt, q, p, table, colscale)


# --- the builder -------------------------------------------------------------------------------
_KEYS = {"method", "grid", "bits", "group_size", "symmetric", "scale_bits", "super_groups", "rounding", "awq"}


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise BadSearchSpace(f"{where}: {msg}")


def _ints(v, at: str, key: str, lo: int, hi: int) -> list[int]:
    vs = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    _need(isinstance(vs, list) and vs and all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi
                                              for x in vs), at, f"{key} must be an integer or list of integers in {lo}..{hi}")
    return vs


def _enum_list(v, enum_cls, at: str, key: str, allowed) -> list:
    vs = [v] if isinstance(v, str) else v
    names = [a.value for a in allowed]
    _need(isinstance(vs, list) and vs and all(x in names for x in vs), at, f"{key} must be one of (or a list of) {names}")
    return [enum_cls(x) for x in vs]


def parse_format(fam: dict, at: str) -> list[FormatSpec]:
    extra = set(fam) - _KEYS
    _need(not extra, at, f"unknown key(s) {sorted(extra)}; allowed: {', '.join(sorted(_KEYS))}")
    grid = _enum_list(fam.get("grid", "int"), Grid, at, "grid", list(Grid))
    _need(len(grid) == 1, at, "grid must be one value")
    bits = _ints(fam.get("bits"), at, "bits", 1, 8)
    groups = _ints(fam.get("group_size", 32), at, "group_size", 0, 1 << 20)
    roundings = _enum_list(fam.get("rounding", "diag"), Rounding, at, "rounding", FORMAT_ROUNDINGS)
    sym = fam.get("symmetric", grid[0] is not Grid.INT)
    for key, val in (("symmetric", sym), ("awq", fam.get("awq", False))):
        _need(isinstance(val, bool), at, f"{key} must be true or false")
    scale_bits, super_groups = fam.get("scale_bits", 16), fam.get("super_groups", 0)
    specs = []
    for b, g, r in itertools.product(bits, groups, roundings):
        try:
            fmt = Format(grid[0], b, g, sym, scale_bits, super_groups)
        except (ValueError, TypeError) as e:
            raise BadSearchSpace(f"{at}: {e}") from None
        specs.append(FormatSpec(fmt, r, bool(fam.get("awq", False))))
    return specs


def build_format(W: torch.Tensor, H: torch.Tensor | None, specs: list[FormatSpec], opt: BuildOptions) -> dict:
    """Every spec of one unit; the GPTQ levels share one factorization of H."""
    factor = imp_.shared_factor(H, opt.damp, any(s.rounding is Rounding.GPTQ and not s.awq for s in specs))
    return {s.id: quantize_format(W, s.fmt, s.rounding, H, s.awq, opt.damp, opt.block_size, factor) for s in specs}


register_builder(Builder("format", parse_format, build_format, FormatWeight.from_tensors, needs_hessian=True))
