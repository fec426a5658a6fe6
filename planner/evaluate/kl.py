"""KL divergence to the base model and perplexity, one window at a time so the full-vocabulary
log-softmax never holds more than one window's logits.

KL(p || q) summed over a window = sum p log p - sum p log q. The reference keeps p (float32) and
its first term; a candidate then needs one log-softmax and one dot product per position, about
half the work of materializing p * (log p - log q). The reference's own first term is computed
by the same kernels as a candidate's second, so an unmodified model scores exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scores:
    kl: float        # mean over tokens of KL(p_base || p_plan), nats
    nll: float       # mean next-token negative log-likelihood, nats
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 700.0))


@dataclass(frozen=True)
class Reference:
    """The base model's next-token distribution on one window: all of it, or its top-K.

    With top-K the tail (every other token) is one bucket of mass 1 - sum(top-K), so the KL is
    that of the (K+1)-outcome coarsening: a lower bound of the full KL that needs K floats per
    position instead of the vocabulary (a 131k-token paper-schedule stage would otherwise need
    ~25 GB of reference).
    """

    p: torch.Tensor                    # [seqlen, vocab or K] float32 probabilities
    p_log_p: float                     # sum over the window of sum p log p (tail bucket included)
    index: torch.Tensor | None = None  # [seqlen, K] token ids of the top-K, None for the full vocabulary
    tail: torch.Tensor | None = None   # [seqlen] mass outside the top-K

    @property
    def nbytes(self) -> int:
        extra = 0 if self.index is None else self.index.numel() * self.index.element_size() + self.tail.numel() * 4
        return self.p.numel() * self.p.element_size() + extra


# Positions per chunk. A chunk's float32 log-softmax (16 x a 49k vocabulary = 3 MB) stays in cache;
# a whole 512-token window's (100 MB) does not, and streaming it through memory made the KL of a
# window cost more than the lm_head matmul itself (bench/evo_speed.py, "where one candidate's time goes").
ROWS = 16


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax straight from (possibly bf16) logits, without a float32 copy first."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def cross_term(p: torch.Tensor, logq: torch.Tensor) -> float:
    return float(torch.einsum("tv,tv->t", p, logq).sum())


def _tail_log(mass: torch.Tensor) -> torch.Tensor:
    return mass.clamp_min(1e-30).log()


def _top_cross(p: torch.Tensor, tail: torch.Tensor, index: torch.Tensor, logq: torch.Tensor) -> float:
    """sum p log q over the top-K tokens plus the tail bucket."""
    logq_k = logq.gather(1, index)
    q_tail = (1.0 - logq_k.exp().sum(-1)).clamp_min(0.0)
    return cross_term(p, logq_k) + float((tail * _tail_log(q_tail)).sum())


def _ref_cross(ref: Reference, rows: slice, logq: torch.Tensor) -> float:
    """sum p log q of the reference's positions `rows` against a candidate's log-probs there."""
    if ref.index is None:
        return cross_term(ref.p[rows], logq)
    return _top_cross(ref.p[rows], ref.tail[rows], ref.index[rows], logq)


def reference(logits: torch.Tensor, topk: int | None = None) -> Reference:
    """The reference of one window, chunk by chunk with the same calls `kl_and_nll` makes, so the
    same logits give exactly the same cross term and an unmodified model scores exactly 0."""
    full = topk is None or topk >= logits.shape[-1]
    ps, index, tails, p_log_p = [], [], [], 0.0
    for s in range(0, len(logits), ROWS):
        logp = log_probs(logits[s:s + ROWS])
        if full:
            ps.append(logp.exp())
            p_log_p += cross_term(ps[-1], logp)
        else:
            index.append(logp.topk(topk, dim=-1).indices)
            ps.append(logp.gather(1, index[-1]).exp())
            tails.append((1.0 - ps[-1].sum(-1)).clamp_min(0.0))
            p_log_p += _top_cross(ps[-1], tails[-1], index[-1], logp)
    if full:
        return Reference(torch.cat(ps), p_log_p)
    return Reference(torch.cat(ps), p_log_p, torch.cat(index), torch.cat(tails))


def kl_and_nll(logits: torch.Tensor, ref: Reference, ids: torch.Tensor) -> tuple[float, float]:
    """Sums (not means) over one window: KL(p_ref || q) over all positions, NLL over next tokens;
    ROWS positions at a time."""
    cross = nll = 0.0
    T = len(logits)
    for s in range(0, T, ROWS):
        rows = slice(s, min(s + ROWS, T))
        logq = log_probs(logits[rows])
        cross += _ref_cross(ref, rows, logq)
        n = max(min(rows.stop, T - 1) - s, 0)          # the window's last position has no next token
        nll -= float(logq[:n].gather(1, ids[s + 1:s + 1 + n, None]).sum())
    return ref.p_log_p - cross, nll
