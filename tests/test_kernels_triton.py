"""Triton W{2,3,4,8}A16 kernels on CPU tensors under TRITON_INTERPRET=1 (correctness only), against
the torch reference; tiny shapes with ragged groups and K not a multiple of 32. Skipped when triton
is not installed."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels import triton_wq  # noqa: E402
from kernels.reference import matmul  # noqa: E402
from tests.test_kernels_format import rand_packed  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_wq.INTERPRET and not torch.cuda.is_available(),
                                reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU")
DEV = "cuda" if torch.cuda.is_available() and not triton_wq.INTERPRET else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _check(y: torch.Tensor, x: torch.Tensor, pw) -> None:
    r = matmul(x.cpu(), pw.to("cpu"))
    assert y.dtype == x.dtype and y.shape == r.shape
    err = float((y.cpu().float() - r.float()).abs().max())
    assert err <= TOL[x.dtype] * float(r.float().abs().max()), err


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gemv_and_gemm_match_reference(bits, symmetric):
    pw = rand_packed(40, 100, bits, 48, symmetric, seed=bits).to(DEV)   # groups 48 + 48 + 4, K % 32 = 4
    for M in (1, 3, 8, 20):        # GEMV path up to 8 rows, GEMM beyond
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(M, 100, generator=torch.Generator().manual_seed(M)).to(dtype).to(DEV)
            _check(triton_wq.wq_matmul(x, pw), x, pw)


@pytest.mark.parametrize("bits", [3, 4, 5, 6])
def test_fp32_and_batched_input(bits):
    pw = rand_packed(33, 70, bits, 32, False, seed=7).to(DEV)
    x = torch.randn(2, 5, 70, generator=torch.Generator().manual_seed(0)).to(DEV)
    y = triton_wq.wq_matmul(x, pw)
    assert y.shape == (2, 5, 33)
    _check(y.reshape(10, 33), x.reshape(10, 70), pw)


def test_explicit_configs_split_k_and_tiles():
    pw = rand_packed(40, 100, 3, 48, False, seed=1).to(DEV)
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(2)).half().to(DEV)
    for cfg in ({"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1}, {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 3}):
        _check(triton_wq.gemv(x, pw, cfg), x, pw)
    _check(triton_wq.gemm(x, pw, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}), x, pw)
