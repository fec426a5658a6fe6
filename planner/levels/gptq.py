"""GPTQ (Frantar et al., 2022): quantize W column by column, spreading each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer-local loss
||W X - W_hat X||^2, H = 2 X^T X / n. H is collected elsewhere (one per layer input); this
module only solves. One damped factorization serves every bitwidth. Natural column order
(no act-order); group grids are fitted lazily to the *updated* weights when a group starts.
"""

from __future__ import annotations

import logging

import torch

from planner.errors import PlannerError
from planner.levels.quant import QuantizedWeight, QuantSpec, dequantize_codes, grid_params, quantize_codes

log = logging.getLogger(__name__)


class HessianNotPositiveDefinite(PlannerError):
    pass


def inverse_hessian_factor(
    H: torch.Tensor, percdamp: float = 0.01, tries: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hinv, dead): Hinv = upper Cholesky factor of (H + damp I)^-1 in fp32; dead = columns with H_ii == 0.

    Factorized in float64; if Cholesky fails the damping grows tenfold, up to ``tries`` times.
    """
    H = H.double().clone()
    if H.dim() != 2 or H.shape[0] != H.shape[1] or not torch.isfinite(H).all():
        raise HessianNotPositiveDefinite(f"H must be a finite square matrix, got shape {tuple(H.shape)}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1  # a column that never sees input: any weight is exact, so it is zeroed
    mean_diag = torch.diag(H).mean()
    damp = percdamp * mean_diag
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return Hinv.float(), dead
        damp = 10 * damp if damp > 0 else 1e-6 * mean_diag
    raise HessianNotPositiveDefinite(
        f"H is not positive definite even with damping {damp / 10:.3g} ({tries} tries); collect more calibration tokens"
    )


def _gptq_columns(W: torch.Tensor, Hinv: torch.Tensor, spec: QuantSpec, block_size: int) -> QuantizedWeight:
    """The column loop for one spec; W is fp32 with dead columns already zeroed (not modified)."""
    out, cols = W.shape
    W = W.clone()
    Q = torch.zeros(out, cols, dtype=torch.uint8)
    Losses = torch.zeros(out)
    gw = spec.group_width(cols)
    scales, zeros = [], []
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gw == 0:
                # in-block columns of the group are current in W1; columns past this block
                # still owe this block's pending update, so apply it to them first
                g2 = min(col + gw, cols)
                Wg = W1[:, i : g2 - i1]
                if g2 > i2:
                    Wg = torch.cat([Wg, W[:, i2:g2] - Err1[:, :i] @ Hinv[i1:col, i2:g2]], dim=1)
                scale, zero = grid_params(Wg, spec)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i : i + 1]
            d = Hinv1[i, i]
            q = quantize_codes(w, scale, zero, spec)
            Q[:, col] = q[:, 0]
            err1 = (w - dequantize_codes(q, scale, zero)) / d
            Losses += err1[:, 0] ** 2 / 2
            W1[:, i:] -= err1 @ Hinv1[i : i + 1, i:]
            Err1[:, i] = err1[:, 0]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    log.debug("gptq %s: loss %.4g", spec, float(Losses.sum()))
    return QuantizedWeight.from_codes(Q, torch.cat(scales, 1), torch.cat(zeros, 1), spec)


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, specs: list[QuantSpec], percdamp: float = 0.01, block_size: int = 128
) -> list[QuantizedWeight]:
    """GPTQ-quantize ``W[out, in]`` for every spec, all from one factorization of ``H[in, in]``."""
    if W.dim() != 2 or W.numel() == 0 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W [out, in] and H [in, in] do not match: {tuple(W.shape)} vs {tuple(H.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("W has non-finite values")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    Hinv, dead = inverse_hessian_factor(H, percdamp)
    W = W.detach().float().clone()
    W[:, dead] = 0
    return [_gptq_columns(W, Hinv, spec, block_size) for spec in specs]


def proxy_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Layer-local output error trace((W - W_hat) H (W - W_hat)^T), in float64."""
    D = W.double() - W_hat.double()
    return float(((D @ H.double()) * D).sum())
