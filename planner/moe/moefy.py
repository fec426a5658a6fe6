"""A real-weight MoE from a dense model (MoEfication): no pretrained MoE can be downloaded here, so
each MLP of a dense Llama-family model is split into experts and a router is fitted to them.

Per layer, on calibration tokens:
1. the MLP's neuron activations a_n(x) = silu(g_n x) * (u_n x), weighted by ||d_n|| (the norm of
   neuron n's column of down_proj), are the neurons' features: neurons that fire together cluster
   together (balanced k-means on the normalized activation profiles, E equal clusters);
2. expert e = its neurons' rows of gate/up and columns of down: the E experts together are exactly
   the dense MLP;
3. a token's score for expert e is the norm of that expert's output ||sum_{n in e} a_n(x) d_n||; a
   linear router is least-squares fitted to the tokens' centered log scores, so its top-k follows
   the experts that matter most for the token;
4. the `shared` fraction of neurons with the largest mean contribution form a shared expert that
   every token uses (Qwen2-MoE's layout; without one, Mixtral's): routing only the rest keeps the
   split model close to the dense one (on SmolLM2-135M, no shared expert and top-2 of 8 raised the
   perplexity from 15 to 32,000; top-4 of 8 to 132);
5. the routers renormalize softmax weights over the top-k, while the split MLP wants each chosen
   expert at weight 1: routed down_proj is scaled by k and the router's logits by a temperature
   chosen (from a small grid) for the best reconstruction of the dense MLP output; Qwen's sigmoid
   shared-expert gate gets zero weights (0.5) and the shared down_proj is doubled. With top_k = E
   and temperature 0 the MoE reproduces the dense model exactly (a test checks it).

The result (fused 3-D experts) is saved under `$PLANNER_CACHE/models/moefied-<key>`; the
frequencies with which experts fire come out uneven.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from planner.model.load import cache_root, fingerprint, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoefySpec:
    n_experts: int = 8
    top_k: int = 2
    shared: float = 0.5                # fraction of the MLP's neurons in a shared expert (0: none)
    tokens: int = 4096                 # calibration tokens for clustering and fitting the router
    iters: int = 12                    # balanced k-means iterations
    temperature: float | None = None   # router logit scale; None: fitted on a grid
    seed: int = 0


@torch.no_grad()
def _mlp_inputs(model: nn.Module, ids: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    """Every layer's MLP input (post-attention norm) on `ids`, [tokens, hidden] float32."""
    layers = model.model.layers
    got: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: got[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(layers)]
    try:
        for s in range(0, len(ids), batch):
            model(ids[s:s + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g).float() for g in got]


