"""The `format` builder: exact costs, a float64 reference of every format, importance-weighted
rounding (diag search, AWQ scales, GPTQ over any format) and the search-space family."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from planner.errors import BadSearchSpace
from planner.levels.formats import FormatSpec, FormatWeight, Rounding, parse_format, quantize_format
from planner.levels.grids import Format, Grid, nf_table
from planner.levels.importance import weighted_error

FORMATS = [
    Format(Grid.INT, 3, 32, False), Format(Grid.INT, 4, 32, True), Format(Grid.INT, 2, 64, False),
    Format(Grid.INT, 4, 0, False), Format(Grid.INT, 3, 16, True, 6, 16), Format(Grid.INT, 2, 16, False, 4, 16),
    Format(Grid.INT, 4, 32, False, 6, 8), Format(Grid.INT, 5, 48, True, 8, 3), Format(Grid.NF, 4, 64),
    Format(Grid.NF, 3, 32, True, 6, 8), Format(Grid.IQ4NL, 4, 32), Format(Grid.IQ4NL, 4, 32, True, 6, 8),
    Format(Grid.KMEANS, 3, 64), Format(Grid.KMEANS, 2, 32, True, 6, 4),
]
IDS = [FormatSpec(f, Rounding.MINMAX).id for f in FORMATS]


def problem(out=24, inp=200, seed=0):
    """A weight and a Hessian whose input columns differ ~100x in energy (importance matters)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.05
    X = torch.randn(4 * inp, inp, generator=g) * torch.logspace(-1, 1, inp)[torch.randperm(inp, generator=g)]
    return W, 2 * X.T @ X / X.shape[0]


# --- a float64 reference of each format, written from the grids.py docstring ----------------------
def ref_unpack(stream: torch.Tensor, bits: int, n: int) -> np.ndarray:
    b = np.unpackbits(stream.numpy(), bitorder="little")[: n * bits].reshape(n, bits)
    return (b * (1 << np.arange(bits))).sum(1)


def ref_values(fmt: Format, table) -> np.ndarray:
    if fmt.grid is Grid.INT:
        return np.arange(2**fmt.bits) - (2 ** (fmt.bits - 1) if fmt.symmetric else 0)
    if fmt.grid is Grid.KMEANS:
        return table.double().numpy()
    return fmt.values().double().numpy()   # nf / iq4nl tables (the nf table is checked against QLoRA below)


