"""What the router did on calibration tokens, and an expert's forward from its matrices.

`capture_routing` runs the model over token windows and calls `fn(block, X, idx, w)` for every MoE
block on every batch: X [tokens, hidden] the block's input, idx / w [tokens, top_k] the chosen
experts and their routing weights.

- fused experts: read from the arguments transformers passes to the experts module, so the
  routing is exactly the model's own (softmax or sigmoid, group-limited, scaled, renormalized);
- per-expert ModuleLists: the router's logits, softmax, top-k, renormalized when the config's
  `norm_topk_prob` says so (Mixtral's rule when it is absent); the block's own rule may differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.model.families import family_of
from planner.moe.experts import MoeBlock

RoutingFn = Callable[[MoeBlock, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class ExpertMatrices:
    """One expert as math: out = down(act(gate x) * up x); gate/up/down are [out, in] views."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]

    def hidden(self, X: torch.Tensor) -> torch.Tensor:
        """The down projection's input."""
        return self.act(F.linear(X, self.gate)) * F.linear(X, self.up)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(X), self.down)


def _act(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    act = getattr(module, "act_fn", None)
    return act if act is not None else F.silu


_ROLE = {"gate_up_proj": "gate_up", "gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up",
         "down_proj": "down", "w2": "down"}


def expert_matrices(model: nn.Module, mb: MoeBlock, j: int,
                    weights: dict[str, torch.Tensor] | None = None) -> ExpertMatrices:
    """Expert j of `mb`, its matrices from the model or, per unit name, from `weights`."""
    weights = weights or {}
    experts = model.get_submodule(mb.experts)
    mats: dict[str, torch.Tensor] = {}
    for u in mb.units[j]:
        attr = u.name.rsplit(".", 1)[1]
        base = getattr(experts, attr)[j] if mb.fused else model.get_submodule(u.name).weight
        mats[_ROLE[attr]] = weights.get(u.name, base)
    if "gate_up" in mats:     # transformers' layout: the gate rows, then the up rows
        mats["gate"], mats["up"] = mats.pop("gate_up").chunk(2, dim=0)
    return ExpertMatrices(mats["gate"], mats["up"], mats["down"], _act(experts if mb.fused else experts[j]))


def _routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    return vals[0], vals[1], vals[2]


@contextmanager
def routing_hooks(model: nn.Module, blocks: list[MoeBlock], fn: RoutingFn) -> Iterator[None]:
    """Hooks that report every MoE block's routing to `fn` while the context is open."""
    fam = family_of(model.config.model_type)
    renorm = bool(getattr(model.config, "norm_topk_prob", True))
    handles = []
    for mb in blocks:
        if mb.fused:
            def pre(_m, args, kwargs, mb=mb):
                X, idx, w = _routing_args(args, kwargs)
                fn(mb, X.reshape(-1, X.shape[-1]), idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1]))
            handles.append(model.get_submodule(mb.experts).register_forward_pre_hook(pre, with_kwargs=True))
            continue
        seen: dict[str, torch.Tensor] = {}

        def block_pre(_m, args, seen=seen):
            seen["X"] = args[0].reshape(-1, args[0].shape[-1])

        def router_out(_m, _args, out, mb=mb, seen=seen):
            logits = out[0] if isinstance(out, tuple) else out
            probs = torch.softmax(logits.reshape(-1, mb.n_experts).float(), dim=-1)
            w, idx = torch.topk(probs, mb.top_k, dim=-1)
            fn(mb, seen.pop("X"), idx, w / w.sum(-1, keepdim=True) if renorm else w)
        handles.append(model.get_submodule(mb.path).register_forward_pre_hook(block_pre))
        handles.append(model.get_submodule(f"{mb.path}.{fam.moe.routers[0]}").register_forward_hook(router_out))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_routing(model: nn.Module, blocks: list[MoeBlock], calib_ids: torch.Tensor, fn: RoutingFn,
                    batch_size: int = 4, progress=None) -> None:
    """Run `calib_ids` through the model, reporting every MoE block's routing to `fn`."""
    with routing_hooks(model, blocks, fn):
        for start in range(0, len(calib_ids), batch_size):
            model(calib_ids[start:start + batch_size], use_cache=False)
            if progress is not None:
                progress.update(min(batch_size, len(calib_ids) - start))


def routed(idx: torch.Tensor, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token indices, routing weights) of the tokens routed to expert j."""
    tok, slot = torch.nonzero(idx == j, as_tuple=True)
    return tok, w[tok, slot]
