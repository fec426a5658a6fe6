"""Levels DB (build, reuse, resume), token windows, and the in-process evaluator on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import planner.levels.db as dbmod
import planner.levels.quant_levels as qlevels
from planner.budget import parse_budget
from planner.data.windows import make_windows
from planner.errors import BadDataset
from planner.levels.db import LevelsDB, build_levels
from planner.model.load import fingerprint, load_model
from planner.search.base import Candidate, Fidelity
from planner.space import load_space
from planner.units import find_units

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")   # 2 shared cores: never oversubscribe

# --- levels DB ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_inputs(tiny_model_dir, tiny_space_file):
    """(model, units, space, calib ids, fingerprint) for direct build_levels calls."""
    loaded = load_model(str(tiny_model_dir))
    units = find_units(loaded.model)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, loaded.model.config.vocab_size, (4, TINY_SEQLEN), generator=g)
    return loaded.model, units, load_space(str(tiny_space_file)), calib, fingerprint(loaded.model)


def _build(tiny_inputs, root):
    model, units, space, calib, fp = tiny_inputs
    with torch_threads(1):
        return build_levels(model, units, space, calib, fp, root=root)


def _mtimes(db: LevelsDB) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (db.path / "units").iterdir()}


def _spy(monkeypatch):
    """Record what build_levels quantizes: units whose Hessians are collected and GPTQ'd weights."""
    calls = {"hessian_units": [], "gptq_shapes": 0, "rtn": 0}
    real_h, real_g, real_r = dbmod.collect_hessians, qlevels.gptq_quantize, qlevels.rtn_quantize

    def hessians(model, units, *a, **kw):
        calls["hessian_units"] += [u.name for u in units]
        return real_h(model, units, *a, **kw)

    def gptq(W, *a, **kw):
        calls["gptq_shapes"] += 1
        return real_g(W, *a, **kw)

    def rtn(W, *a, **kw):
        calls["rtn"] += 1
        return real_r(W, *a, **kw)

    monkeypatch.setattr(dbmod, "collect_hessians", hessians)
    monkeypatch.setattr(qlevels, "gptq_quantize", gptq)
    monkeypatch.setattr(qlevels, "rtn_quantize", rtn)
    return calls


def test_build_writes_manifest_and_one_file_per_unit(tiny_inputs, tmp_path):
    _, units, space, _, _ = tiny_inputs
    db = _build(tiny_inputs, tmp_path)
    assert db.path.parent == tmp_path
    manifest = json.loads((db.path / "manifest.json").read_text())
    assert manifest["schema"] == dbmod.DB_SCHEMA and manifest["space"] == space.to_json()
    assert db.units == [u.name for u in units]
    assert sorted(p.name for p in (db.path / "units").iterdir()) == sorted(f"{u.name}.safetensors" for u in units)
    ids = [s.id for s in space.levels]
    for u in units:
        assert [lv.id for lv in db.levels(u.name)] == ids
        assert manifest["units"][u.name]["shape"] == list(u.shape)
        for lv in ids:
            w = db.weight(u.name, lv, torch.float32)
            assert w.shape == u.shape and torch.isfinite(w).all()
    assert not list(db.path.rglob("*.tmp"))


def test_second_build_reuses_without_quantizing(tiny_inputs, tmp_path, monkeypatch):
    first = _build(tiny_inputs, tmp_path)
    before = _mtimes(first)

    def boom(*a, **kw):
        raise AssertionError("a complete levels DB must be reused, not rebuilt")

    monkeypatch.setattr(dbmod, "collect_hessians", boom)
    for name in ("gptq_quantize", "rtn_quantize"):
        monkeypatch.setattr(qlevels, name, boom)
    second = _build(tiny_inputs, tmp_path)
    assert second.path == first.path
    assert _mtimes(second) == before


def test_key_depends_on_calibration_and_space(tiny_inputs, tmp_path):
    model, units, space, calib, fp = tiny_inputs
    base = dbmod.levels_key(fp, calib, space)
    assert dbmod.levels_key(fp, calib.clone(), space) == base
    assert dbmod.levels_key(fp, calib.flip(0), space) != base
    assert dbmod.levels_key(fp, calib, load_space("rtn-g128")) != base
    assert dbmod.levels_key("0" * 16, calib, space) != base