def ref_decode(w: FormatWeight) -> np.ndarray:
    """w_hat = s * v[q] - m in float64 from the stored fields, one group at a time."""
    fmt, (out, inp) = w.fmt, w.shape
    gw = fmt.group_size or inp
    G = -(-inp // gw)
    q = ref_unpack(w.codes, fmt.bits, out * inp).reshape(out, inp)

    def field(t):
        if t.dtype == torch.float16:
            return t.double().numpy()
        return ref_unpack(t, fmt.scale_bits, out * G).reshape(out, G).astype(np.float64)

    sc = field(w.scales)
    mc = field(w.mins) if w.mins.numel() else np.zeros((out, G))
    if fmt.double:
        sup = np.arange(G) // fmt.super_groups
        d = w.d.double().numpy()[:, sup]
        if fmt.symmetric:
            s, m = d * (sc - 2 ** (fmt.scale_bits - 1)), np.zeros_like(sc)
        else:
            s, m = d * sc, w.dmin.double().numpy()[:, sup] * mc
    else:
        s, m = sc, mc
    v = ref_values(fmt, w.table)
    W_hat = np.zeros((out, inp))
    for g in range(G):
        cols = slice(g * gw, min((g + 1) * gw, inp))
        W_hat[:, cols] = s[:, g:g + 1] * v[q[:, cols]] - m[:, g:g + 1]
    if w.colscale.numel():
        W_hat /= w.colscale.double().numpy()
    return W_hat


def ref_minmax(W: torch.Tensor, fmt: Format, table) -> tuple[np.ndarray, np.ndarray]:
    """(codes, w_hat) of min-max rounding in float64: fit, store the scales, nearest codes."""
    X = W.double().numpy()
    out, inp = X.shape
    gw = fmt.group_size or inp
    G = -(-inp // gw)
    v = ref_values(fmt, table)
    scale, mn = np.zeros((out, G)), np.zeros((out, G))
    for g in range(G):
        x = X[:, g * gw:(g + 1) * gw]
        if fmt.symmetric:
            ext = x[np.arange(out), np.abs(x).argmax(1)]
            vend = v[0] if -v[0] >= v[-1] else v[-1]
            scale[:, g] = ext / vend
        else:
            lo, hi = x.min(1), x.max(1)
            if fmt.double:
                lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
            scale[:, g], mn[:, g] = (hi - lo) / (2**fmt.bits - 1), -lo
    if not fmt.double:
        s, m = scale.astype(np.float16).astype(np.float64), mn.astype(np.float16).astype(np.float64)
    else:
        S, top, s, m = fmt.super_groups, 2**fmt.scale_bits - 1, np.zeros_like(scale), np.zeros_like(mn)
        for b in range(0, G, S):
            blk = slice(b, min(b + S, G))
            if fmt.symmetric:
                half = 2 ** (fmt.scale_bits - 1)
                sb = scale[:, blk]
                d = (sb[np.arange(out), np.abs(sb).argmax(1)] / -half).astype(np.float16).astype(np.float64)[:, None]
                c = np.clip(np.round(sb / np.where(d == 0, 1, d)) + half, 0, 2 * half - 1)
                s[:, blk] = d * (c - half)
            else:
                for src, dst in ((scale, s), (mn, m)):
                    d = (src[:, blk].max(1) / top).astype(np.float16).astype(np.float64)[:, None]
                    dst[:, blk] = d * np.clip(np.round(src[:, blk] / np.where(d == 0, 1, d)), 0, top)
    q = np.zeros((out, inp), dtype=np.int64)
    for g in range(G):
        cols = slice(g * gw, min((g + 1) * gw, inp))
        r = (X[:, cols] + m[:, g:g + 1]) / np.where(s[:, g:g + 1] == 0, 1, s[:, g:g + 1])
        q[:, cols] = np.abs(r[..., None] - v).argmin(-1)
    W_hat = np.concatenate([s[:, g:g + 1] * v[q[:, g * gw:(g + 1) * gw]] - m[:, g:g + 1] for g in range(G)], 1)
    return q, W_hat


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_minmax_matches_float64_reference(fmt):
    W, H = problem(inp=200)   # 200 columns: ragged last groups and super-blocks
    w = quantize_format(W, fmt, Rounding.MINMAX)
    q_ref, W_ref = ref_minmax(W, fmt, w.table)
    q = w.fields()[0].numpy().astype(np.int64)
    assert (q == q_ref).mean() > 0.999          # only exact ties may differ
    W_hat = w.dequantize().double().numpy()
    tol = 1e-6 * float(W.abs().max())
    assert np.abs(W_hat - ref_decode(w)).max() <= tol
    assert np.abs(W_hat - W_ref)[q == q_ref].max() <= tol


@pytest.mark.parametrize("rounding", [Rounding.DIAG, Rounding.GPTQ])   # mse: the diag search, d = 1
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_every_rounding_decodes_like_the_reference(fmt, rounding):
    W, H = problem(out=16, inp=160, seed=1)
    w = quantize_format(W, fmt, rounding, H, awq=rounding is Rounding.DIAG and fmt.bits == 3)
    assert np.abs(w.dequantize().double().numpy() - ref_decode(w)).max() <= 1e-6 * float(W.abs().max())


@settings(max_examples=20, deadline=None)
@given(out=st.integers(1, 6), inp=st.integers(1, 300), fmt=st.sampled_from(FORMATS), awq=st.booleans())
def test_costs_are_the_packed_bytes(out, inp, fmt, awq):
    W, H = problem(out, inp, seed=inp)
    spec = FormatSpec(fmt, Rounding.MSE, awq)
    w = quantize_format(W, fmt, spec.rounding, H, awq)
    assert w.nbytes == spec.nbytes((out, inp)) and spec.stored_bits((out, inp)) == 8 * w.nbytes
    assert spec.code_bits((out, inp)) == out * inp * fmt.bits
    back = FormatWeight.from_tensors(load(save(w.to_tensors("u.l"))), "u.l")
    assert torch.equal(back.dequantize(), w.dequantize())


def test_known_costs():
    shape = (1536, 576)   # 18 groups of 32 per row; 3 super-blocks of 8 (the last holds 2)
    k4 = FormatSpec(Format(Grid.INT, 4, 32, False, 6, 8))
    assert k4.nbytes(shape) == 1536 * 576 // 2 + 2 * ((1536 * 18 * 6 + 7) // 8) + 2 * 2 * 1536 * 3
    assert k4.id == "int4-g32-d6x8-diag"
    assert FormatSpec(Format(Grid.NF, 4, 64), Rounding.GPTQ, True).id == "nf4-g64-gptq-awq"
    km = FormatSpec(Format(Grid.KMEANS, 3, 128))
    assert km.nbytes((10, 256)) == 10 * 256 * 3 // 8 + 2 * 10 * 2 + 2 * 8   # codes, fp16 scales, codebook
    # the K-quant layouts cost what llama.cpp's blocks cost
    assert FormatSpec(Format(Grid.INT, 2, 16, False, 4, 16)).stored_bits((8, 512)) / (8 * 512) == 2.625
    assert FormatSpec(Format(Grid.INT, 3, 16, True, 6, 16)).stored_bits((8, 512)) / (8 * 512) == 3.4375
    assert FormatSpec(Format(Grid.IQ4NL, 4, 32, True, 6, 8)).stored_bits((8, 512)) / (8 * 512) == 4.25


def test_nf4_is_qlora_table():
    qlora = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
    assert np.allclose(nf_table(4).numpy(), qlora, atol=1e-6)
    assert nf_table(3).tolist()[3] == 0.0 and len(nf_table(2)) == 4


def test_importance_weighted_rounding_helps():
    W, H = problem(out=32, inp=256, seed=2)
    d = torch.diagonal(H) / 2
    fmt = Format(Grid.INT, 3, 64, False)
    err = {r: weighted_error(W, quantize_format(W, fmt, r, H).dequantize(), d) for r in FORMAT_R}
    assert err[Rounding.DIAG] < err[Rounding.MSE] < err[Rounding.MINMAX]
    awq = weighted_error(W, quantize_format(W, fmt, Rounding.DIAG, H, awq=True).dequantize(), d)
    assert awq <= err[Rounding.DIAG]

    def proxy(r):
        D = (W - quantize_format(W, Format(Grid.NF, 3, 64), r, H).dequantize()).double()
        return float(((D @ H.double()) * D).sum())

    assert proxy(Rounding.GPTQ) < proxy(Rounding.DIAG)


FORMAT_R = (Rounding.MINMAX, Rounding.MSE, Rounding.DIAG)


def test_zero_and_constant_groups_are_exact():
    W = torch.zeros(4, 96)
    W[1, 32:64] = 0.25
    for fmt in FORMATS:
        W_hat = quantize_format(W, fmt, Rounding.MSE).dequantize()
        assert torch.equal(W_hat[W.sum(1) == 0], W[W.sum(1) == 0]), fmt        # zero rows: exact
        assert torch.allclose(W_hat, W, atol=1e-3 * 0.25), fmt                  # up to fp16 scales


def test_parse_family_and_errors():
    specs = parse_format({"method": "format", "grid": "int", "bits": [2, 3], "group_size": [16, 32],
                          "scale_bits": 6, "super_groups": 8, "rounding": ["diag", "gptq"]}, "at")
    assert len(specs) == 8 and specs[0].id == "int2-g16-d6x8-diag"
    assert parse_format({"method": "format", "grid": "nf", "bits": 4}, "at")[0].id == "nf4-g32-diag"
    for bad in ({"bits": 3, "grid": "nf", "symmetric": False}, {"bits": 3, "colour": 1}, {"bits": 9},
                {"bits": 3, "scale_bits": 6}, {"bits": 3, "rounding": "ref"}, {"bits": 3, "grid": "iq4nl"},
                {"bits": 3, "group_size": 0, "scale_bits": 6, "super_groups": 4}):
        with pytest.raises(BadSearchSpace):
            parse_format({"method": "format", **bad}, "at")
