"""Tiny random MoE models of every supported class (hidden 32, 4 experts, 2 layers), saved with the
tiny Llama's tokenizer so the pipeline loads them by folder. Init std 0.2 (not 0.02): quantization
then moves the logits enough for KL comparisons to mean something."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

COMMON = dict(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.2, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
            num_key_value_heads=4, moe_intermediate_size=48, n_routed_experts=4, n_shared_experts=1,
            first_k_dense_replace=1, intermediate_size=64)

CLASSES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


def config(kind: str):
    import transformers as tf

    k = dict(COMMON)
    if kind == "mixtral":
        return tf.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **k)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                                 num_experts=4, num_experts_per_tok=2, **k)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                 head_dim=8, **k)
    if kind == "olmoe":
        return tf.OlmoeConfig(intermediate_size=48, num_experts=4, num_experts_per_tok=2, **k)
    k.update(_MLA)
    if kind == "deepseek_v2":
        return tf.DeepseekV2Config(q_lora_rank=None, num_experts_per_tok=2, **k)
    if kind == "deepseek_v3":
        return tf.DeepseekV3Config(q_lora_rank=24, num_experts_per_tok=2, **k)
    raise ValueError(kind)


def build(kind: str, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(kind)).eval().requires_grad_(False)


def save(kind: str, out: Path, tokenizer_dir: Path, model: nn.Module | None = None) -> Path:
    """The model (built if not given) and the tokenizer files of `tokenizer_dir`, in `out`."""
    shutil.rmtree(out, ignore_errors=True)
    (model or build(kind)).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


class LegacyExperts(nn.ModuleList):
    """Mixtral's pre-transformers-5 layout: a ModuleList of w1/w3/w2 MLPs, same math as the fused one."""

    def __init__(self, fused: nn.Module):
        E, two_i, h = fused.gate_up_proj.shape
        mlps = []
        for j in range(E):
            m = nn.Module()
            m.w1, m.w3, m.w2 = (nn.Linear(h, two_i // 2, bias=False), nn.Linear(h, two_i // 2, bias=False),
                                nn.Linear(two_i // 2, h, bias=False))
            gate, up = fused.gate_up_proj.data[j].chunk(2, dim=0)
            m.w1.weight.data, m.w3.weight.data, m.w2.weight.data = gate.clone(), up.clone(), fused.down_proj.data[j].clone()
            m.act_fn = fused.act_fn
            mlps.append(m)
        super().__init__(mlps)

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for j, m in enumerate(self):
            tok, slot = torch.nonzero(top_k_index == j, as_tuple=True)
            if tok.numel():
                X = hidden[tok]
                y = m.w2(m.act_fn(m.w1(X)) * m.w3(X)) * top_k_weights[tok, slot, None]
                out.index_add_(0, tok, y.to(out.dtype))
        return out


def legacy_mixtral(seed: int = 0) -> nn.Module:
    model = build("mixtral", seed)
    for layer in model.model.layers:
        layer.mlp.experts = LegacyExperts(layer.mlp.experts)
    return model