def test_build_resumes_after_a_crash(tiny_inputs, tmp_path, monkeypatch):
    """A build killed before its manifest: only the units without a file are quantized again,
    and the rebuilt file equals the one that was lost."""
    _, units, space, _, _ = tiny_inputs
    db = _build(tiny_inputs, tmp_path)
    victim = units[4]                                     # block 0 gate_proj (fused group gate_up)
    lost = db.path / "units" / f"{victim.name}.safetensors"
    original = lost.read_bytes()
    lost.unlink()
    (db.path / "manifest.json").unlink()
    (db.path / "units" / f"{units[5].name}.safetensors.tmp").write_bytes(b"torn")   # a write cut short
    before = _mtimes(db)

    calls = _spy(monkeypatch)
    again = _build(tiny_inputs, tmp_path)
    assert again.path == db.path and (db.path / "manifest.json").is_file()
    assert calls["hessian_units"] == [victim.name]
    assert calls["gptq_shapes"] == 1 and calls["rtn"] == sum(s.method.value == "rtn" for s in space.levels)
    after = _mtimes(again)
    assert {k: v for k, v in after.items() if k in before} == before     # nothing else was rewritten
    assert lost.read_bytes() == original                                # deterministic rebuild
    assert again.units == [u.name for u in units]


def test_complete_db_missing_a_unit_file_rebuilds_that_unit(tiny_inputs, tmp_path, monkeypatch):
    _, units, _, _, _ = tiny_inputs
    db = _build(tiny_inputs, tmp_path)
    (db.path / "units" / f"{units[0].name}.safetensors").unlink()
    calls = _spy(monkeypatch)
    again = _build(tiny_inputs, tmp_path)
    assert calls["gptq_shapes"] == 1
    again.weight(units[0].name, again.levels(units[0].name)[0].id, torch.float32)


# --- windows ----------------------------------------------------------------------------------


def test_windows_are_disjoint_and_cover_everything(tiny_sessions):
    w = tiny_sessions("fp32").windows
    calib, held, pool = set(w.calib.tolist()), set(w.heldout.tolist()), set(w.pool.tolist())
    assert not (calib & held) and not (calib & pool) and not (held & pool)
    assert calib | held | pool == set(range(len(w.ids)))
    assert len(calib) == TINY_CALIB_TOKENS // TINY_SEQLEN and len(held) == TINY_EVAL_TOKENS // TINY_SEQLEN
    assert w.seqlen == TINY_SEQLEN
    for seed in range(5):
        drawn = w.draw(3 * TINY_SEQLEN - 1, seed)
        assert len(drawn) == 3 and set(drawn.tolist()) <= pool
        assert np.array_equal(drawn, w.draw(3 * TINY_SEQLEN - 1, seed))     # same fidelity, same batch
    assert len({tuple(w.draw(2 * TINY_SEQLEN, s).tolist()) for s in range(10)}) > 1


def test_windows_split_is_seeded_and_errors_are_clear():
    ids = torch.arange(64 * 20)
    a, b = make_windows(ids, 64, 128, 128, seed=0), make_windows(ids, 64, 128, 128, seed=0)
    assert np.array_equal(a.calib, b.calib) and np.array_equal(a.heldout, b.heldout)
    assert not np.array_equal(a.pool, make_windows(ids, 64, 128, 128, seed=1).pool) or \
        not np.array_equal(a.calib, make_windows(ids, 64, 128, 128, seed=1).calib)
    with pytest.raises(BadDataset, match="windows"):
        make_windows(ids, 64, 64 * 10, 64 * 8, seed=0)          # 10 + 8 + 4 > 20
    with pytest.raises(BadDataset, match="search pool"):
        a.draw(64 * 100, seed=0)


# --- evaluator ----------------------------------------------------------------------------------


def _problem(session, budget="3.0bits"):
    return session.problem(parse_budget(budget))


