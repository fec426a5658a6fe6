"""Which GGUF tensor type carries a planner level in llama.cpp, and what that type really costs.

A level (bits, symmetric, group size) maps to the GGUF type with the same nominal bits whose block
layout fits the tensor's rows (llama.cpp quantizes each row in blocks: 32 weights for the legacy
types, 256 for the K-quants; a row length that is not a multiple falls back to another type):

    bits  symmetric       asymmetric      block  real bpw (GGUF, per weight)
    2     Q2_K            Q2_K            256    2.625
    3     Q3_K            Q3_K            256    3.4375
    4     Q4_0            Q4_1            32     4.5 / 5.0
    5     Q5_0            Q5_1            32     5.5 / 6.0
    6     Q6_K            Q6_K            256    6.5625
    8     Q8_0            Q8_0            32     8.5

The 32-block types are preferred where they exist because the `gguf` package can write them (so
the exported GGUF file holds exactly the types of the tensor-type file) and because a planner
level with group size a multiple of 32 lies on their grid. 1- and 7-bit levels have no GGUF type.
When the rows do not fit (e.g. 576 columns are not a multiple of 256), `gguf_type` returns what
llama-quantize would fall back to, marked `exact=False`: such a level is not deployable as planned.

Levels that already are GGUF tensors need no mapping (`native_type`): a `gguf` level stores the blocks
of its type (or of llama-quantize's fallback for its rows), and a `format` level whose format is a
GGUF type's layout (`gguf_blocks.GGUF_FORMATS`: int4 g32 symmetric = Q4_0, int4 g32 with super-block
6-bit scales = Q4_K, iq4nl g32 = IQ4_NL, ...) packs into that type's blocks losslessly. Other
format levels (nf / k-means grids, AWQ column scales, other group sizes) have no GGUF type.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from planner.levels.formats import FormatSpec
from planner.levels.gguf_blocks import GGUF_FORMATS
from planner.levels.gguf_levels import GGUFSpec, stored_type

_TABLE: dict[int, tuple[str, str]] = {  # bits -> (symmetric type, asymmetric type)
    2: ("Q2_K", "Q2_K"), 3: ("Q3_K", "Q3_K"), 4: ("Q4_0", "Q4_1"), 5: ("Q5_0", "Q5_1"), 6: ("Q6_K", "Q6_K"),
    8: ("Q8_0", "Q8_0"),
}
# what llama-quantize uses when a row length is not a multiple of the type's block
# (llama.cpp's llama_tensor_get_type fallbacks for K-quants)
_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class GGUFChoice:
    type: str          # GGUF type name, e.g. "Q3_K"
    bpw: float         # stored bits per weight of that type (block bytes * 8 / block size)
    block: int         # weights per block along a row
    exact: bool        # True when the type has the level's nominal bits and fits the rows
    note: str = ""     # why not exact


def type_bpw(name: str) -> float:
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return nbytes * 8 / block


def type_block(name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]


def gguf_type(bits: int, symmetric: bool, in_features: int) -> GGUFChoice | None:
    """The GGUF type for a level on a tensor with rows of `in_features` weights (None: no type at all)."""
    if bits not in _TABLE:
        near = min(_TABLE, key=lambda b: (abs(b - bits), -b))
        name = _TABLE[near][0 if symmetric else 1]
        fits = in_features % type_block(name) == 0
        return _choice(name, False, f"GGUF has no {bits}-bit type; the nearest is {name}") if fits else None
    name = _TABLE[bits][0 if symmetric else 1]
    if in_features % type_block(name) == 0:
        return _choice(name, True, "")
    fallback = _FALLBACK.get(name)
    if fallback is None or in_features % type_block(fallback):
        return None
    return _choice(fallback, False, f"{name} needs rows that are a multiple of {type_block(name)} weights "
                                    f"(this tensor has {in_features}); llama-quantize falls back to {fallback}")


def _choice(name: str, exact: bool, note: str) -> GGUFChoice:
    return GGUFChoice(name, type_bpw(name), type_block(name), exact, note)



def native_type(spec: FormatSpec | GGUFSpec, in_features: int | None) -> tuple[str | None, str]:
    """(GGUF type, "") of a level that is a GGUF tensor as stored, or (None, why not). Without
    `in_features` the row-length checks are skipped (a gguf level's type is then the requested one)."""
    if isinstance(spec, GGUFSpec):
        if in_features is None:
            return spec.type, ""
        try:
            return stored_type(spec.type, in_features), ""
        except ValueError as e:
            return None, str(e)
    name = next((n for n, f in GGUF_FORMATS.items() if f == spec.fmt), None)
    if name is None or spec.awq:
        return None, f"format level {spec.id!r} has no GGUF type (" + \
            ("AWQ column scales" if spec.awq else "its grid/group/scale layout is no GGUF block layout") + \
            "): use a gguf level, or export --format packed"
    if in_features is not None and in_features % type_block(name):
        return None, f"{name} needs rows that are a multiple of {type_block(name)} weights (this tensor has {in_features})"
    return name, ""
