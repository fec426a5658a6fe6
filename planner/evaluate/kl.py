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


def reference(logits: torch.Tensor, topk: int | None = None) -> Reference:
    logp = log_probs(logits)
    if topk is None or topk >= logp.shape[-1]:
        p = logp.exp()
        return Reference(p, cross_term(p, logp))
    index = logp.topk(topk, dim=-1).indices
    p = logp.gather(1, index).exp()
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    return Reference(p, _top_cross(p, tail, index, logp), index, tail)


def kl_and_nll(logits: torch.Tensor, ref: Reference, ids: torch.Tensor) -> tuple[float, float]:
    """Sums (not means) over one window: KL(p_ref || q) over all positions, NLL over next tokens."""
    logq = log_probs(logits)
    cross = cross_term(ref.p, logq) if ref.index is None else _top_cross(ref.p, ref.tail, ref.index, logq)
    nll = -float(logq[:-1].gather(1, ids[1:, None]).sum())
    return ref.p_log_p - cross, nll
