"""Torch reference: dequantize a `PackedWeight` and multiply. Slow, obviously right; every kernel is
tested against it. Dequantization is done in fp32 (``scale * (q - zero)`` is exact there for the
fp16 scales and small integers involved) and cast once to the activation dtype, which is exactly
what the planner's fake-quant evaluator feeds its bf16 model.
"""

from __future__ import annotations

import torch

from kernels.format import PackedWeight


def dequantize(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat [N, K] in ``dtype``."""
    K, gs = pw.in_features, pw.group_size
    scale = pw.scales.float().repeat_interleave(gs, dim=1)[:, :K]
    zero = pw.zero_points().float().repeat_interleave(gs, dim=1)[:, :K]
    return (scale * (pw.codes().float() - zero)).to(dtype)


def matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W_hat^T (+ bias) for x [..., K], in x's dtype."""
    return torch.nn.functional.linear(x, dequantize(pw, x.dtype), bias)