def balanced_kmeans(features: torch.Tensor, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster id per row, every cluster the same size (rows / k): cosine k-means whose assignment
    step fills clusters greedily in order of similarity."""
    n = features.shape[0]
    cap = n // k
    X = F.normalize(features, dim=1)
    C = X[torch.as_tensor(rng.choice(n, k, replace=False))]
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        sim = (X @ C.T).numpy()
        order = np.argsort(-sim, axis=None)
        assign[:] = -1
        size = np.zeros(k, dtype=np.int64)
        for flat in order:
            row, c = divmod(int(flat), k)
            if assign[row] < 0 and size[c] < cap:
                assign[row] = c
                size[c] += 1
        C = F.normalize(torch.stack([X[torch.as_tensor(assign == c)].mean(0) for c in range(k)]), dim=1)
    return assign


@dataclass
class _Layer:
    gate_up: torch.Tensor     # [E, 2I/E, H]
    down: torch.Tensor        # [E, H, I/E]  (scaled by k)
    router: torch.Tensor      # [E, H]
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None   # gate, up, 2 * down of the shared expert


@torch.no_grad()
def _split_layer(mlp: nn.Module, X: torch.Tensor, spec: MoefySpec, rng: np.random.Generator) -> _Layer:
    Wg, Wu, Wd = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float()
    A = F.silu(X @ Wg.T) * (X @ Wu.T)                                   # [T, I]
    dnorm = Wd.norm(dim=0)
    n_shared = _n_shared(Wg.shape[0], spec)
    order = torch.argsort((A.abs() * dnorm).mean(0), descending=True)
    shared, rest = order[:n_shared].sort().values, order[n_shared:]
    clusters = balanced_kmeans((A[:, rest].abs() * dnorm[rest]).T.contiguous(), spec.n_experts, spec.iters, rng)
    idx = [rest[torch.as_tensor(np.flatnonzero(clusters == e))].sort().values for e in range(spec.n_experts)]
    outs = [A[:, i] @ Wd[:, i].T for i in idx]                            # each expert's output [T, H]
    scores = torch.stack([o.norm(dim=1) for o in outs], dim=1)            # [T, E]
    target = torch.log(scores + 1e-6)
    target = target - target.mean(dim=1, keepdim=True)
    R = torch.linalg.lstsq(X, target).solution.T                          # [E, H]
    dense = A @ Wd.T - A[:, shared] @ Wd[:, shared].T                    # what the routed experts must make
    logits = X @ R.T
    temps = [spec.temperature] if spec.temperature is not None else [0.05, 0.25, 0.5, 1.0, 2.0]
    k = spec.top_k
    top = torch.topk(logits, k, dim=1)
    chosen = torch.stack(outs, 1)[torch.arange(len(X))[:, None], top.indices]       # [T, k, H]
    best = None
    for t in temps:                  # t > 0 keeps the fitted order; 0 (top_k = E only) is the dense MLP
        w = torch.softmax(t * top.values, dim=1)
        rec = (w[:, :, None] * k * chosen).sum(1)
        err = float((rec - dense).pow(2).sum() / dense.pow(2).sum())
        if best is None or err < best[0]:
            best = (err, t)
    log.info("moefy layer: router temperature %.2f, relative MLP output error %.4f", best[1], best[0])
    return _Layer(torch.stack([torch.cat([Wg[i], Wu[i]]) for i in idx]), torch.stack([k * Wd[:, i] for i in idx]),
                  best[1] * R, (Wg[shared], Wu[shared], 2 * Wd[:, shared]) if n_shared else None)


def _n_shared(intermediate: int, spec: MoefySpec) -> int:
    """Shared neurons: the fraction rounded so the rest splits into equal experts."""
    routed = intermediate - round(intermediate * spec.shared)
    return intermediate - routed // spec.n_experts * spec.n_experts


def moe_config(dense_config, spec: MoefySpec):
    """Mixtral's config (no shared expert) or Qwen2-MoE's, with the dense model's attention."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    c = dense_config
    n_shared = _n_shared(c.intermediate_size, spec)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                  hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
                  rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
                  tie_word_embeddings=c.tie_word_embeddings, num_experts_per_tok=spec.top_k,
                  bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None))
    routed = (c.intermediate_size - n_shared) // spec.n_experts
    if not n_shared:
        return MixtralConfig(intermediate_size=routed, head_dim=getattr(c, "head_dim", None), num_local_experts=spec.n_experts,
                             router_jitter_noise=0.0, sliding_window=None, **common)
    return Qwen2MoeConfig(intermediate_size=c.intermediate_size, moe_intermediate_size=routed,
                          shared_expert_intermediate_size=n_shared, num_experts=spec.n_experts, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=False, use_sliding_window=False, **common)


@torch.no_grad()
def moefy(dense: nn.Module, calib_ids: torch.Tensor, spec: MoefySpec = MoefySpec()) -> nn.Module:
    """A MoE (Mixtral, or Qwen2-MoE with a shared expert) whose MLPs are `dense`'s MLPs split into
    experts, with fitted routers."""
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(spec.seed)
    inputs = _mlp_inputs(dense, calib_ids)
    moe = AutoModelForCausalLM.from_config(moe_config(dense.config, spec)).eval()
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert not [u for u in unexpected if ".mlp." not in u], unexpected
    for layer, dense_layer, X in zip(moe.model.layers, dense.model.layers, inputs, strict=True):
        split = _split_layer(dense_layer.mlp, X, spec, rng)
        layer.mlp.experts.gate_up_proj.copy_(split.gate_up)
        layer.mlp.experts.down_proj.copy_(split.down)
        layer.mlp.gate.weight.copy_(split.router)
        if split.shared is not None:
            sh = layer.mlp.shared_expert
            for lin, W in zip((sh.gate_proj, sh.up_proj, sh.down_proj), split.shared, strict=True):
                lin.weight.copy_(W)
            layer.mlp.shared_expert_gate.weight.zero_()       # sigmoid(0) = 0.5: the doubled down_proj undoes it
    moe.tie_weights()
    return moe.requires_grad_(False)


def moefied_model(source: str = "smollm2-135m", spec: MoefySpec = MoefySpec(), dataset: str = "builtin",
                  seqlen: int = 512) -> Path:
    """A cached folder holding `moefy(source)`, fitted on the first calibration windows of the
    default split of `dataset` (the pipeline's own calibration set with the default settings)."""
    from planner.data.corpus import load_text
    from planner.data.windows import make_windows, tokenize

    loaded = load_model(source)
    key = hashlib.sha1(json.dumps({"model": fingerprint(loaded.model), "spec": asdict(spec), "dataset": dataset,
                                   "seqlen": seqlen, "v": 2}, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"moefied-{key}"
    if (out / "config.json").is_file():
        return out
    windows = make_windows(tokenize(loaded.tokenizer, load_text(dataset)), seqlen, 8192, 8192, 0)
    calib = windows.ids[windows.calib][: max(1, spec.tokens // seqlen)]
    moe = moefy(loaded.model, calib, spec)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    moe.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
