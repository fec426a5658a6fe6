import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from planner.levels.quant import (
    QuantizedWeight,
    QuantSpec,
    code_bits,
    dequantize_codes,
    grid_params,
    n_groups,
    quantize_codes,
    rtn_quantize,
    stored_bits,
)

SPECS = [QuantSpec(b, g, sym) for b in (1, 2, 3, 4, 8) for g in (32, 128, -1) for sym in (False, True)]


def expand(t: torch.Tensor, in_features: int, spec: QuantSpec) -> torch.Tensor:
    gw = in_features if spec.group_size <= 0 else spec.group_size
    return t.repeat_interleave(gw, dim=1)[:, :in_features]


def test_n_groups_ragged_and_per_channel():
    assert n_groups(576, 128) == 5  # 128, 128, 128, 128, 64
    assert n_groups(576, 64) == 9
    assert n_groups(96, 64) == 2
    assert n_groups(576, -1) == n_groups(576, 0) == 1
    assert n_groups(10, 128) == 1


def test_bit_accounting():
    shape = (1536, 576)
    spec = QuantSpec(3, 128)
    assert code_bits(shape, spec) == 1536 * 576 * 3
    assert stored_bits(shape, spec) == 1536 * 576 * 3 + 1536 * 5 * (16 + 3)
    assert stored_bits(shape, spec) / (1536 * 576) == pytest.approx(3 + 5 * 19 / 576)
    assert stored_bits(shape, QuantSpec(3, 128, symmetric=True)) == 1536 * 576 * 3 + 1536 * 5 * 16
    assert stored_bits(shape, QuantSpec(4, -1)) == 1536 * 576 * 4 + 1536 * (16 + 4)
    with pytest.raises(ValueError):
        QuantSpec(0, 128)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 9),
    inp=st.integers(1, 200),
    bits=st.integers(1, 8),
    group_size=st.sampled_from([-1, 0, 1, 7, 32, 64, 128]),
    symmetric=st.booleans(),
)
def test_nbytes_matches_stored_bits(out, inp, bits, group_size, symmetric):
    spec = QuantSpec(bits, group_size, symmetric)
    qw = rtn_quantize(torch.randn(out, inp), spec)
    assert qw.scales.shape == (out, n_groups(inp, group_size)) and qw.scales.dtype == torch.float16
    slack = qw.nbytes * 8 - stored_bits((out, inp), spec)
    assert 0 <= slack <= 14  # byte rounding of the two bitstreams
    assert qw.bpw == stored_bits((out, inp), spec) / (out * inp)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_error_within_half_a_step(spec):
    W = torch.randn(24, 576) * torch.logspace(-3, 1, 24)[:, None]
    qw = rtn_quantize(W, spec)
    scale = expand(qw.scales.float(), 576, spec)
    err = (W - qw.dequantize()).abs()
    assert (err <= scale / 2 * (1 + 1e-5)).all()
    codes = qw.codes_unpacked()
    assert codes.shape == W.shape and int(codes.max()) <= 2**spec.bits - 1


def test_ragged_last_group_has_its_own_grid():
    W = torch.randn(8, 576)
    full = rtn_quantize(W, QuantSpec(3, 128))
    tail = rtn_quantize(W[:, 512:], QuantSpec(3, -1))
    assert torch.equal(full.scales[:, 4:], tail.scales)
    assert torch.equal(full.dequantize()[:, 512:], tail.dequantize())


@pytest.mark.parametrize("spec", [QuantSpec(3, 128), QuantSpec(4, -1, True), QuantSpec(5, 32)], ids=str)
def test_tensors_round_trip_through_safetensors(spec):
    W = torch.randn(16, 576)
    qw = rtn_quantize(W, spec)
    tensors = qw.to_tensors("model.layers.0.mlp.up_proj")
    back = QuantizedWeight.from_tensors(load(save(tensors)), "model.layers.0.mlp.up_proj")
    assert back.shape == qw.shape == (16, 576) and back.spec == spec
    assert back.nbytes == qw.nbytes
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(back.dequantize(torch.bfloat16), qw.dequantize().to(torch.bfloat16))


