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
    """The base model's next-token distribution on one window."""

    p: torch.Tensor          # [seqlen, vocab] float32 probabilities
    p_log_p: float           # sum over the window of sum_v p log p

    @property
    def nbytes(self) -> int:
        return self.p.numel() * self.p.element_size()


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax straight from (possibly bf16) logits, without a float32 copy first."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def cross_term(p: torch.Tensor, logq: torch.Tensor) -> float:
    return float(torch.einsum("tv,tv->t", p, logq).sum())


def reference(logits: torch.Tensor) -> Reference:
    logp = log_probs(logits)
    p = logp.exp()
    return Reference(p, cross_term(p, logp))


def kl_and_nll(logits: torch.Tensor, ref: Reference, ids: torch.Tensor) -> tuple[float, float]:
    """Sums (not means) over one window: KL(p_ref || q) over all positions, NLL over next tokens."""
    logq = log_probs(logits)
    kl = ref.p_log_p - cross_term(ref.p, logq)
    nll = -float(logq[:-1].gather(1, ids[1:, None]).sum())
    return kl, nll
