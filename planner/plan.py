"""A plan: which level each unit gets. Hashable, JSON with a schema version."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from planner.errors import BadPlan

PLAN_SCHEMA = 1


@dataclass(frozen=True)
class Plan:
    """unit name -> level id, stored as a sorted tuple of pairs so it hashes and compares."""

    assignment: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, str]) -> Plan:
        return cls(tuple(sorted(mapping.items())))

    def as_dict(self) -> dict[str, str]:
        return dict(self.assignment)

    @property
    def id(self) -> str:
        """Short content hash: the same plan always has the same id."""
        blob = json.dumps(self.assignment, separators=(",", ":")).encode()
        return hashlib.sha1(blob).hexdigest()[:10]

    def to_json(self, **extra) -> dict:
        return {"schema": PLAN_SCHEMA, "id": self.id, **extra, "plan": self.as_dict()}

    @classmethod
    def from_json(cls, data: Mapping) -> Plan:
        if not isinstance(data, Mapping) or "plan" not in data:
            raise BadPlan("plan JSON has no 'plan' field: pass a file written by planner (best_plan.json)")
        if data.get("schema", PLAN_SCHEMA) != PLAN_SCHEMA:
            raise BadPlan(f"plan schema {data.get('schema')} is not supported (expected {PLAN_SCHEMA})")
        plan = data["plan"]
        if not isinstance(plan, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in plan.items()):
            raise BadPlan("plan JSON 'plan' must map unit names to level ids (strings)")
        return cls.of(plan)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise BadPlan(f"plan file {str(path)!r} does not exist: pass runs/<name>/best_plan.json") from None
        except (OSError, ValueError) as e:
            raise BadPlan(f"cannot read plan file {str(path)!r} ({e}): pass a JSON plan written by planner") from None
        return cls.from_json(data)
