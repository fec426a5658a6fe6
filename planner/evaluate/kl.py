"""KL divergence to the base model and perplexity, chunked over tokens so the full-vocabulary
log-softmax never holds more than one window's logits at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scores:
    kl: float        # mean over tokens of KL(p_base || p_plan), nats
    nll: float       # mean next-token negative log-likelihood, nats
    tokens: int

    @property
    def ppl(self) -> float:
        return float(torch.tensor(self.nll).exp())


def window_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """[seqlen, vocab] float32 log-probabilities for one window."""
    out = model(ids[None], use_cache=False, logits_to_keep=0)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def kl_and_nll(logq: torch.Tensor, logp_ref: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """Sums (not means) over one window: KL(p_ref || q) over all positions, NLL over next tokens."""
    kl = (logp_ref.exp() * (logp_ref - logq)).sum()
    nll = -logq[:-1].gather(1, ids[1:, None]).sum()
    return float(kl), float(nll)
