"""Search spaces: which units are planned and which levels each may take.

A search space is a YAML file (built-in ones live in `search_spaces/` and are selected by name):

    name: gptq-g128                      # optional; defaults to the file name
    description: one line shown in --help and reports
    units: linear                        # the decoder-block linears (embeddings, lm_head excluded)
    levels:                              # one or more level families
      - method: gptq                     # gptq | rtn
        bits: [2, 3, 4, 5, 6, 8]         # each an integer 1..8
        group_size: 128                  # columns per scale/zero group; 0 = per output channel
        symmetric: false                 # asymmetric: an integer zero point per group
    gptq:
      damp: 0.01                         # fraction of mean(diag H) added to the diagonal
      block_size: 128                    # columns per lazy-batch update

Each level gets an id such as `gptq-b3-g128`; a unit's ladder is ordered by stored cost.
Other builders bring their own families (`sparsegpt`/`wanda`/`magnitude` in
planner/levels/sparse.py, `joint` in joint.py, `drop` in drop.py). Optional keys:

    units: subblock                      # one unit per attention / MLP sub-block (drop levels only)
    tie: fused                           # q/k/v and gate/up take one level (Problem.ties);
                                         # subblock: a whole attention / MLP sub-block does;
                                         # expert: each MoE expert's matrices (gate/up/down) do,
                                         # one unit per expert (a no-op on dense models)
    overrides:                           # other levels for some units; the first match wins
      - kinds: [down_proj]               # unit kinds and/or
        blocks: [0]                      # decoder-block indices
        levels: [{method: gptq, bits: [4, 8], group_size: 128}]
    calibration:
      sequential: gptq-b4-g128           # block i's Hessians see blocks < i at this level
    prune_levels: dominated              # none (default) | dominated | hull: before a search, cut
                                         # each unit's ladder to the levels no other level beats
                                         # on both cost and proxy error tr(dW H dW^T), so one rung
                                         # up always costs more and errs less (planner/levels/prune.py;
                                         # hull: the lower convex hull of those). Ladders only: the
                                         # levels DB is the same, and `search --prune-levels` overrides it
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import yaml

from planner.errors import BadSearchSpace

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
DEFAULT_SPACE = "gptq-g128"


class Method(str, enum.Enum):
    GPTQ = "gptq"
    RTN = "rtn"


@dataclass(frozen=True)
class LevelSpec:
    """An integer-grid level (GPTQ or RTN): `bits` per code, one fp16 scale (and a `bits`-bit zero
    point unless symmetric) per group of `group_size` input columns."""

    method: Method
    bits: int
    group_size: int
    symmetric: bool = False

    @property
    def id(self) -> str:
        g = f"g{self.group_size}" if self.group_size > 0 else "pc"
        return f"{self.method.value}-b{self.bits}-{g}" + ("-sym" if self.symmetric else "")

    @property
    def builder(self) -> str:
        return self.method.value

    def _q(self):
        from planner.levels.quant import QuantSpec

        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def code_bits(self, shape: tuple[int, int]) -> int:
        from planner.levels.quant import code_bits

        return code_bits(shape, self._q())

    def stored_bits(self, shape: tuple[int, int]) -> int:
        from planner.levels.quant import stored_bits

        return stored_bits(shape, self._q())

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes of the packed tensors as written: two bitstreams rounded up to bytes, fp16 scales."""
        from planner.levels.pack import packed_nbytes
        from planner.levels.quant import n_groups

        groups = shape[0] * n_groups(shape[1], self.group_size)
        zeros = 0 if self.symmetric else packed_nbytes(groups, self.bits)
        return packed_nbytes(shape[0] * shape[1], self.bits) + 2 * groups + zeros

    def to_json(self) -> dict:
        return {"method": self.method.value, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric}


class Grouping(str, enum.Enum):
    LINEAR = "linear"        # every decoder-block linear is a unit
    SUBBLOCK = "subblock"    # every attention / MLP sub-block is a unit (planner/units.py)


class Tie(str, enum.Enum):
    NONE = "none"
    FUSED = "fused"          # units of one fused group (q/k/v, gate/up) share one level id
    SUBBLOCK = "subblock"    # all linears of an attention / MLP sub-block share one level id (e.g. drop)
    EXPERT = "expert"        # the matrices of one MoE expert share one level id (MC-MoE's bitwidth per expert)


class PruneLevels(str, enum.Enum):
    NONE = "none"              # every level of the space in every ladder
    DOMINATED = "dominated"    # drop a level when another costs no more and errs no more
    HULL = "hull"              # also drop levels above the lower convex hull of (cost, error)


@dataclass(frozen=True)
class Override:
    """Levels for the units of some kinds and/or blocks (an empty selector matches everything)."""

    kinds: tuple[str, ...]
    blocks: tuple[int, ...]
    levels: tuple

    def matches(self, unit) -> bool:
        return (not self.kinds or unit.kind in self.kinds) and (not self.blocks or unit.block in self.blocks)

    def to_json(self) -> dict:
        return {"kinds": list(self.kinds), "blocks": list(self.blocks), "levels": [s.to_json() for s in self.levels]}


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    levels: tuple  # level specs (LevelSpec for integer grids; other builders bring their own)
    damp: float = 0.01
    block_size: int = 128
    units: Grouping = Grouping.LINEAR
    tie: Tie = Tie.NONE
    overrides: tuple[Override, ...] = ()
    sequential: str | None = None    # level id the calibration prefix takes (None: calibrate on the base model)
    # which levels a search sees of each ladder; not in to_json: the levels DB (keyed by it) is the same
    prune_levels: PruneLevels = PruneLevels.NONE

    def levels_for(self, unit) -> tuple:
        """The level specs of one unit: the first matching override's, else the default levels."""
        return next((o.levels for o in self.overrides if o.matches(unit)), self.levels)

    @property
    def all_levels(self) -> tuple:
        """Every distinct spec of the space (default levels and overrides), in order."""
        return tuple({s.id: s for s in (*self.levels, *(s for o in self.overrides for s in o.levels))}.values())

    def to_json(self) -> dict:
        extra = {"units": self.units.value} if self.units is not Grouping.LINEAR else {}
        extra |= {"tie": self.tie.value} if self.tie is not Tie.NONE else {}
        extra |= {"overrides": [o.to_json() for o in self.overrides]} if self.overrides else {}
        extra |= {"sequential": self.sequential} if self.sequential else {}
        return {"name": self.name, "damp": self.damp, "block_size": self.block_size,
                "levels": [s.to_json() for s in self.levels], **extra}


