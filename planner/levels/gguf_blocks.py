"""llama.cpp's block layouts: each GGUF type as a `grids.Format`, and the packing of a format's
codes and stored fields into that type's bytes (the inverse of gguf-py's ``dequantize_blocks``).

    type     format                                         block bytes   bpw
    Q4_0     int4 g32 symmetric, fp16 scale                 18            4.5
    Q4_1     int4 g32 + fp16 min                            20            5.0
    Q5_0     int5 g32 symmetric                             22            5.5
    Q5_1     int5 g32 + fp16 min                            24            6.0
    Q8_0     int8 g32 symmetric                             34            8.5
    Q2_K     int2 g16, 4-bit scale and min codes, 16/super  84            2.625
    Q3_K     int3 g16 symmetric, 6-bit signed scales        110           3.4375
    Q4_K     int4 g32, 6-bit scale and min codes, 8/super   144           4.5
    Q5_K     int5 g32, 6-bit scale and min codes            176           5.5
    Q6_K     int6 g16 symmetric, 8-bit signed scales        210           6.5625
    IQ4_NL   iq4nl g32, fp16 scale                          18            4.5
    IQ4_XS   iq4nl g32, 6-bit signed scales, 8/super        136           4.25

A GGUF min is stored as the value added (w = d*q + m), the format's as the value subtracted
(w = s*v - m): the sign flips, exactly. llama.cpp decodes K-quants as (d*sc)*q - (dmin*m) in
float32, which is what `grids.dequantize` computes, so both decode the same bits alike.
"""

from __future__ import annotations

import numpy as np
import torch

from planner.levels.grids import Format, Grid, Params

GGUF_FORMATS: dict[str, Format] = {
    "Q4_0": Format(Grid.INT, 4, 32, True), "Q4_1": Format(Grid.INT, 4, 32, False),
    "Q5_0": Format(Grid.INT, 5, 32, True), "Q5_1": Format(Grid.INT, 5, 32, False),
    "Q8_0": Format(Grid.INT, 8, 32, True),
    "Q2_K": Format(Grid.INT, 2, 16, False, 4, 16), "Q3_K": Format(Grid.INT, 3, 16, True, 6, 16),
    "Q4_K": Format(Grid.INT, 4, 32, False, 6, 8), "Q5_K": Format(Grid.INT, 5, 32, False, 6, 8),
    "Q6_K": Format(Grid.INT, 6, 16, True, 8, 16),
    "IQ4_NL": Format(Grid.IQ4NL, 4, 32), "IQ4_XS": Format(Grid.IQ4NL, 4, 32, True, 6, 8),
}


def _f16(t: torch.Tensor, n: int) -> np.ndarray:
    return t.to(torch.float16).numpy().reshape(n, 1).view(np.uint8)


def _pairs(q: np.ndarray, lanes: int, width: int) -> np.ndarray:
    """Pack `lanes` chunks of `width` codes into one byte each: chunk j at bit 8 // lanes * j."""
    n = q.shape[0]
    q = q.reshape(n, -1, lanes, width)
    shift = 8 // lanes
    return np.bitwise_or.reduce([q[:, :, j, :] << np.uint8(shift * j) for j in range(lanes)], axis=0).reshape(n, -1)


def _bit_planes(bits: np.ndarray, width: int) -> np.ndarray:
    """Byte l holds bit b of element b*width + l (Q3_K's hmask, Q5_K's qh)."""
    n = bits.shape[0]
    b = bits.reshape(n, -1, width)
    return np.bitwise_or.reduce([b[:, k, :] << np.uint8(k) for k in range(b.shape[1])], axis=0)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 8 six-bit scales and mins in 12 bytes."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _q3_scales(c: np.ndarray) -> np.ndarray:
    """Q3_K: 16 six-bit scales in 12 bytes (low nibbles in 0..7, high 2-bit pairs in 8..11)."""
    lo, hi = c & 0x0F, c >> 4
    out = np.zeros((c.shape[0], 12), dtype=np.uint8)
    out[:, :8] = lo[:, :8] | (lo[:, 8:] << 4)
    for j in range(4):
        out[:, 8 + j] = hi[:, j] | (hi[:, 4 + j] << 2) | (hi[:, 8 + j] << 4) | (hi[:, 12 + j] << 6)
    return out


def encode_blocks(name: str, q: torch.Tensor, p: Params) -> np.ndarray:
    """Blocks [out, row bytes] of type `name` from codes q [out, in] and the row's Params."""
    fmt = GGUF_FORMATS[name]
    out, inp = q.shape
    nsup = fmt.super_groups if fmt.double else 1
    block = fmt.group_size * nsup
    n = out * (inp // block)
    qb = q.numpy().astype(np.uint8).reshape(n, block)

    def codes(t):
        return t.numpy().astype(np.uint8).reshape(n, nsup)

    if name in ("Q4_0", "IQ4_NL"):
        parts = [_f16(p.sc, n), qb[:, :16] | (qb[:, 16:] << 4)]
    elif name == "Q4_1":
        parts = [_f16(p.sc, n), _f16(-p.mc.float(), n), qb[:, :16] | (qb[:, 16:] << 4)]
    elif name in ("Q5_0", "Q5_1"):
        lo = qb & 0x0F
        qh = np.packbits(qb >> 4, axis=-1, bitorder="little")
        mins = [_f16(-p.mc.float(), n)] if name == "Q5_1" else []
        parts = [_f16(p.sc, n), *mins, qh, lo[:, :16] | (lo[:, 16:] << 4)]
    elif name == "Q8_0":
        parts = [_f16(p.sc, n), (qb.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif name == "Q2_K":
        parts = [codes(p.sc) | (codes(p.mc) << 4), _pairs(qb, 4, 32), _f16(p.d, n), _f16(p.dmin, n)]
    elif name == "Q3_K":
        parts = [_bit_planes(qb >> 2, 32), _pairs(qb & 3, 4, 32), _q3_scales(codes(p.sc)), _f16(p.d, n)]
    elif name in ("Q4_K", "Q5_K"):
        high = [_bit_planes(qb >> 4, 32)] if name == "Q5_K" else []
        parts = [_f16(p.d, n), _f16(p.dmin, n), _k_scales(codes(p.sc), codes(p.mc)), *high, _pairs(qb & 0x0F, 2, 32)]
    elif name == "Q6_K":
        lo, hi = qb & 0x0F, qb >> 4
        ql = _pairs(lo, 2, 64)
        qh = _pairs(hi, 4, 32)
        parts = [ql, qh, (codes(p.sc).astype(np.int16) - 128).astype(np.int8).view(np.uint8), _f16(p.d, n)]
    elif name == "IQ4_XS":
        c = codes(p.sc)
        lo, hi = c & 0x0F, (c >> 4).astype(np.uint16)
        sh = np.bitwise_or.reduce([hi[:, i] << np.uint16(2 * i) for i in range(8)], axis=0)
        parts = [_f16(p.d, n), sh.astype("<u2").reshape(n, 1).view(np.uint8), lo[:, 0::2] | (lo[:, 1::2] << 4),
                 _pairs(qb, 2, 16)]
    else:
        raise ValueError(f"no block encoder for {name}")
    blocks = np.concatenate([np.ascontiguousarray(x, dtype=np.uint8) for x in parts], axis=1)
    return blocks.reshape(out, -1)