def _uniform(problem, level: str) -> np.ndarray:
    return np.array([lv.index(level) for lv in problem.levels])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_unmodified_plan_has_kl_exactly_zero(tiny_sessions, dtype):
    s = tiny_sessions(dtype)
    ev = s.evaluator(_problem(s))
    pool = s.windows.pool
    assert ev.score(None, pool[:6]).kl == 0.0
    assert ev.score(None, pool[:6]).kl == 0.0                      # reference from the cache
    assert ev.score(None, pool[3:12]).kl == 0.0                    # partly cached, other batches
    assert ev.score(None, s.windows.heldout).kl == 0.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kl_positive_and_falls_with_bits(tiny_sessions, dtype):
    s = tiny_sessions(dtype)
    p = _problem(s)
    ev = s.evaluator(p)
    assert next(ev.model.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    windows = s.windows.pool[:8]
    kl = {}
    for bits in (2, 3, 4, 8):
        vals = [ev.score(p.decode(_uniform(p, f"{m}-b{bits}-g48")), windows).kl for m in ("gptq", "rtn")]
        assert all(np.isfinite(vals)) and min(vals) > 0
        kl[bits] = float(np.mean(vals))
    assert kl[2] > kl[3] > kl[4] > kl[8] > 0
    assert kl[2] > 10 * kl[8]


def test_fp32_and_bf16_agree(tiny_sessions):
    a, b = tiny_sessions("fp32"), tiny_sessions("bf16")
    pa, pb = _problem(a), _problem(b)
    x = _uniform(pa, "rtn-b2-g48")
    sa = a.evaluator(pa).score(pa.decode(x), a.windows.heldout)
    sb = b.evaluator(pb).score(pb.decode(x), b.windows.heldout)
    assert sa.tokens == sb.tokens == TINY_EVAL_TOKENS
    assert sb.kl == pytest.approx(sa.kl, rel=0.15)
    assert sb.ppl == pytest.approx(sa.ppl, rel=0.02)


def test_score_restores_the_base_weights(tiny_sessions):
    s = tiny_sessions("fp32")
    p = _problem(s)
    ev = s.evaluator(p)
    mods = {u: s.loaded.model.get_submodule(u) for u in p.units}
    base = {u: (m.weight.data_ptr(), m.weight.detach().clone()) for u, m in mods.items()}
    ev.score(p.decode(_uniform(p, "gptq-b2-g48")), s.windows.pool[:2])
    for u, (ptr, values) in base.items():
        assert mods[u].weight.data_ptr() == ptr and torch.equal(mods[u].weight, values), u


def _failing_level(ev, monkeypatch, level: str) -> None:
    """Make applying `level` to any unit fail like an out-of-memory error would."""
    real = ev.db.weight

    def weight(unit, lv, dtype):
        if lv == level:
            raise RuntimeError("simulated out of memory")
        return real(unit, lv, dtype)

    monkeypatch.setattr(ev.db, "weight", weight)


def _candidates(p):
    good = tuple(int(v) for v in _uniform(p, "gptq-b3-g48"))
    other = list(good)
    other[-1] = p.levels[-1].index("gptq-b4-g48")
    bad = list(good)
    bad[0] = p.levels[0].index("rtn-b2-g48")          # the only candidate using the failing level
    return good, tuple(other), tuple(bad)


def test_evaluate_reports_failures_instead_of_raising(tiny_sessions, monkeypatch):
    s = tiny_sessions("fp32")
    p = _problem(s)
    ev = s.evaluator(p)
    good, other, bad = _candidates(p)
    _failing_level(ev, monkeypatch, "rtn-b2-g48")
    fid, lone = Fidelity(tokens=2 * TINY_SEQLEN, seed=7), Fidelity(tokens=2 * TINY_SEQLEN, seed=8)
    results = ev.evaluate([Candidate(good, fid), Candidate(bad, lone), Candidate(other, fid)])
    assert [r.candidate.x for r in results] == [good, bad, other]
    assert results[0].ok and results[2].ok and results[0].kl > 0 and results[2].kl > 0
    assert not results[1].ok and "simulated out of memory" in results[1].error
    assert results[1].kl == float("inf")
    # the evaluator is still usable, and the failure left the base weights in place
    assert ev.score(None, s.windows.pool[:2]).kl == 0.0


def test_one_failing_candidate_does_not_fail_its_siblings(tiny_sessions, monkeypatch):
    s = tiny_sessions("fp32")
    p = _problem(s)
    ev = s.evaluator(p)
    good, other, bad = _candidates(p)
    fid = Fidelity(tokens=2 * TINY_SEQLEN, seed=7)
    expected = [ev.evaluate([Candidate(x, fid)])[0].kl for x in (good, other)]
    _failing_level(ev, monkeypatch, "rtn-b2-g48")
    results = ev.evaluate([Candidate(good, fid), Candidate(bad, fid), Candidate(other, fid)])
    assert not results[1].ok and "simulated out of memory" in results[1].error
    assert results[0].ok and results[2].ok
    assert [results[0].kl, results[2].kl] == pytest.approx(expected, rel=1e-6)


def test_evaluate_measures_on_the_drawn_windows(tiny_sessions):
    s = tiny_sessions("fp32")
    p = _problem(s)
    ev = s.evaluator(p)
    x = tuple(_uniform(p, "rtn-b2-g48"))
    fid = Fidelity(tokens=3 * TINY_SEQLEN, seed=11)
    (r,) = ev.evaluate([Candidate(x, fid)])
    direct = ev.score(p.decode(x), s.windows.draw(fid.tokens, fid.seed))
    assert r.ok and r.kl == direct.kl and r.ppl == pytest.approx(direct.ppl, rel=1e-12)
