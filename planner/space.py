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
    method: Method
    bits: int
    group_size: int
    symmetric: bool = False

    @property
    def id(self) -> str:
        g = f"g{self.group_size}" if self.group_size > 0 else "pc"
        return f"{self.method.value}-b{self.bits}-{g}" + ("-sym" if self.symmetric else "")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    levels: tuple[LevelSpec, ...]
    damp: float = 0.01
    block_size: int = 128

    def to_json(self) -> dict:
        return {"name": self.name, "damp": self.damp, "block_size": self.block_size,
                "levels": [{"method": s.method.value, "bits": s.bits, "group_size": s.group_size,
                            "symmetric": s.symmetric} for s in self.levels]}


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


def parse_space(data, default_name: str = "space", where: str = "search space") -> SearchSpace:
    _need(isinstance(data, dict), where, "must be a mapping with a 'levels' list (see search_spaces/gptq-g128.yaml)")
    unknown = set(data) - {"name", "description", "units", "levels", "gptq"}
    _need(not unknown, where, f"unknown key(s) {sorted(unknown)}; allowed: name, description, units, levels, gptq")
    _need(data.get("units", "linear") == "linear", where, "units: only 'linear' (decoder-block linears) is supported")
    families = data.get("levels")
    _need(isinstance(families, list) and families, where, "'levels' must be a non-empty list of level families")
    specs: list[LevelSpec] = []
    for i, fam in enumerate(families):
        at = f"{where}: levels[{i}]"
        _need(isinstance(fam, dict), at, "must be a mapping with method, bits, group_size")
        extra = set(fam) - {"method", "bits", "group_size", "symmetric"}
        _need(not extra, at, f"unknown key(s) {sorted(extra)}; allowed: method, bits, group_size, symmetric")
        methods = {m.value for m in Method}
        _need(fam.get("method") in methods, at, f"method must be one of {sorted(methods)}, got {fam.get('method')!r}")
        bits = fam.get("bits")
        bits = [bits] if isinstance(bits, int) else bits
        _need(isinstance(bits, list) and bits and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8
                                                      for b in bits), at, "bits must be an integer or list of integers in 1..8")
        gs = fam.get("group_size", 128)
        _need(isinstance(gs, int) and gs >= 0, at, "group_size must be a non-negative integer (0 = per channel)")
        sym = fam.get("symmetric", False)
        _need(isinstance(sym, bool), at, "symmetric must be true or false")
        specs += [LevelSpec(Method(fam["method"]), b, gs, sym) for b in bits]
    ids = [s.id for s in specs]
    _need(len(set(ids)) == len(ids), where, f"duplicate levels {sorted({i for i in ids if ids.count(i) > 1})}")
    gptq = data.get("gptq", {}) or {}
    _need(isinstance(gptq, dict) and set(gptq) <= {"damp", "block_size"}, where, "gptq: allowed keys are damp, block_size")
    damp, block = gptq.get("damp", 0.01), gptq.get("block_size", 128)
    _need(isinstance(damp, (int, float)) and 0 < damp < 1, where, "gptq.damp must be in (0, 1)")
    _need(isinstance(block, int) and block > 0, where, "gptq.block_size must be a positive integer")
    return SearchSpace(str(data.get("name", default_name)), str(data.get("description", "")), tuple(specs),
                       float(damp), int(block))
