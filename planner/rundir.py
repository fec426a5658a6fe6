"""The run directory: everything a search produced, readable without the model.

    runs/<name>/
      config.json      how the run was started (schema v1): model, dataset, space, budget, method, seed
      problem.json     units, level ladders and exact costs: decodes every `x` below into a plan
      results.jsonl    the journal: one row per evaluated candidate, appended as it arrives
      checkpoint.json  searcher state + number of journal rows it has seen (resume point)
      heldout.jsonl    final measurements on held-out windows (uniform baselines and the best plan)
      pareto.json      non-dominated held-out rows on (bits, kl)
      best_plan.json   the best plan within budget, with its costs and held-out KL / ppl
      report.html      written by `planner report`

All JSON files are written atomically (temp file + rename); the journal is append-only with one
flush per row, so a kill at any moment loses at most the evaluation in flight.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from planner.budget import Budget, Metric
from planner.errors import BadRunDir
from planner.problem import HwCost, Problem

RUN_SCHEMA = 1


@dataclass(frozen=True)
class Row:
    """One evaluated candidate (search journal) or one held-out measurement."""

    method: str
    generation: int
    stage: int
    tokens: int
    seed: int
    kl: float
    ppl: float
    bits: float
    bpw: float
    bytes: int
    plan_id: str
    x: list[int]
    seconds: float = 0.0
    error: str | None = None
    label: str = ""                 # held-out rows: "uniform gptq-b3-g128", "best", ...
    extra: dict = field(default_factory=dict)


def write_json(path: Path, data) -> None:
    """Atomic JSON write: readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serializable: {type(o)}")


def _nan_to_none(a: np.ndarray) -> list:
    return [[None if np.isnan(v) else float(v) for v in row] for row in a]


def problem_to_json(p: Problem) -> dict:
    return {"units": list(p.units), "numel": p.numel.tolist(), "levels": [list(lv) for lv in p.levels],
            "code_bits": _nan_to_none(p.code_bits), "stored_bits": _nan_to_none(p.stored_bits),
            "budget": {"value": p.budget.value, "metric": p.budget.metric.value}, "kinds": list(p.kinds),
            "blocks": list(p.blocks), **({"ties": list(p.ties)} if p.ties else {}),
            **({"kept": _nan_to_none(p.kept)} if p.kept is not None else {}),
            **({"members": [list(g) for g in p.members]} if p.members else {}),
            **({"budget_also": [{"value": b.value, "metric": b.metric.value} for b in p.budget.also]}
               if p.budget.also else {}),
            **({"hardware": {m.value: {"table": _nan_to_none(h.table), "base": h.base} for m, h in p.hardware.items()}}
               if p.hardware else {})}


def problem_from_json(d: dict) -> Problem:
    def arr(rows):
        return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)
    return Problem(units=tuple(d["units"]), numel=np.array(d["numel"], dtype=np.int64),
                   levels=tuple(tuple(lv) for lv in d["levels"]), code_bits=arr(d["code_bits"]),
                   stored_bits=arr(d["stored_bits"]),
                   budget=Budget(d["budget"]["value"], Metric(d["budget"]["metric"]),
                                 tuple(Budget(b["value"], Metric(b["metric"])) for b in d.get("budget_also", ()))),
                   kinds=tuple(d.get("kinds", ())), blocks=tuple(d.get("blocks", ())), ties=tuple(d.get("ties", ())),
                   kept=arr(d["kept"]) if "kept" in d else None,
                   members=tuple(tuple(g) for g in d.get("members", ())),
                   hardware={Metric(m): HwCost(arr(h["table"]), float(h["base"])) for m, h in d.get("hardware", {}).items()})


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- lifecycle ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: dict) -> RunDir:
        path = Path(path)
        if path.exists():
            raise BadRunDir(f"run dir {str(path)!r} already exists: pick another --name, or --resume it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".creating")
        tmp.mkdir(exist_ok=True)
        write_json(tmp / "config.json", {"schema": RUN_SCHEMA, **config})
        os.replace(tmp, path)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not (run.path / "config.json").is_file():
            raise BadRunDir(f"{str(path)!r} is not a planner run dir (no config.json): pass runs/<name>")
        schema = run.config.get("schema")
        if schema != RUN_SCHEMA:
            raise BadRunDir(f"run dir {str(path)!r} has schema {schema}; this planner reads schema {RUN_SCHEMA}")
        return run

    # --- files -------------------------------------------------------------------------
    def _read_json(self, name: str, default=None):
        f = self.path / name
        if not f.is_file():
            return default
        return json.loads(f.read_text())

    @property
    def config(self) -> dict:
        return self._read_json("config.json", {})

    def save_problem(self, problem: Problem) -> None:
        write_json(self.path / "problem.json", problem_to_json(problem))

    def load_problem(self) -> Problem:
        d = self._read_json("problem.json")
        if d is None:
            raise BadRunDir(f"run dir {str(self.path)!r} has no problem.json: the search never started")
        return problem_from_json(d)

    def write(self, name: str, data) -> None:
        write_json(self.path / name, data)

    def read(self, name: str, default=None):
        return self._read_json(name, default)

    # --- journal -----------------------------------------------------------------------
    def _append(self, name: str, row: Row) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(asdict(row), default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rows(self, name: str) -> list[Row]:
        f = self.path / name
        if not f.is_file():
            return []
        rows = []
        for line in f.read_text().splitlines():
            try:
                rows.append(Row(**json.loads(line)))
            except (ValueError, TypeError):
                break          # a torn last line after a kill: everything before it is intact
        return rows

    def append_result(self, row: Row) -> None:
        self._append("results.jsonl", row)

    def results(self) -> list[Row]:
        return self._rows("results.jsonl")

    def append_heldout(self, row: Row) -> None:
        self._append("heldout.jsonl", row)

    def heldout(self) -> list[Row]:
        return self._rows("heldout.jsonl")
