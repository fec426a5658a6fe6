"""Level ids read back into level specs, for every kind a deployment target may be asked about.

    level_spec("gptq-b3-g128-sym")      -> LevelSpec(GPTQ, 3, 128, True)
    level_spec("int3-g16-d6x16-diag")   -> FormatSpec(Format(INT, 3, 16, False, 6, 16), DIAG)
    level_spec("gguf-q4_k-diag")        -> GGUFSpec("Q4_K", DIAG)
    level_spec("sparsegpt-0.5")         -> None   (kinds no target but `packed` serves)

Target rules are checked from a plan and its problem alone (before a model or levels DB is
loaded), and both hold level ids only: the ids spell their specs out, so they are read back here,
the inverse of each spec's `id` (`LevelSpec.id`, `formats.format_id`, `GGUFSpec.id`).
"""

from __future__ import annotations

import re

from planner.levels.formats import FORMAT_ROUNDINGS, FormatSpec, Rounding
from planner.levels.gguf_levels import NOMINAL_BITS, GGUFSpec
from planner.levels.grids import Format, Grid
from planner.space import LevelSpec, Method

_INT_ID = re.compile(r"^(?P<method>[a-z]+)-b(?P<bits>\d+)-(?:g(?P<gs>\d+)|pc)(?P<sym>-sym)?$")
_FORMAT_ID = re.compile(r"^(?:(?P<grid>int|nf|km)(?P<bits>\d)|iq4nl)-(?:g(?P<gs>\d+)|pc)"
                        r"(?:-d(?P<sb>\d)x(?P<sg>\d+))?(?P<sym>-sym)?-(?P<rounding>[a-z]+)(?P<awq>-awq)?$")
_GGUF_ID = re.compile(r"^gguf-(?P<type>[a-z0-9_]+)-(?P<rounding>[a-z]+)$")

LevelKind = LevelSpec | FormatSpec | GGUFSpec


def parse_level(level_id: str) -> LevelSpec | None:
    """The inverse of `LevelSpec.id` ("gptq-b3-g128-sym" -> LevelSpec); None for other level kinds."""
    m = _INT_ID.match(level_id)
    if m is None or m["method"] not in {x.value for x in Method}:
        return None
    return LevelSpec(Method(m["method"]), int(m["bits"]), int(m["gs"] or 0), bool(m["sym"]))


def _format_spec(level_id: str) -> FormatSpec | None:
    m = _FORMAT_ID.match(level_id)
    if m is None or m["rounding"] not in {r.value for r in FORMAT_ROUNDINGS}:
        return None
    grid = Grid(m["grid"]) if m["grid"] else Grid.IQ4NL
    bits = int(m["bits"]) if m["bits"] else 4
    if bool(m["sym"]) and grid is not Grid.INT:
        return None
    double = (int(m["sb"]), int(m["sg"])) if m["sb"] else (16, 0)
    try:
        fmt = Format(grid, bits, int(m["gs"] or 0), bool(m["sym"]) or grid is not Grid.INT, *double)
    except ValueError:
        return None
    return FormatSpec(fmt, Rounding(m["rounding"]), bool(m["awq"]))


def _gguf_spec(level_id: str) -> GGUFSpec | None:
    m = _GGUF_ID.match(level_id)
    if m is None or m["type"].upper() not in NOMINAL_BITS or m["rounding"] not in {r.value for r in Rounding}:
        return None
    return GGUFSpec(m["type"].upper(), Rounding(m["rounding"]))


def level_spec(level_id: str) -> LevelKind | None:
    """The spec a level id names (integer, format or GGUF level); None for other kinds."""
    for parse in (parse_level, _format_spec, _gguf_spec):
        spec = parse(level_id)
        if spec is not None and spec.id == level_id:
            return spec
    return None
