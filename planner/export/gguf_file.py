"""Write a llama-architecture GGUF file whose block linears carry the plan's per-tensor types.

Metadata comes from the transformers config and a BPE (`gpt2`-style) tokenizer.json; q/k rows are
permuted the way llama.cpp's converter does (transformers undoes it on load). Each planned tensor:

    raw       a `gguf` level: its stored blocks are the tensor, byte for byte (lossless, any type)
    exact     a `format` level in a GGUF type's layout: its codes and scale fields packed into that
              type's blocks (`gguf_blocks.encode_blocks`; decodes bit for bit alike); or an integer
              level whose grid is a GGUF grid (group size a multiple of 32, same symmetry): the
              levels DB's codes and fp16 scales become the blocks directly (Q4_0, Q5_0, Q8_0 exact;
              Q4_1 / Q5_1 store the minimum -scale*zero in fp16, which rounds it by <= 2^-11)
    requant   a 32-block type the `gguf` package can quantize: it re-quantizes the dequantized level
    f16       a K-quant (Q2_K, Q3_K, Q6_K): gguf 0.19 cannot write those blocks, so the dequantized
              level is stored as F16 (llama-quantize with the tensor-type file gives it its type)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from planner.export.base import BadExport
from planner.levels.formats import FormatWeight
from planner.levels.gguf_blocks import GGUF_FORMATS, encode_blocks
from planner.levels.gguf_levels import GGUFWeight
from planner.levels.grids import Params
from planner.levels.quant import QuantizedWeight
from planner.levels.registry import Stored

_EXACT = {"Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True)}
_WRITABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
_LLAMA_TYPES = {"llama", "mistral", "smollm3", "granite"}


@dataclass(frozen=True)
class PlannedTensor:
    name: str                 # GGUF name, "blk.3.attn_q.weight"
    stored: Stored            # the planned level as the levels DB holds it
    type: str                 # planned GGUF type
    permute_heads: int = 0    # >0: permute rows like llama.cpp does for attn_q / attn_k


def row_permutation(rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's rotary-layout permutation of q/k rows (convert_hf_to_gguf `permute`)."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def encode_exact(qw: QuantizedWeight, type_name: str) -> np.ndarray | None:
    """GGUF blocks [out, bytes] built from the DB's codes, or None when the grids differ."""
    bits, symmetric = _EXACT.get(type_name, (0, False))
    gs, (out, inp) = qw.spec.group_size, qw.shape
    if qw.spec.bits != bits or qw.spec.symmetric != symmetric or gs % 32 or inp % 32:
        return None
    nb = inp // 32
    g = (np.arange(nb) * 32) // gs if gs > 0 else np.zeros(nb, dtype=np.int64)
    q = qw.codes_unpacked().numpy().reshape(out * nb, 32)
    d = qw.scales.numpy()[:, g].reshape(-1, 1)
    z = qw.zeros_unpacked().numpy()[:, g].reshape(-1, 1)
    parts = [d.astype(np.float16).view(np.uint8)]
    if not symmetric:
        parts.append((-(d.astype(np.float32) * z)).astype(np.float16).view(np.uint8))
    if bits == 8:
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if bits == 5:
            parts.append(np.packbits(q >> 4, axis=-1, bitorder="little"))
        lo = q & 0x0F
        parts.append(lo[:, :16] | (lo[:, 16:] << 4))
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def encode_format(fw: FormatWeight, type_name: str) -> np.ndarray | None:
    """GGUF blocks [out, bytes] of a format level in that type's layout, or None when it is not."""
    block = GGUF_FORMATS[type_name].group_size * max(1, GGUF_FORMATS[type_name].super_groups) \
        if type_name in GGUF_FORMATS else 0
    if not block or fw.fmt != GGUF_FORMATS[type_name] or fw.colscale.numel() or fw.shape[1] % block:
        return None
    q, sc, mc, d, dmin = fw.fields()
    return encode_blocks(type_name, q, Params(None, None, sc, mc, d, dmin))


def gguf_blocks(stored: Stored, type_name: str) -> tuple[np.ndarray, str] | None:
    """(blocks [out, row bytes], how) of a level that is already a `type_name` tensor, losslessly."""
    if isinstance(stored, GGUFWeight):
        return (stored.blocks.numpy(), "raw") if stored.gguf_type == type_name else None
    if isinstance(stored, FormatWeight):
        blocks = encode_format(stored, type_name)
    elif isinstance(stored, QuantizedWeight):
        blocks = encode_exact(stored, type_name)
    else:
        blocks = None
    return None if blocks is None else (blocks, "exact")


def encode(t: PlannedTensor) -> tuple[np.ndarray, gguf.GGMLQuantizationType, str]:
    """(data, GGUF type, how) of one planned tensor, rows already permuted when asked."""
    lossless = gguf_blocks(t.stored, t.type)
    perm = row_permutation(t.stored.shape[0], t.permute_heads) if t.permute_heads else None
    if lossless is not None:
        blocks, how = lossless
        return (blocks[perm] if perm is not None else blocks), gguf.GGMLQuantizationType[t.type], how
    w = t.stored.dequantize(torch.float32).numpy()
    w = w[perm] if perm is not None else w
    if t.type in _WRITABLE:
        qtype = gguf.GGMLQuantizationType[t.type]
        return gguf.quants.quantize(w, qtype), qtype, "requant"
    return w.astype(np.float16), gguf.GGMLQuantizationType.F16, "f16"


def _tokenizer_fields(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise BadExport(f"GGUF writing supports BPE tokenizers only (this one is {model.get('type')!r}): "
                        "use llama.cpp's convert_hf_to_gguf.py with the tensor-type file instead")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    special = set(tokenizer.all_special_ids) | {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.USER_DEFINED if i not in by_id else gguf.TokenType.NORMAL for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    writer.add_add_bos_token(False)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise BadExport(f"GGUF writing supports plain RoPE only (this model uses {params.get('rope_type')!r})")
    return float(theta if theta is not None else params.get("rope_theta", 10000.0))


def write_gguf(path: Path, model: nn.Module, tokenizer, planned: list[PlannedTensor], float_type: str = "F16") -> dict:
    """Write `path`; returns {gguf name: how it was encoded} for the planned tensors."""
    cfg = model.config
    if cfg.model_type not in _LLAMA_TYPES:
        raise BadExport(f"GGUF writing supports llama-architecture models, not {cfg.model_type!r}: "
                        "the tensor-type file still applies to llama.cpp's own conversion")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(Path(getattr(cfg, "_name_or_path", "") or "model").name or "model")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if float_type == "F16" else gguf.LlamaFileType.ALL_F32)
    _tokenizer_fields(w, tokenizer, cfg.vocab_size)

    fdt = np.float16 if float_type == "F16" else np.float32
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block_norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].float().numpy().astype(fdt))
    how = {}
    planned_by_block: dict[int, list[PlannedTensor]] = {}
    for t in planned:
        planned_by_block.setdefault(int(t.name.split(".")[1]), []).append(t)
    for i in range(cfg.num_hidden_layers):
        for hf, gg in block_norms.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[f"model.layers.{i}.{hf}.weight"].float().numpy())
        for t in planned_by_block.get(i, []):
            data, qtype, how[t.name] = encode(t)
            w.add_tensor(t.name, data, raw_dtype=qtype)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].float().numpy())
    if not cfg.tie_word_embeddings:
        w.add_tensor(names["lm_head.weight"], sd["lm_head.weight"].float().numpy().astype(fdt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return how
