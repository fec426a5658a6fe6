"""Expert statistics on calibration data (frequency, routing weight, output error per level, dense
output errors), their cache, and `planner search --method moe-lp` / `--method evo --init moe-lp`
end to end on a tiny random Mixtral."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from planner.levels.gptq import proxy_error
from planner.moe.experts import moe_blocks
from planner.moe.routing import capture_routing, routed
from planner.moe.stats import cached_stats, compute_stats, frequency_summary, lp_data
from planner.rundir import RunDir

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, cache_env
from .test_cli import assert_one_error_line, run_cli
from .test_moe_models import save
from .test_moe_units import MOE_SPACE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("moe-stats")
    (root / "space.yaml").write_text(MOE_SPACE)
    return save("mixtral", root / "mixtral", tiny_model_dir), root / "space.yaml"


@pytest.fixture(scope="module")
def session(moe_files, tiny_text_file, session_cache_dir):
    from planner.pipeline import ModelData, prepare
    from planner.space import load_space

    folder, space = moe_files
    md = ModelData(model=str(folder), dataset=str(tiny_text_file), seqlen=TINY_SEQLEN, calib_tokens=TINY_CALIB_TOKENS,
                   eval_tokens=TINY_EVAL_TOKENS, dtype="fp32")
    with cache_env(session_cache_dir):
        return prepare(md, load_space(str(space)), quiet=True)


@pytest.fixture(scope="module")
def stats(session):
    model = copy.deepcopy(session.loaded.model).float()
    calib = session.windows.ids[session.windows.calib]
    return model, compute_stats(model, session.units, session.db, calib, max_tokens=10_000)


def test_frequencies_and_weights(session, stats):
    model, st = stats
    freq = frequency_summary(st)
    assert freq.shape == (2, 4)
    np.testing.assert_allclose(freq.sum(axis=1), 2.0)          # top-2 routing: a layer's experts sum to 2
    assert all(0 < e.weight <= 1 for e in st.experts if e.tokens)
    # mean weights of a layer, weighted by tokens, sum to 1 per token (Mixtral renormalizes its top-2)
    for b in (0, 1):
        rows = [e for e in st.experts if e.block == b]
        assert sum(e.weight * e.tokens for e in rows) == pytest.approx(st.tokens, rel=1e-5)


def test_expert_errors_match_the_models_own_expert_forward(session, stats):
    model, st = stats
    model.set_experts_implementation("eager")
    units = session.units
    blocks = moe_blocks(model, units)
    calib = session.windows.ids[session.windows.calib]
    X_of: dict[tuple[int, int], list] = {}
    capture_routing(model, blocks, calib, lambda mb, X, idx, w: [X_of.setdefault((mb.block, j), []).append(
        X[routed(idx, w, j)[0]].clone()) for j in range(4)])
    e = max(st.experts, key=lambda e: e.tokens)
    mb = next(b for b in blocks if b.block == e.block)
    experts = model.get_submodule(mb.experts)
    X = torch.cat(X_of[(e.block, e.expert)])
    one = torch.full((len(X), 1), e.expert)
    w = torch.ones(len(X), 1)
    ref = experts(X, one, w)
    level = "gptq-b2-g16"
    saved = {n: getattr(experts, n).data.clone() for n in ("gate_up_proj", "down_proj")}
    for name in e.units:
        getattr(experts, name.rsplit(".", 1)[1]).data[e.expert] = session.db.weight(name, level, torch.float32)
    quant = experts(X, one, w)
    for n, t in saved.items():
        getattr(experts, n).data = t
    assert e.error[level] == pytest.approx(float((quant - ref).pow(2).sum(-1).mean()), rel=1e-4)
    assert e.error["gptq-b8-g16"] < e.error["gptq-b4-g16"] < e.error["gptq-b2-g16"]


def test_dense_errors_are_layer_local_output_errors(session, stats):
    from planner.levels.hessian import collect_hessians

    model, st = stats
    u = next(u for u in session.units if u.kind == "o_proj")
    H = collect_hessians(model, [u], session.windows.ids[session.windows.calib])[u.group]
    W = model.get_submodule(u.name).weight
    for lv in ("gptq-b2-g16", "gptq-b4-g16"):
        expect = proxy_error(W, session.db.weight(u.name, lv, torch.float32), H) / 2
        assert st.dense[u.name][lv] == pytest.approx(expect, rel=1e-5)


def test_block_gains(session, stats):
    model, st = stats
    assert sorted(st.kl) == [0, 1] and all(kl > 0 for kl in st.kl.values())
    for currency in ("block", "linear"):
        assert sorted(st.gain[currency]) == [0, 1] and all(0 < g < float("inf") for g in st.gain[currency].values())
    from planner.budget import parse_budget

    problem = session.problem(parse_budget("3.0bits"))
    for currency in ("block", "linear"):
        raw, weighted = lp_data(st, problem, gains=False, currency=currency), lp_data(st, problem, currency=currency)
        e = 0
        g = st.gain[currency][raw["layers"][e]]
        assert weighted["error"][e][0] == pytest.approx(g * raw["error"][e][0])
        assert weighted["damage"][0][0] == pytest.approx(st.gain[currency][0] * raw["damage"][0][0])
    assert "expert_damage" in lp_data(st, problem) and "expert_damage" not in lp_data(st, problem, currency="linear")


def test_stats_are_cached_and_feed_the_program(session, stats, monkeypatch):
    model, _ = stats
    calib = session.windows.ids[session.windows.calib]
    first = cached_stats(lambda: model, session.units, session.db, calib, max_tokens=64)
    monkeypatch.setattr("planner.moe.stats.compute_stats", lambda *a, **k: pytest.fail("recomputed"))
    again = cached_stats(lambda: pytest.fail("model loaded"), session.units, session.db, calib, max_tokens=64)
    assert again == first
    from planner.budget import parse_budget
    from planner.search import make_config
    from planner.search.moe_lp import solve

    problem = session.problem(parse_budget("3.0bits"))
    data = lp_data(first, problem)
    assert len(data["experts"]) == 8 and len(data["dense"]) == 8 and len(data["levels"]) == 6
    x = solve(problem, make_config("moe-lp", data))
    assert problem.feasible(x)


# --- CLI ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_args(moe_files, tiny_text_file) -> list[str]:
    folder, space = moe_files
    return ["--model", str(folder), "--dataset", str(tiny_text_file), "--space", str(space),
            "--seqlen", str(TINY_SEQLEN), "--calib-tokens", str(TINY_CALIB_TOKENS),
            "--eval-tokens", str(TINY_EVAL_TOKENS), "--threads", "1", "-q", "--uniform-tokens", "128"]


def test_cli_moe_lp_then_evo_from_it(data_args, tmp_path):
    runs = tmp_path / "runs"
    rc, out, err = run_cli(["search", "--budget", "3.0bits", "--method", "moe-lp", "--moe-cost", "frequency",
                            "--moe-a", "0.5", *data_args, "--runs-dir", runs, "--name", "lp"])
    assert rc == 0, err
    run = RunDir.open(runs / "lp")
    best = run.read("best_plan.json")
    assert best["method"] == "moe-lp" and best["bits"] <= 3.0 + 1e-9
    plan = best["plan"]
    for j in range(4):          # one level per expert: its gate_up and down agree
        assert plan[f"model.layers.0.mlp.experts.{j}.gate_up_proj"] == plan[f"model.layers.0.mlp.experts.{j}.down_proj"]
    table = json.loads((runs / "lp" / "moe_stats.json").read_text())
    assert len(table["experts"]) == 8 and run.config["method_config"]["cost"] == "frequency"
    lp_row = next(r for r in run.results() if r.method == "moe-lp")
    assert lp_row.label == "moe-lp frequency a=0.5 b=1"

    rc, out, err = run_cli(["search", "--budget", "3.0bits", "--method", "evo", "--init", "moe-lp", "--moe-cost",
                            "frequency", "--moe-a", "0.5", "--generations", "2", "--offspring", "3", "--stages",
                            "2@64,1@128", *data_args, "--runs-dir", runs, "--name", "evo"])
    assert rc == 0, err
    evo = RunDir.open(runs / "evo")
    parents = [r for r in evo.results() if r.method == "evo" and r.label == "parent"]
    start = np.array(parents[0].x)                       # evo starts from the moe-lp plan, its slack filled
    assert (start >= np.array(lp_row.x)).all() and parents[0].bits <= 3.0 + 1e-9
    touched = {i for r in evo.results() if r.method == "evo" for i in np.flatnonzero(np.array(r.x) != lp_row.x)}
    problem = evo.load_problem()
    assert any(".experts." in problem.units[i] for i in touched)   # and mutates expert units
    check_dashboard(runs, lp_row)


def check_dashboard(runs, lp_row):
    """`planner report` of both runs: the expert heatmap's data, and (with chromium) its drawing."""
    from planner.moe.heatmap import expert_bits
    from planner.report.dashboard import dashboard_data
    from planner.report.tables import load_runs

    rc, out, err = run_cli(["report", runs / "lp", runs / "evo", "--out", runs / "report.html"])
    assert rc == 0, err
    loaded = load_runs([runs / "lp", runs / "evo"])
    moe = dashboard_data(loaded)["moe"]
    assert moe["layers"] == [0, 1] and moe["experts"] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.sum(moe["frequency"], axis=1), 2.0)
    bits = expert_bits(loaded.problem, lp_row.x, moe["units"])
    assert bits.shape == (2, 4) and np.isfinite(bits).all()
    from .test_dashboard import CHROMIUM, CHROMIUM_ARGS

    if CHROMIUM is None:
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((runs / "report.html").as_uri())
        page.wait_for_function("document.getElementById('experts').data !== undefined", timeout=20_000)
        z = page.evaluate("document.getElementById('experts').data.map(t => t.z)")
        browser.close()
    assert len(z) == 2 and len(z[0]) == 2 and len(z[0][0]) == 4 and errors == []


@pytest.mark.parametrize("argv,match", [
    (["--method", "ilp", "--moe-cost", "error"], "--moe-* flags apply"),
    (["--method", "tpe", "--init", "moe-lp"], "--init moe-lp warm-starts evo"),
    (["--method", "moe-lp", "--moe-min-count", "gptq-b2"], "malformed --moe-min-count"),
])
def test_cli_moe_flag_errors(data_args, tmp_path, argv, match):
    assert_one_error_line(*run_cli(["search", "--budget", "3.0bits", *argv, *data_args, "--runs-dir", tmp_path]),
                          match=match)