def builtin_spaces() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def load_space(name_or_path: str) -> SearchSpace:
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        spaces = builtin_spaces()
        if name_or_path not in spaces:
            raise BadSearchSpace(f"unknown search space {name_or_path!r}: use a YAML file or one of {', '.join(spaces)}")
        path = spaces[name_or_path]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise BadSearchSpace(f"{path} is not a readable YAML file ({str(e).splitlines()[0]}): fix the file") from None
    return parse_space(data, default_name=path.stem, where=str(path))


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise BadSearchSpace(f"{where}: {msg}")


_TOP_KEYS = ("name", "description", "units", "tie", "levels", "overrides", "calibration", "gptq", "prune_levels")


def _families(families, where: str, key: str = "levels") -> tuple:
    """Level specs of a list of level families (each parsed by its builder); ids must be unique."""
    _need(isinstance(families, list) and families, where, f"'{key}' must be a non-empty list of level families")
    from planner.levels.registry import BUILDERS  # builders register on `import planner.levels`

    specs: list = []
    for i, fam in enumerate(families):
        at = f"{where}: {key}[{i}]"
        _need(isinstance(fam, dict), at, "must be a mapping with a method and its settings")
        _need(fam.get("method") in BUILDERS, at, f"method must be one of {sorted(BUILDERS)}, got {fam.get('method')!r}")
        specs += BUILDERS[fam["method"]].parse(fam, at)
    ids = [s.id for s in specs]
    _need(len(set(ids)) == len(ids), where, f"duplicate levels {sorted({i for i in ids if ids.count(i) > 1})}")
    return tuple(specs)


def _int_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in v)


def _overrides(data, where: str) -> tuple[Override, ...]:
    _need(isinstance(data, list), where, "overrides must be a list of {kinds, blocks, levels} mappings")
    out = []
    for i, o in enumerate(data):
        at = f"{where}: overrides[{i}]"
        _need(isinstance(o, dict) and set(o) <= {"kinds", "blocks", "levels"}, at,
              "must be a mapping with kinds and/or blocks, and levels")
        kinds, blocks = o.get("kinds", []), o.get("blocks", [])
        _need(isinstance(kinds, list) and all(isinstance(k, str) for k in kinds), at, "kinds must be a list of unit kinds")
        _need(_int_list(blocks), at, "blocks must be a list of block indices (integers >= 0)")
        _need(bool(kinds or blocks), at, "give kinds and/or blocks to say which units it covers")
        out.append(Override(tuple(kinds), tuple(blocks), _families(o.get("levels"), at)))
    return tuple(out)


def parse_space(data, default_name: str = "space", where: str = "search space") -> SearchSpace:
    _need(isinstance(data, dict), where, "must be a mapping with a 'levels' list (see search_spaces/gptq-g128.yaml)")
    unknown = set(data) - set(_TOP_KEYS)
    _need(not unknown, where, f"unknown key(s) {sorted(unknown)}; allowed: {', '.join(_TOP_KEYS)}")
    units, tie = data.get("units", "linear"), data.get("tie", "none")
    _need(units in {g.value for g in Grouping}, where, "units must be linear (decoder-block linears) or subblock")
    _need(tie in {t.value for t in Tie}, where, "tie must be none, fused, subblock or expert")
    specs = _families(data.get("levels"), where)
    overrides = _overrides(data.get("overrides", []) or [], where)
    every = (*specs, *(s for o in overrides for s in o.levels))
    _need(units == "linear" or all(s.builder == "drop" for s in every), where,
          "units: subblock takes only drop levels (method: drop); quantize or prune linears with units: linear")
    calib = data.get("calibration", {}) or {}
    _need(isinstance(calib, dict) and set(calib) <= {"sequential"}, where, "calibration: the only key is sequential")
    seq = calib.get("sequential")
    ladders = [specs, *(o.levels for o in overrides)]
    _need(seq is None or (isinstance(seq, str) and all(seq in {s.id for s in lad} for lad in ladders)), where,
          f"calibration.sequential must be a level id every unit has, got {seq!r}")
    gptq = data.get("gptq", {}) or {}
    _need(isinstance(gptq, dict) and set(gptq) <= {"damp", "block_size"}, where, "gptq: allowed keys are damp, block_size")
    damp, block = gptq.get("damp", 0.01), gptq.get("block_size", 128)
    _need(isinstance(damp, (int, float)) and 0 < damp < 1, where, "gptq.damp must be in (0, 1)")
    _need(isinstance(block, int) and block > 0, where, "gptq.block_size must be a positive integer")
    prune = data.get("prune_levels", "none")
    _need(prune in {p.value for p in PruneLevels}, where,
          f"prune_levels must be one of {', '.join(p.value for p in PruneLevels)}, got {prune!r}")
    return SearchSpace(str(data.get("name", default_name)), str(data.get("description", "")), tuple(specs),
                       float(damp), int(block), Grouping(units), Tie(tie), overrides, seq, PruneLevels(prune))
