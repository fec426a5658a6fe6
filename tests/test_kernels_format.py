"""The runtime packing format: bit layout, exact byte counts, converters, and the CPU path."""

from __future__ import annotations

import pytest
import torch

from kernels.cpu import CpuKind, _int4pack_codes, int4_group_size, prepare_cpu
from kernels.format import PackedWeight, n_words, pack, pack_words, packed_nbytes, unpack_words
from kernels.reference import dequantize, matmul

BITS = (2, 3, 4, 8)


def rand_packed(N: int, K: int, bits: int, gs: int, symmetric: bool, seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    G = -(-K // gs)
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    scales = (torch.rand(N, G, generator=g) * 0.05 + 0.01).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (N, G), generator=g)
    return pack(codes, scales, zeros, bits, gs)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("K", [1, 31, 32, 33, 100, 576])
def test_words_round_trip(bits, K):
    codes = torch.randint(0, 2**bits, (3, K), generator=torch.Generator().manual_seed(K))
    words = pack_words(codes, bits)
    assert words.dtype == torch.int32 and tuple(words.shape) == (3, n_words(K, bits)) == (3, bits * -(-K // 32))
    assert torch.equal(unpack_words(words, bits, K).long(), codes)


def test_three_bit_codes_straddle_words():
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 7   # bits 30..32: two low bits end word 0, one bit starts word 1
    codes[0, 21] = 5   # bits 63..65: one bit ends word 1, two bits start word 2
    words = [int(v) & 0xFFFFFFFF for v in pack_words(codes, 3)[0].tolist()]
    assert words == [0b11 << 30, 0b1 | (1 << 31), 0b10]
    assert unpack_words(pack_words(codes, 3), 3, 32)[0, [10, 21]].tolist() == [7, 5]


@pytest.mark.parametrize("bits", BITS)
def test_row_bitstream_matches_planner_packing(bits):
    """For K a multiple of 32, each row is the planner's own little-endian bitstream of that row."""
    from planner.levels.pack import pack_codes

    codes = torch.randint(0, 2**bits, (2, 64), generator=torch.Generator().manual_seed(bits))
    for r in range(2):
        assert torch.equal(pack_words(codes[r:r + 1], bits).view(torch.uint8).reshape(-1), pack_codes(codes[r], bits))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_exact_byte_counts(bits, symmetric):
    pw = rand_packed(24, 100, bits, 48, symmetric)
    assert pw.nbytes == packed_nbytes(24, 100, bits, 48, symmetric)
    assert pw.nbytes == 4 * 24 * bits * 4 + 24 * 3 * (2 + (0 if symmetric else 1))


def test_pack_rejects_bad_inputs():
    with pytest.raises(ValueError):
        pack(torch.full((2, 8), 4), torch.ones(2, 1).half(), None, 2, 8)       # code out of range
    with pytest.raises(ValueError):
        pack(torch.zeros(2, 8), torch.full((2, 1), 0.1), None, 2, 8)           # fp32 scale not fp16-exact
    with pytest.raises(ValueError):
        pack(torch.zeros(2, 8), torch.ones(2, 1).half(), torch.full((2, 1), 1.5), 2, 8)  # fractional zero
    with pytest.raises(ValueError):
        pack_words(torch.zeros(2, 8), 9)


def test_reference_dequantize_is_scale_times_code_minus_zero():
    pw = rand_packed(5, 70, 3, 32, False)
    W = dequantize(pw)
    codes, s, z = pw.codes().float(), pw.scales.float(), pw.zeros.float()
    for k in (0, 31, 32, 63, 64, 69):  # the ragged last group: columns 64..69
        assert torch.equal(W[:, k], s[:, k // 32] * (codes[:, k] - z[:, k // 32]))


def test_int4pack_layout_read_back():
    """Our reading of torch's CPU int4 layout (all three block widths) inverts its converter."""
    for N in (16, 32, 64, 192):
        q = torch.randint(0, 16, (N, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(N))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        assert torch.equal(_int4pack_codes(packed, N, 64).to(torch.int32), q)


def test_cpu_kind_choice():
    assert int4_group_size(rand_packed(64, 576, 4, 128, False)) == 64     # ragged 128-groups via 64
    assert prepare_cpu(rand_packed(64, 576, 4, 128, False)).kind is CpuKind.INT4PACK
    assert prepare_cpu(rand_packed(24, 64, 4, 64, False)).kind is CpuKind.UNPACK   # N % 16 != 0
    assert prepare_cpu(rand_packed(32, 96, 4, 48, False)).kind is CpuKind.UNPACK   # no torch group size fits
    assert prepare_cpu(rand_packed(32, 96, 8, 48, False)).kind is CpuKind.INT8PACK
    assert prepare_cpu(rand_packed(32, 100, 8, 64, False)).kind is CpuKind.UNPACK  # ragged width 36
    assert prepare_cpu(rand_packed(32, 96, 3, 48, False)).kind is CpuKind.UNPACK
    with pytest.raises(ValueError):
        prepare_cpu(rand_packed(32, 96, 3, 48, False), CpuKind.INT4PACK)   # group 48: no torch group size
    with pytest.raises(ValueError):
        prepare_cpu(rand_packed(32, 96, 8, 32, False), CpuKind.INT4PACK)   # 8-bit codes do not fit


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bits_widened_to_int4pack(bits):
    pw = rand_packed(32, 96, bits, 32, False, seed=bits)
    w = prepare_cpu(pw, CpuKind.INT4PACK)
    assert w.kind is CpuKind.INT4PACK and torch.equal(w.to_packed().qweight, pw.qweight)
    assert torch.equal(w.dequantize(torch.float32), dequantize(pw))
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(w.matmul(x), matmul(x, pw), rtol=1e-5, atol=1e-5)


CASES = [(64, 576, 128), (48, 96, 48), (32, 100, 64), (32, 64, 32)]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_cpu_matches_reference(bits, symmetric):
    for N, K, gs in CASES:
        pw = rand_packed(N, K, bits, gs, symmetric, seed=N + K)
        w = prepare_cpu(pw)
        back = w.to_packed()
        assert torch.equal(back.qweight, pw.qweight) and torch.equal(back.scales, pw.scales)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            assert torch.equal(w.dequantize(dtype), dequantize(pw, dtype))
            for M in (1, 3, 40, 100):  # torch's op for few rows, dequantize + dense matmul for many
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
                y, r = w.matmul(x), matmul(x, pw)
                assert y.dtype == dtype and y.shape == (M, N)
                assert float((y.float() - r.float()).abs().max()) <= tol * float(r.float().abs().max()), (N, K, gs, M)