def test_symmetric_grid():
    spec = QuantSpec(4, 32, symmetric=True)
    W = torch.randn(8, 96)
    qw = rtn_quantize(W, spec)
    assert qw.zeros.numel() == 0
    scale, zero = grid_params(W[:, :32], spec)
    assert (zero == 8).all()
    amax = W[:, :32].abs().amax(1, keepdim=True)
    assert (scale >= 2 * amax / 15).all()  # rounded up to fp16, never down
    # the grid is centred: -8 * scale .. 7 * scale
    deq = qw.dequantize() / expand(qw.scales.float(), 96, spec)
    assert torch.equal(deq, deq.round()) and deq.min() >= -8 and deq.max() <= 7


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_on_the_grid_is_reproduced_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    out, inp, gs, maxq = 12, 96, 32, 2**bits - 1
    codes = torch.randint(0, maxq + 1, (out, inp), generator=g)
    codes[:, ::gs] = 0  # every group spans the whole grid, so min-max finds it again
    codes[:, 1::gs] = maxq
    scales = (torch.rand(out, inp // gs, generator=g) * 0.1 + 1e-3).half().float()
    zeros = torch.randint(0, maxq + 1, (out, inp // gs), generator=g).float()
    spec = QuantSpec(bits, gs)
    W = dequantize_codes(codes, expand(scales, inp, spec), expand(zeros, inp, spec))
    qw = rtn_quantize(W, spec)
    assert torch.equal(qw.dequantize(), W)
    assert torch.equal(qw.codes_unpacked().long(), codes)
    assert torch.equal(qw.scales.float(), scales)


def test_degenerate_groups_are_finite():
    spec = QuantSpec(3, 32)
    W = torch.zeros(4, 64)
    W[1] = 1e-10  # below fp16's smallest subnormal step
    W[2, :32] = 1e6  # beyond fp16's range: clipped, not inf
    qw = rtn_quantize(W, spec)
    assert torch.isfinite(qw.scales.float()).all() and (qw.scales.float() > 0).all()
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], W[0]) and torch.equal(deq[3], W[3])  # all-zero rows are exact
    with pytest.raises(ValueError):
        rtn_quantize(torch.full((2, 4), float("nan")), spec)


def ceil_fp16(s: np.ndarray) -> np.ndarray:
    s = np.minimum(np.where(s == 0, 1.0, s), 65504.0)
    h = s.astype(np.float16)
    up = h.astype(np.float64) < s
    h[up] = np.nextafter(h[up], np.float16(np.inf))
    return h.astype(np.float64)


def reference_rtn(W: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 RTN written from the formulas: (codes, scales, zeros)."""
    maxq = 2**spec.bits - 1
    gw = W.shape[1] if spec.group_size <= 0 else spec.group_size
    codes, scales, zeros = [], [], []
    for g0 in range(0, W.shape[1], gw):
        Wg = W[:, g0 : g0 + gw].astype(np.float64)
        xmin = np.minimum(Wg.min(1, keepdims=True), 0)
        xmax = np.maximum(Wg.max(1, keepdims=True), 0)
        if spec.symmetric:
            scale = ceil_fp16(2 * np.maximum(-xmin, xmax) / maxq)
            zero = np.full_like(scale, 2 ** (spec.bits - 1))
        else:
            scale = ceil_fp16((xmax - xmin) / maxq)
            zero = np.clip(np.round(-xmin / scale), 0, maxq)
        codes.append(np.clip(np.round(Wg / scale) + zero, 0, maxq))
        scales.append(scale)
        zeros.append(zero)
    return np.concatenate(codes, 1), np.concatenate(scales, 1), np.concatenate(zeros, 1)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_agrees_with_float64_reference(spec):
    W = torch.randn(32, 160, generator=torch.Generator().manual_seed(spec.bits)) * 0.05
    qw = rtn_quantize(W, spec)
    codes, scales, zeros = reference_rtn(W.numpy(), spec)
    assert np.array_equal(qw.scales.double().numpy(), scales)
    if not spec.symmetric:
        assert np.array_equal(qw.zeros_unpacked().double().numpy(), zeros)
    diff = np.abs(qw.codes_unpacked().numpy().astype(np.int64) - codes)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3  # fp32 vs fp64 can only split exact ties
    same = diff == 0
    ref = expand(torch.from_numpy(scales), 160, spec) * (
        torch.from_numpy(codes) - expand(torch.from_numpy(zeros), 160, spec)
    )
    assert np.allclose(qw.dequantize().double().numpy()[same], ref.numpy()[same], rtol=1e-6, atol=0)


def test_quantize_codes_matches_packed_weight():
    spec = QuantSpec(4, 64)
    W = torch.randn(6, 64)
    scale, zero = grid_params(W, spec)
    q = quantize_codes(W, scale, zero, spec)
    qw = rtn_quantize(W, spec)
    assert torch.equal(qw.codes_unpacked(), q)
    assert torch.equal(qw.dequantize(), dequantize_codes(q, scale, zero))
