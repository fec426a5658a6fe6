"""Triton weight-only matmul, W{2,3,4,8}A16: ``y = x @ W_hat^T`` with W_hat dequantized in registers
from the runtime format of `kernels.format` (int32 words along K, fp16/bf16 scales, uint8 zeros).

Two kernels share one dequantization routine:

- GEMV path (1..8 rows, decode): each program owns BLOCK_N outputs and 1/SPLIT_K of K, reduces
  ``x[m, k] * w[k, n]`` over k with a broadcast-multiply-sum (no tensor cores: the work is reading
  the weight once), and atomically adds fp32 partial sums when SPLIT_K > 1 so that a 4096-wide
  layer still fills the machine at batch 1.
- GEMM path (prefill): a classic tiled ``tl.dot`` over (BLOCK_M, BLOCK_N) tiles of the output,
  dequantizing one [BLOCK_K, BLOCK_N] weight tile per step, fp32 accumulation.

Dequantization is ``(q - z) * s`` in fp32, rounded once to the activation dtype: the same numbers as
`kernels.reference.dequantize`. 3-bit codes that straddle two words (codes 10 and 21 of each 32)
are read from both words (so are the straddling codes of 5, 6 and 7 bits).

Autotuning keeps one config per kernel under ``TRITON_INTERPRET=1`` (the interpreter runs on CPU
tensors and is for correctness only; benchmarking configs there would cost minutes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.format import PackedWeight

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_ROWS = 8


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_k, offs_n, N, K, W, G,
                  BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr):
    """W_hat^T tile [BLOCK_K, BLOCK_N] in fp32 (zero outside the matrix)."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    bit = offs_k * BITS
    word = bit // 32
    off = (bit % 32).to(tl.uint32)[:, None]
    row = offs_n[None, :].to(tl.int64) * W
    lo = tl.load(qw_ptr + row + word[:, None], mask=mask, other=0).to(tl.uint32, bitcast=True)
    v = lo >> off
    if 32 % BITS != 0:   # 3/5/6/7 bits: some codes straddle two words
        hi_mask = mask & (word[:, None] + 1 < W)
        hi = tl.load(qw_ptr + row + word[:, None] + 1, mask=hi_mask, other=0).to(tl.uint32, bitcast=True)
        v = v | ((hi << 1) << (31 - off))          # hi << (32 - off) without a 32-bit shift when off == 0
    q = (v & ((1 << BITS) - 1)).to(tl.float32)
    sg = offs_n[None, :].to(tl.int64) * G + (offs_k // GROUP)[:, None]
    s = tl.load(s_ptr + sg, mask=mask, other=0).to(tl.float32)
    if SYMMETRIC:
        z = (1 << (BITS - 1)) * 1.0
    else:
        z = tl.load(z_ptr + sg, mask=mask, other=0).to(tl.float32)
    return (q - z) * s


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, W, G, stride_xm,
                 BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """y (fp32 [M, N], zeroed when SPLIT_K > 1) += x[:, k-slice] @ W_hat[:, k-slice]^T."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    for k0 in range(pid_k * k_per, tl.minimum(K, (pid_k + 1) * k_per), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_k, offs_n, N, K, W, G, BITS, GROUP, SYMMETRIC)
        w = w.to(x.dtype).to(tl.float32)
        acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    y_off = offs_m[:, None] * N + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptr + y_off, acc, mask=y_mask)
    else:
        tl.atomic_add(y_ptr + y_off, acc, mask=y_mask)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, W, G, stride_xm, stride_ym, M_BUCKET,
                 BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [M, N] = x @ W_hat^T; M_BUCKET (next power of two of M) only keys the autotuner."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_k, offs_n, N, K, W, G, BITS, GROUP, SYMMETRIC)
        if UPCAST_DOT:  # the interpreter's dot misreads bf16 operands; fp32 of bf16 values is the same product
            acc += tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=y_mask)


def _gemv_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2})]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4)
            for bn in (32, 64, 128) for bk in (32, 64) for sk in (1, 4, 8)]


def _gemm_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 32, 4, 4),
                                     (64, 128, 32, 4, 4), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3))]


_gemv_tuned = triton.autotune(configs=_gemv_configs(), key=["M", "N", "K", "BITS"], reset_to_zero=["y_ptr"])(
    _gemv_kernel)
_gemm_tuned = triton.autotune(configs=_gemm_configs(), key=["N", "K", "BITS", "M_BUCKET"])(_gemm_kernel)


def _args(pw: PackedWeight) -> tuple:
    z = pw.zeros if pw.zeros is not None else pw.scales  # any pointer: never read when symmetric
    return pw.qweight, pw.scales, z


def _consts(pw: PackedWeight) -> dict:
    return {"BITS": pw.bits, "GROUP": pw.group_size, "SYMMETRIC": pw.symmetric}


def gemv(x2: torch.Tensor, pw: PackedWeight, config: dict | None = None) -> torch.Tensor:
    """x2 [M <= 8, K] contiguous -> [M, N] in x2's dtype. ``config`` pins BLOCK_N/BLOCK_K/SPLIT_K."""
    M, K = x2.shape
    N = pw.out_features
    y = torch.zeros(M, N, device=x2.device, dtype=torch.float32)
    block_m = max(1, triton.next_power_of_2(M))
    W, G = pw.qweight.shape[1], pw.n_groups
    if config is None:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _gemv_tuned[grid](x2, *_args(pw), y, M, N, K, W, G, x2.stride(0), BLOCK_M=block_m, **_consts(pw))
    else:
        grid = (triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])
        _gemv_kernel[grid](x2, *_args(pw), y, M, N, K, W, G, x2.stride(0), BLOCK_M=block_m, **_consts(pw), **config)
    return y.to(x2.dtype)


def gemm(x2: torch.Tensor, pw: PackedWeight, config: dict | None = None) -> torch.Tensor:
    """x2 [M, K] (rows contiguous) -> [M, N] in x2's dtype. ``config`` pins BLOCK_M/BLOCK_N/BLOCK_K."""
    M, K = x2.shape
    N = pw.out_features
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    W, G = pw.qweight.shape[1], pw.n_groups
    bucket = min(triton.next_power_of_2(M), 4096)
    precision = "ieee" if x2.dtype == torch.float32 else None   # fp32 stays fp32 (no TF32 rounding)
    if config is None:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _gemm_tuned[grid](x2, *_args(pw), y, M, N, K, W, G, x2.stride(0), y.stride(0), bucket, **_consts(pw),
                          PRECISION=precision, UPCAST_DOT=INTERPRET)
    else:
        grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]))
        _gemm_kernel[grid](x2, *_args(pw), y, M, N, K, W, G, x2.stride(0), y.stride(0), bucket, **_consts(pw),
                           PRECISION=precision, UPCAST_DOT=INTERPRET, **config)
    return y


def wq_matmul(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """y = x @ W_hat^T for x [..., K] (fp16/bf16/fp32): GEMV path up to 8 rows, GEMM path beyond."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = gemv(x2, pw) if x2.shape[0] <= GEMV_MAX_ROWS else gemm(x2, pw)
    return y.reshape(*x.shape[:-1], pw.out_features)
