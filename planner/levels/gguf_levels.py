"""The `gguf` builder: levels that are exactly a GGUF tensor of a llama.cpp type, stored as its blocks.

    levels:
      - method: gguf
        types: [Q2_K, Q3_K, Q4_K, IQ4_XS, Q4_0, Q4_1]   # llama.cpp type names
        rounding: diag                                   # or a list; see below

A level `gguf-q4_k-diag` holds, per unit, the bytes llama.cpp keeps for that tensor (``blocks``
[out, row bytes], llama.cpp's row layout) and decodes them with gguf-py's dequantizer, so a plan
over these levels is written to a GGUF file losslessly (`GGUFWeight.gguf_type` / ``.blocks``).
Rows that are not a multiple of the type's block get the type llama-quantize falls back to
(Q2_K, Q3_K -> Q4_0, IQ types -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; the default
model's 576-wide rows fit only the 32-blocks): the level's cost is that type's, exactly.

Roundings: minmax / mse / diag / gptq run the planner's own quantizers over the type's layout
(`GGUF_FORMATS`: each type is a `grids.Format`, then packed into its blocks); ``ref`` is gguf-py's
port of llama.cpp's reference quantizer (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: what llama-quantize writes
without an importance matrix); ``llama`` calls llama.cpp's own quantizer (`ggml_quantize_chunk` in
libggml, any type, the importance matrix = diag(H)/2) when $PLANNER_LIBGGML names that library.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from planner.levels import importance as imp_
from planner.levels.formats import FORMAT_ROUNDINGS, Rounding, _enum_list, _need
from planner.levels.gguf_blocks import GGUF_FORMATS, encode_blocks
from planner.levels.llamacpp_lib import ggml_quantize, libggml
from planner.levels.registry import Builder, BuildOptions, register_builder

GGUF_LEVELS_VERSION = 3
# llama.cpp's tensor_type_fallback (llama-quant.cpp): the type used when a row is not a multiple of the block
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
            "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
            "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL"}
NOMINAL_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5,
                "Q6_K": 6, "IQ4_NL": 4, "IQ4_XS": 4, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 2, "IQ3_XXS": 3,
                "IQ3_S": 3, "IQ1_S": 1, "IQ1_M": 1, "TQ1_0": 2, "TQ2_0": 2, "MXFP4": 4}
REF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")   # gguf-py can quantize these (llama.cpp's _ref)


def block_of(name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


def stored_type(name: str, in_features: int) -> str:
    """The type llama.cpp stores for a tensor of rows of `in_features` when `name` is asked for."""
    if in_features % block_of(name)[0] == 0:
        return name
    fb = FALLBACK.get(name)
    if fb is None or in_features % block_of(fb)[0]:
        raise ValueError(f"no GGUF type holds rows of {in_features} weights as {name}")
    return fb


@dataclass(frozen=True)
class GGUFSpec:
    type: str                  # the requested llama.cpp type, e.g. "Q4_K"
    rounding: Rounding = Rounding.DIAG

    builder = "gguf"

    @property
    def id(self) -> str:
        return f"gguf-{self.type.lower()}-{self.rounding.value}"

    def stored_type(self, shape: tuple[int, int]) -> str:
        return stored_type(self.type, shape[1])

    @property
    def bits(self) -> int:
        return NOMINAL_BITS[self.type]

    def code_bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] * NOMINAL_BITS[self.stored_type(shape)]

    def nbytes(self, shape: tuple[int, int]) -> int:
        bs, ts = block_of(self.stored_type(shape))
        return shape[0] * (shape[1] // bs) * ts

    def stored_bits(self, shape: tuple[int, int]) -> int:
        return 8 * self.nbytes(shape)

    def to_json(self) -> dict:
        return {"method": "gguf", "type": self.type, "rounding": self.rounding.value, "version": GGUF_LEVELS_VERSION}


@dataclass
class GGUFWeight:
    """One unit as a GGUF tensor: ``blocks`` uint8 [out, row bytes] of type ``gguf_type``."""

    gguf_type: str
    shape: tuple[int, int]
    blocks: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = gguf.quants.dequantize(self.blocks.numpy(), gguf.GGMLQuantizationType[self.gguf_type])
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        qtype = int(gguf.GGMLQuantizationType[self.gguf_type])
        return {f"{prefix}.blocks": self.blocks, f"{prefix}.meta": torch.tensor([*self.shape, qtype])}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> GGUFWeight:
        out, inp, qtype = (int(v) for v in tensors[f"{prefix}.meta"].tolist())
        name = gguf.GGMLQuantizationType(qtype).name
        w = cls(name, (out, inp), tensors[f"{prefix}.blocks"])
        bs, ts = block_of(name)
        if tuple(w.blocks.shape) != (out, inp // bs * ts) or inp % bs:
            raise ValueError(f"tensors under {prefix!r} do not hold a {name} tensor of shape {(out, inp)}")
        return w


# --- quantizing --------------------------------------------------------------------------------
def quantize_gguf(W: torch.Tensor, name: str, rounding: Rounding, H: torch.Tensor | None = None,
                  damp: float = 0.01, block_size: int = 128, factor=None) -> GGUFWeight:
    """W [out, in] as the GGUF tensor llama.cpp would store when asked for type `name`."""
    W = W.detach().float()
    typ = stored_type(name, W.shape[1])
    imp = imp_.diag_importance(H) if H is not None and rounding in (Rounding.DIAG, Rounding.GPTQ,
                                                                      Rounding.LLAMA) else None
    if rounding is Rounding.LLAMA:
        blocks = ggml_quantize(W, typ, imp)
    elif rounding is Rounding.REF:
        blocks = gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType[typ])
    else:
        fmt = GGUF_FORMATS[typ]
        values = fmt.values()
        if rounding is Rounding.GPTQ:
            q, p = imp_.gptq_format(W, H, fmt, values, imp, percdamp=damp, block_size=block_size, factor=factor)
        else:
            q, p = imp_.rtn_format(W, fmt, values, imp, search=rounding is not Rounding.MINMAX)
        blocks = encode_blocks(typ, q, p)
    return GGUFWeight(typ, (int(W.shape[0]), int(W.shape[1])), torch.from_numpy(np.ascontiguousarray(blocks)))


# --- the builder -------------------------------------------------------------------------------
_KEYS = {"method", "types", "rounding"}
_ROUNDINGS = (*FORMAT_ROUNDINGS, Rounding.REF, Rounding.LLAMA)


def parse_gguf(fam: dict, at: str) -> list[GGUFSpec]:
    extra = set(fam) - _KEYS
    _need(not extra, at, f"unknown key(s) {sorted(extra)}; allowed: {', '.join(sorted(_KEYS))}")
    types = fam.get("types")
    types = [types] if isinstance(types, str) else types
    _need(isinstance(types, list) and types and all(isinstance(t, str) for t in types), at,
          "types must be a GGUF type name or a list of them, e.g. [Q3_K, Q4_K, Q4_0]")
    types = [t.upper() for t in types]
    roundings = _enum_list(fam.get("rounding", "diag"), Rounding, at, "rounding", _ROUNDINGS)
    specs = []
    for t, r in itertools.product(types, roundings):
        _need(t in NOMINAL_BITS, at, f"unknown or unsupported GGUF type {t!r}; known: {', '.join(NOMINAL_BITS)}")
        if r is Rounding.REF:
            _need(t in REF_TYPES, at, f"rounding ref (gguf-py's quantizer) exists for {', '.join(REF_TYPES)}, not {t}")
        elif r is Rounding.LLAMA:
            _need(libggml() is not None, at, "rounding llama needs llama.cpp's libggml-base: set PLANNER_LIBGGML")
        else:
            _need(t in GGUF_FORMATS and all(f in GGUF_FORMATS for f in (FALLBACK.get(t, t),)), at,
                  f"rounding {r.value} covers {', '.join(GGUF_FORMATS)}; {t} needs rounding llama")
        specs.append(GGUFSpec(t, r))
    return specs


def build_gguf(W: torch.Tensor, H: torch.Tensor | None, specs: list[GGUFSpec], opt: BuildOptions) -> dict:
    """Every spec of one unit; specs that store the same type (fallbacks) are quantized once."""
    done: dict[tuple[str, Rounding], GGUFWeight] = {}
    out = {}
    factor = imp_.shared_factor(H, opt.damp, any(s.rounding is Rounding.GPTQ for s in specs))
    for s in specs:
        key = (s.stored_type(tuple(W.shape)), s.rounding)
        if key in done:      # a copy: a unit file must not hold two names for one buffer
            out[s.id] = GGUFWeight(done[key].gguf_type, done[key].shape, done[key].blocks.clone())
        else:
            out[s.id] = done[key] = quantize_gguf(W, s.type, s.rounding, H, opt.damp, opt.block_size, factor)
    return out


register_builder(Builder("gguf", parse_gguf, build_gguf, GGUFWeight.from_tensors, needs_hessian=True))
