"""The HTML report: one offline page from a run dir, and graceful with missing optional files."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from planner.budget import Budget, Metric
from planner.plan import Plan
from planner.problem import Problem
from planner.report.html import convergence_figure, layer_heatmap, pareto_figure, write_report
from planner.rundir import Row, RunDir

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEVELS = ("gptq-b2-g128", "gptq-b3-g128", "gptq-b4-g128", "gptq-b8-g128")
BITS = np.array([2.0, 3.0, 4.0, 8.0])


def toy_problem() -> Problem:
    units, kinds, blocks, numel = [], [], [], []
    for b in range(2):
        for k in KINDS:
            group = "self_attn" if k.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            units.append(f"model.layers.{b}.{group}.{k}")
            kinds.append(k)
            blocks.append(b)
            numel.append(64 * 64 if group == "self_attn" else 64 * 128)
    n = np.array(numel, dtype=np.int64)
    return Problem(units=tuple(units), numel=n, levels=tuple(LEVELS for _ in units),
                   code_bits=n[:, None] * BITS[None, :], stored_bits=n[:, None] * (BITS[None, :] + 0.25),
                   budget=Budget(3.0, Metric.BITS), kinds=tuple(kinds), blocks=tuple(blocks))


def row(p: Problem, x, *, method="evo", generation=0, stage=0, tokens=512, kl=None, label="", error=None) -> Row:
    c = p.cost(x)
    kl = 2.0 ** (-c.bits) if kl is None else kl
    return Row(method=method, generation=generation, stage=stage, tokens=tokens, seed=0, kl=kl, ppl=10 + kl,
               bits=c.bits, bpw=c.bpw, bytes=c.nbytes, plan_id=p.decode(x).id, x=[int(v) for v in x],
               label=label, error=error)


@pytest.fixture
def bare(tmp_path) -> tuple[RunDir, Problem]:
    run = RunDir.create(tmp_path / "toy", {"name": "toy", "model": "tiny-llama", "dataset": "pydoc",
                                           "budget": "3.0bits", "method": "evo", "seed": 7})
    p = toy_problem()
    run.save_problem(p)
    return run, p


@pytest.fixture
def full(bare) -> tuple[RunDir, Problem, int]:
    run, p = bare
    rng = np.random.default_rng(0)
    n_ok = 0
    for g in range(3):
        for stage, tokens in enumerate((256, 1024)):
            for _ in range(3):
                run.append_result(row(p, rng.integers(0, 3, p.n_units), generation=g, stage=stage, tokens=tokens))
                n_ok += 1
    for _ in range(4):
        run.append_result(row(p, rng.integers(0, 4, p.n_units), method="random"))
        n_ok += 1
    run.append_result(row(p, np.zeros(p.n_units, int), kl=math.inf, error="CUDA OOM"))
    for lv in range(4):
        run.append_heldout(row(p, np.full(p.n_units, lv), method="uniform", tokens=4096, label=f"uniform {LEVELS[lv]}"))
    best_x = np.array([1] * 7 + [1, 1, 1, 1, 0, 0, 2])
    run.append_heldout(row(p, best_x, tokens=4096, label="best", kl=0.05))
    run.write("best_plan.json", p.decode(best_x).to_json(bits=p.cost(best_x).bits))
    run.write("checkpoint.json", {"searcher": {"history": [[0, 0.4], [1, 0.2], [2, 0.1]]}, "rows_seen": n_ok + 1})
    return run, p, n_ok


def test_full_report_is_offline_and_complete(full):
    run, p, n_ok = full
    out = write_report(run)
    assert out == run.path / "report.html" and out.is_file()
    page = out.read_text()
    assert '<script src="http' not in page and "<script src=" not in page
    assert page.count("plotly.js v") == 1                   # the bundle, inline, once
    assert page.count("Plotly.newPlot") == 3                 # pareto, heatmap, convergence
    assert page.count("class=best>") == 1 and "embeddings and lm_head are excluded" in page
    assert "1 failed evaluation" in page
    # the journal traces in the embedded pareto figure hold one point per successful row
    first = json.loads(re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', page, re.S).group(1))
    assert sum(len(t["x"]) for t in first if t.get("meta") == "journal") == n_ok


def test_pareto_figure_traces(full):
    run, p, n_ok = full
    fig = pareto_figure(run.results(), run.heldout(), p)
    journal = [t for t in fig.data if t.meta == "journal"]
    assert {t.name for t in journal} == {"journal: evo", "journal: random"}
    assert sum(len(t.x) for t in journal) == n_ok
    held = next(t for t in fig.data if t.name == "held-out")
    assert "star" in held.marker.symbol and list(held.text).count("best") == 1
    front = next(t for t in fig.data if t.name == "held-out front")
    assert 1 <= len(front.x) <= 5 and list(front.x) == sorted(front.x)
    assert fig.layout.shapes[0].x0 == 3.0 and fig.layout.yaxis.type == "log"
    bpw_args = fig.layout.updatemenus[0].buttons[1].args
    assert len(bpw_args[0]["x"]) == len(fig.data) and bpw_args[1]["shapes"] == []   # a bits budget has no bpw line


def test_heatmap_rows_are_kinds_columns_blocks(full):
    run, p, _ = full
    x = p.encode(Plan.from_json(run.read("best_plan.json")))
    hm = layer_heatmap(p, x).data[0]
    assert list(hm.y) == list(KINDS) and list(hm.x) == [0, 1]
    assert hm.z[6][1] == 4.0 and hm.text[6][1] == "gptq-b4-g128" and hm.z[0][0] == 3.0


def test_convergence_falls_back_to_journal(full):
    run, _, _ = full
    fig = convergence_figure([], run.results())
    assert len(fig.data) == 1 and list(fig.data[0].x) == [0, 1, 2]
    assert convergence_figure([], []) is None


def test_config_and_problem_only_still_renders(bare, tmp_path):
    run, _ = bare
    out = write_report(run, tmp_path / "elsewhere.html")
    page = out.read_text()
    assert out.name == "elsewhere.html" and "No held-out measurements yet" in page
    assert "No best plan yet" in page and "No evaluations yet" in page and "No convergence data" in page
    assert "<script src=" not in page


def test_report_never_imports_torch():
    code = "import sys, planner.report.html; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_best_plan_that_does_not_match_the_problem_is_said_in_words(bare):
    run, _ = bare
    run.write("best_plan.json", {"schema": 1, "id": "x", "plan": {"model.layers.9.mlp.up_proj": "rtn-b3"}})
    assert "does not match the units and levels" in write_report(run).read_text()
