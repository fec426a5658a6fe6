"""Budgets: parsing, the feasibility check, and exact bits / bpw / bytes accounting on a real levels DB."""

from __future__ import annotations

import math

import numpy as np
import pytest

from planner.budget import HARDWARE, Budget, Metric, parse_budget
from planner.errors import BadBudget
from planner.levels.quant import n_groups

from .conftest import TINY_GROUP

pytestmark = pytest.mark.usefixtures("one_thread")   # 2 shared cores: never oversubscribe

@pytest.mark.parametrize("text,value,metric", [
    ("3.0bits", 3.0, Metric.BITS),
    ("3bits", 3.0, Metric.BITS),
    ("3.25bpw", 3.25, Metric.BPW),
    (" 2.5BPW ", 2.5, Metric.BPW),
    ("1.2GB", 1.2e9, Metric.BYTES),
    ("800MB", 800e6, Metric.BYTES),
    ("64kB", 64e3, Metric.BYTES),
    ("123456B", 123456.0, Metric.BYTES),
    ("2GiB", 2 * 2**30, Metric.BYTES),
    ("512MiB", 512 * 2**20, Metric.BYTES),
    (".5bits", 0.5, Metric.BITS),
])
def test_parse_budget_accepts(text, value, metric):
    b = parse_budget(text)
    assert b.metric is metric
    assert b.value == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text", ["3", "abc", "-1bits", "3.0bitz", "", "   ", "0bits", "0.0bpw", "bits", "3.0 bits extra",
                                  "3,5bits", "1.2.3bits", "3bits3", "MB800"])
def test_parse_budget_rejects_with_one_line(text):
    with pytest.raises(BadBudget) as e:
        parse_budget(text)
    msg = str(e.value)
    assert "\n" not in msg and msg
    assert "3.0bits" in msg      # every message carries the fix-it example


def test_parse_budget_none_is_bad_budget():
    with pytest.raises(BadBudget):
        parse_budget(None)  # type: ignore[arg-type]


def test_budget_str_round_trips():
    for text in ("3bits", "3.25bpw"):
        assert str(parse_budget(text)) == text
    b = parse_budget("800MB")
    assert parse_budget(str(b)) == b


# --- a Problem from a real levels DB of the tiny model ---------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_sessions):
    return tiny_sessions("fp32")


def _problem(session, budget: str):
    return session.db.problem(session.units, parse_budget(budget))


def _hand_costs(shape: tuple[int, int], level_id: str) -> tuple[int, int]:
    """(code bits, stored bits) of one unit at one level, from the documented formulas:
    codes = out*in*bits; per (row, group) an fp16 scale and a `bits`-bit zero point."""
    method, b, g = level_id.split("-")
    bits, gs = int(b[1:]), int(g[1:])
    assert gs == TINY_GROUP and method in ("gptq", "rtn")
    out, inp = shape
    groups = out * math.ceil(inp / gs)
    return out * inp * bits, out * inp * bits + groups * (16 + bits)


def test_tiny_model_has_ragged_groups(tiny):
    widths = {u.shape[1] for u in tiny.units}
    assert widths == {64, 128}
    assert all(w % TINY_GROUP for w in widths)     # every linear ends with a short group
    u = tiny.units[0]
    lv = tiny.db.levels(u.name)[0].id
    qw = tiny.db.load(u.name, lv)
    assert qw.scales.shape == (u.shape[0], n_groups(u.shape[1], TINY_GROUP)) == (u.shape[0], 2)


def test_level_info_matches_formulas_and_stored_tensors(tiny):
    for u in tiny.units:
        for lv in tiny.db.levels(u.name):
            code, stored = _hand_costs(u.shape, lv.id)
            assert (lv.code_bits, lv.stored_bits) == (code, stored), (u.name, lv.id)
            qw = tiny.db.load(u.name, lv.id)
            assert qw.shape == u.shape
            assert lv.nbytes == qw.nbytes, (u.name, lv.id)
            # all tiny shapes keep each bitstream byte-aligned, so stored bits are exactly the bytes
            assert qw.nbytes * 8 == stored, (u.name, lv.id)


