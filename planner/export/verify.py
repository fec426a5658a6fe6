"""Does an exported model compute what the planner measured? Compare two models on token windows
with the evaluator's own KL / perplexity arithmetic (planner.evaluate.kl).

    c = compare_models(planned_model, reloaded_model, windows.ids[windows.heldout])
    c.kl        # mean KL(reference || model) per token, nats
    c.ppl_ref, c.ppl
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from planner.evaluate.kl import Scores, kl_and_nll, reference


@dataclass(frozen=True)
class Comparison:
    kl: float
    ppl_ref: float
    ppl: float
    tokens: int


@torch.no_grad()
def compare_models(ref_model: nn.Module, model: nn.Module, ids: torch.Tensor) -> Comparison:
    """KL of `model` to `ref_model` and both perplexities on `ids` [windows, seqlen], window by window."""
    kl = nll_ref = nll = 0.0
    for w in ids:
        ref_logits = ref_model(w[None], use_cache=False).logits[0].float()
        ref = reference(ref_logits)
        k, n = kl_and_nll(model(w[None], use_cache=False).logits[0].float(), ref, w)
        _, n_ref = kl_and_nll(ref_logits, ref, w)
        kl, nll, nll_ref = kl + k, nll + n, nll_ref + n_ref
    T = ids.shape[1]
    s = Scores(kl / ids.numel(), nll / (len(ids) * (T - 1)), ids.numel())
    s_ref = Scores(0.0, nll_ref / (len(ids) * (T - 1)), ids.numel())
    return Comparison(s.kl, s_ref.ppl, s.ppl, s.tokens)


def planned_model(base: nn.Module, db, plan, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of `base` with the plan's dequantized weights (what the evaluator measures)."""
    import copy

    model = copy.deepcopy(base).to(dtype)
    for unit, level in plan.as_dict().items():
        model.get_submodule(unit).weight.data = db.weight(unit, level, dtype).clone()
    return model.eval()
