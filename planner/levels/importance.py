"""Importance-weighted rounding for any weight format (`grids.Format`).

The layer-local loss of a rounding error dW is tr(dW H dW^T) with H = 2 X^T X / n, the Hessian the
levels DB already collects. Three ways to use it, from cheapest to strongest:

- diagonal importance d_j = H_jj / 2 (mean squared activation of input column j): scales and
  mins are searched to minimize sum_j d_j (w_ij - w_hat_ij)^2 (`grids.fit_groups`), and a k-means
  codebook is fitted with the same weights;
- AWQ-style per-input-channel scaling: W' = W diag(s), s_j = d_j^(alpha/2) (normalized), with
  alpha chosen by that same weighted error; s is stored in fp16 and decoding divides by it;
- GPTQ over any format (`gptq_format`): the column loop of Frantar et al. needs only the
  quantize-one-column step, so it runs with super-block scales and non-uniform tables too. Group
  (or super-block) parameters are fitted, importance-weighted, on the updated weights when their
  span starts, exactly as GPTQ fits its group grids lazily.
"""

from __future__ import annotations

import torch

from planner.levels.gptq import inverse_hessian_factor
from planner.levels.grids import Format, Grid, Params, _groups, dequantize, fit_span, nf_table, quantize_with

AWQ_ALPHAS = (0.25, 0.5, 0.75, 1.0)


def diag_importance(H: torch.Tensor) -> torch.Tensor:
    """d_j = H_jj / 2: the mean squared activation of input column j (float64)."""
    return torch.diagonal(H).double() / 2


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, imp: torch.Tensor | None) -> float:
    """sum_ij d_j (W_ij - W_hat_ij)^2 (d = 1 without importance)."""
    D = (W.double() - W_hat.double()) ** 2
    return float(D.sum() if imp is None else (D * imp.double()).sum())


def kmeans_table(W: torch.Tensor, imp: torch.Tensor | None, fmt: Format, iters: int = 15,
                 sample: int = 1 << 16, seed: int = 0) -> torch.Tensor:
    """A 2**bits codebook (fp16, ascending) for weights normalized by their group's absmax,
    fitted by importance-weighted Lloyd iterations from the normal-float table."""
    Xg, valid = _groups(W.double(), fmt.group_width(W.shape[1]))
    amax = Xg.abs().amax(-1, keepdim=True)
    keep = valid & (amax > 0)
    r = (Xg / torch.where(amax > 0, amax, torch.ones_like(amax)))[keep]
    imp_g = torch.ones(valid.shape, dtype=torch.float64) if imp is None else _groups(imp[None].double(),
                                                                                     Xg.shape[-1])[0][0]
    wt = (imp_g * amax ** 2)[keep]
    if r.numel() > sample:
        idx = torch.randperm(r.numel(), generator=torch.Generator().manual_seed(seed))[:sample]
        r, wt = r[idx], wt[idx]
    c = nf_table(fmt.bits)
    for _ in range(iters):
        k = torch.bucketize(r, (c[1:] + c[:-1]) / 2)
        num = torch.zeros_like(c).index_add_(0, k, wt * r)
        den = torch.zeros_like(c).index_add_(0, k, wt)
        c = torch.where(den > 0, num / den.clamp_min(1e-300), c).sort().values
    return c.to(torch.float16).sort().values


def shared_factor(H: torch.Tensor | None, percdamp: float, needed: bool):
    """inverse_hessian_factor(H) once for all GPTQ levels of a unit (None when none needs it)."""
    return inverse_hessian_factor(H, percdamp) if needed and H is not None else None


def gptq_format(W: torch.Tensor, H: torch.Tensor, fmt: Format, values: torch.Tensor, imp: torch.Tensor | None,
                percdamp: float = 0.01, block_size: int = 128,
                factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, Params]:
    """GPTQ with `fmt`'s parameters and table: (codes [out, in] int64, the row's Params).
    `factor` = inverse_hessian_factor(H, percdamp), when the caller shares it between levels."""
    Hinv, dead = factor if factor is not None else inverse_hessian_factor(H, percdamp)
    W = W.detach().float().clone()
    W[:, dead] = 0
    out, cols = W.shape
    gw = fmt.group_width(cols)
    span = min(gw * fmt.super_groups if fmt.double else gw, cols)
    B = span * max(1, block_size // span)        # lazy blocks hold whole spans
    vf = values.float()
    mid = (vf[1:] + vf[:-1]) / 2
    off = 2 ** (fmt.bits - 1) if fmt.symmetric else 0
    Q = torch.zeros(out, cols, dtype=torch.long)
    parts: list[Params] = []
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % span == 0:
                s2 = min(col + span, cols)
                p = fit_span(W1[:, i:s2 - i1], None if imp is None else imp[col:s2], fmt, values, search=True)
                parts.append(p)
                start, S, M = col, p.scale.T.contiguous(), p.mn.T.contiguous()
                inv = torch.where(S == 0, torch.ones_like(S), S).reciprocal()
            g = (col - start) // gw
            w = W1[:, i]
            r = (w + M[g]) * inv[g]
            if fmt.grid is Grid.INT:        # the column's nearest codes, decoded exactly as dequantize does
                q = r.round_().add_(off).clamp_(0, fmt.levels - 1)
                w_hat = S[g] * (q - off)
                q = q.long()
            else:
                q = torch.bucketize(r, mid)
                w_hat = S[g] * vf[q]
            if fmt.has_min:
                w_hat = w_hat - M[g]
            Q[:, col] = q
            err = (w - w_hat) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, Params.cat(parts)


def rtn_format(W: torch.Tensor, fmt: Format, values: torch.Tensor, imp: torch.Tensor | None,
               search: bool) -> tuple[torch.Tensor, Params]:
    """Every group at once: fit (min-max, or the weighted search), then nearest codes."""
    p = fit_span(W, imp, fmt, values, search)
    return quantize_with(W, p, fmt, values), p


def awq_scales(W: torch.Tensor, imp: torch.Tensor, fmt: Format, values: torch.Tensor,
               alphas: tuple[float, ...] = AWQ_ALPHAS) -> torch.Tensor:
    """Per-input-column scales s (fp16-exact, float32 [in]) minimizing the importance-weighted error
    of quantizing W diag(s) and decoding by 1/s; all ones when no alpha helps."""
    d = imp.double().clamp_min(1e-12)
    best_s, best_err = torch.ones(W.shape[1]), None
    for alpha in (0.0, *alphas):
        s = d ** (alpha / 2)
        s = (s / (s.max() * s.min()).sqrt()).to(torch.float16).float()
        Ws = W.float() * s
        q, p = rtn_format(Ws, fmt, values, imp.double() / s.double() ** 2, search=True)
        err = weighted_error(W, dequantize(fmt, q, p.scale, p.mn, values.float()) / s, imp)
        if best_err is None or err < best_err:
            best_s, best_err = s, err
    return best_s