def test_problem_cost_is_exact(tiny):
    p = _problem(tiny, "3.0bits")
    shapes = {u.name: u.shape for u in tiny.units}
    assert p.total_numel == sum(u.numel for u in tiny.units)
    rng = np.random.default_rng(0)
    xs = [np.zeros(p.n_units, dtype=int), p.n_levels - 1] + [rng.integers(0, p.n_levels) for _ in range(20)]
    for x in xs:
        plan = p.decode(x).as_dict()
        code = stored = nbytes = 0
        for unit, level in plan.items():
            c, s = _hand_costs(shapes[unit], level)
            code, stored = code + c, stored + s
            nbytes += tiny.db.load(unit, level).nbytes
        cost = p.cost(x)
        assert cost.bits == pytest.approx(code / p.total_numel, rel=1e-14)
        assert cost.bpw == pytest.approx(stored / p.total_numel, rel=1e-14)
        assert cost.nbytes == math.ceil(stored / 8) == nbytes
        assert p.spend(x) == pytest.approx(code, rel=1e-14)   # a bits budget spends code bits


def test_uniform_costs_are_the_textbook_numbers(tiny):
    p = _problem(tiny, "3.0bits")
    for bits in (2, 3, 4, 8):
        level = f"gptq-b{bits}-g{TINY_GROUP}"
        x = np.array([lv.index(level) for lv in p.levels])
        c = p.cost(x)
        assert c.bits == bits
        # groups per weight: rows * ceil(in/48) / (rows * in), averaged over units by element count
        groups = sum(u.shape[0] * math.ceil(u.shape[1] / TINY_GROUP) for u in tiny.units)
        assert c.bpw == pytest.approx(bits + groups * (16 + bits) / p.total_numel, rel=1e-14)


def test_ladders_sorted_cheapest_first(tiny):
    p = _problem(tiny, "3.0bits")
    for i in range(p.n_units):
        stored = p.stored_bits[i, : p.n_levels[i]]
        assert np.all(np.diff(stored) >= 0)
        assert p.levels[i][0].split("-")[1] == "b2" and p.levels[i][-1].split("-")[1] == "b8"


def _extremes(p, metric: Metric) -> tuple[float, float]:
    lo = p.cost(np.zeros(p.n_units, dtype=int)).value(metric)
    hi = p.cost(p.n_levels - 1).value(metric)
    return lo, hi


@pytest.mark.parametrize("metric", [m for m in Metric if m not in HARDWARE])   # hardware: test_latency_budget.py
def test_check_budget_bounds(tiny, metric):
    p0 = _problem(tiny, "3.0bits")
    lo, hi = _extremes(p0, metric)

    def check(value: float) -> None:
        tiny.db.problem(tiny.units, Budget(value, metric)).check_budget()

    check(lo)              # the cheapest plan itself is feasible
    check(hi)              # and so is the most expensive one
    check((lo + hi) / 2)
    for bad, word in ((lo * 0.99, "below the cheapest"), (hi * 1.01, "above the most expensive")):
        with pytest.raises(BadBudget, match=word) as e:
            check(bad)
        assert "\n" not in str(e.value)


def test_check_budget_messages_name_the_limit(tiny):
    with pytest.raises(BadBudget, match=r"below the cheapest plan \(2bits\)"):
        _problem(tiny, "1.5bits").check_budget()
    with pytest.raises(BadBudget, match=r"above the most expensive plan \(8bits\)"):
        _problem(tiny, "9bits").check_budget()


def test_feasible_matches_cost_for_each_metric(tiny):
    rng = np.random.default_rng(1)
    p_bits = _problem(tiny, "3.0bits")
    xs = [rng.integers(0, p_bits.n_levels) for _ in range(50)]
    for budget, metric in (("3.0bits", Metric.BITS), ("3.5bpw", Metric.BPW), ("30kB", Metric.BYTES)):
        p = _problem(tiny, budget)
        limit = p.budget.value
        for x in xs:
            c = p.cost(x).value(metric)
            if metric is Metric.BYTES:
                # feasibility is decided on exact stored bits / 8; nbytes rounds up at most one byte
                assert p.feasible(x) == (p.spend(x) <= limit)
                assert c - 1 < p.spend(x) <= c
            else:
                assert p.feasible(x) == (c <= limit * (1 + 1e-12))
