"""The latency table: one row per (shape, scheme, batch), JSON round trip, additive prediction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from planner.budget import Budget, Metric
from planner.runtime.latency import DENSE, LatencyTable, latency_costs, measure_table, predict, schemes, unit_shape


@pytest.fixture(scope="module")
def measured(tiny_sessions):
    session = tiny_sessions("fp32")
    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    table = measure_table(session.loaded.model, problem, session.db, batches=(1, 8), reps=2)
    return session, problem, table


def test_table_has_every_shape_scheme_and_batch(measured):
    session, problem, table = measured
    shapes = {unit_shape(session.db, u) for u in problem.units}
    kinds = set(schemes(session.db).values()) | {DENSE}
    assert len(kinds) == 5            # gptq and rtn levels of one bitwidth share a row: b2, b3, b4, b8 + dense
    assert set(table.rows) == {LatencyTable.key(s, k, b) for s in shapes for k in kinds for b in (1, 8)}
    assert all(r["seconds"] > 0 and r["bytes"] > 0 for r in table.rows.values())
    shape = next(iter(shapes))
    b2, b8 = (table.rows[LatencyTable.key(shape, f"b{b}-g48-asym", 1)]["bytes"] for b in (2, 8))
    assert b2 < b8 < table.rows[LatencyTable.key(shape, DENSE, 1)]["bytes"] * 4   # packed is smaller than fp32
    assert set(table.rest) == {"1", "8"} and all(v >= 0 for v in table.rest.values())


def test_round_trip_and_additive_prediction(measured, tmp_path):
    session, problem, table = measured
    table.save(tmp_path / "latency.json")
    again = LatencyTable.load(tmp_path / "latency.json")
    assert again == table
    cost = latency_costs(again, problem, session.db, batch=1)
    assert cost.shape == (problem.n_units, max(len(lad) for lad in problem.levels)) and np.isfinite(cost).all()
    x = np.zeros(problem.n_units, dtype=int)
    assert math.isclose(predict(again, problem, session.db, x, batch=1), again.rest["1"] + cost[:, 0].sum())
