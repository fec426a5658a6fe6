import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.levels.pack import pack_codes, packed_nbytes, unpack_codes

shapes = st.lists(st.integers(0, 13), min_size=1, max_size=3).map(tuple)
int_dtypes = st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64])


def reference_pack(codes: list[int], bits: int) -> bytes:
    """The layout by definition: code i at bits [i*bits, (i+1)*bits) of a little-endian integer."""
    stream = sum(c << (i * bits) for i, c in enumerate(codes))
    return stream.to_bytes(math.ceil(len(codes) * bits / 8), "little")


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), shape=shapes, dtype=int_dtypes, seed=st.integers(0, 2**32 - 1))
def test_round_trip_and_layout(bits, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(0, 2**bits, size=shape)).to(dtype)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(codes.numel() * bits / 8) == packed_nbytes(codes.numel(), bits)
    assert bytes(packed.numpy()) == reference_pack(codes.reshape(-1).tolist(), bits)
    out = unpack_codes(packed, bits, codes.shape)
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out.long(), codes.long())


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 50), bad=st.sampled_from(["high", "negative"]))
def test_out_of_range_raises(bits, n, bad):
    codes = torch.zeros(n, dtype=torch.int64)
    codes[n // 2] = 2**bits if bad == "high" else -1
    with pytest.raises(ValueError):
        pack_codes(codes, bits)


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(4, dtype=torch.uint8), bits)


def test_float_codes_and_wrong_length_raise():
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(4), 4)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (4,))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fast_enough_on_a_real_layer(bits):
    codes = torch.randint(0, 2**bits, (1536, 576), dtype=torch.uint8)
    best = math.inf
    for _ in range(3):  # best of three: other work shares these cores
        t = time.perf_counter()
        out = unpack_codes(pack_codes(codes, bits), bits, codes.shape)
        best = min(best, time.perf_counter() - t)
    assert best < 1.0   # a guard against a per-element Python loop (~100x slower), not a benchmark
    assert torch.equal(out, codes)
