"""Format and GGUF levels through the whole pipeline on the tiny model: the levels DB records costs
equal to the stored bytes, and `planner search` takes a bpw or a size budget over them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from planner.budget import parse_budget
from planner.report.html import pareto_figure
from planner.rundir import RunDir

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, cache_env
from .test_cli import run_cli

SPACE = """\
name: tiny-formats
units: linear
levels:
  - method: format
    grid: int
    bits: [2, 3]
    group_size: 16
    scale_bits: 6
    super_groups: 4
    rounding: diag
  - method: format
    grid: nf
    bits: 4
    group_size: 32
    rounding: gptq
  - method: gguf
    types: [Q4_K, Q4_0, Q8_0]      # the tiny model's 64/128-wide rows: Q4_K falls back to Q5_0
    rounding: diag
"""


@pytest.fixture(scope="module")
def args(tiny_model_dir, tiny_text_file, tmp_path_factory):
    space = tmp_path_factory.mktemp("spaces") / "tiny-formats.yaml"
    space.write_text(SPACE)
    return ["--model", str(tiny_model_dir), "--dataset", str(tiny_text_file), "--space", str(space),
            "--seqlen", str(TINY_SEQLEN), "--calib-tokens", str(TINY_CALIB_TOKENS),
            "--eval-tokens", str(TINY_EVAL_TOKENS), "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def session(tiny_model_data, args, session_cache_dir):
    from planner.pipeline import prepare
    from planner.space import load_space

    with cache_env(session_cache_dir):
        return prepare(tiny_model_data, load_space(args[args.index("--space") + 1]), quiet=True)


def test_db_costs_are_the_stored_bytes(session):
    db = session.db
    for unit in db.units:
        ids = {lv.id for lv in db.levels(unit)}
        assert ids == {"int2-g16-d6x4-diag", "int3-g16-d6x4-diag", "nf4-g32-gptq", "gguf-q4_k-diag",
                       "gguf-q4_0-diag", "gguf-q8_0-diag"}
        for lv in db.levels(unit):
            stored = db.load(unit, lv.id)
            assert lv.stored_bits == 8 * stored.nbytes == 8 * lv.nbytes, (unit, lv.id)
            shape = session.loaded.model.get_submodule(unit).weight.shape
            assert db.weight(unit, lv.id, torch.float32).shape == shape
        assert db.load(unit, "gguf-q4_k-diag").gguf_type == "Q5_0"


def test_budgets_in_bpw_and_bytes(session):
    p = session.problem(parse_budget("4.0bpw"))      # raises when infeasible
    cheapest = p.cost(np.zeros(p.n_units, dtype=int))
    assert cheapest.bpw < 4.0 < p.cost(p.n_levels - 1).bpw
    assert cheapest.nbytes * 8 == pytest.approx(cheapest.bpw * p.total_numel, abs=8)
    session.problem(parse_budget(f"{cheapest.nbytes * 1.2:.0f}B"))


def test_search_with_a_bpw_budget(args, tmp_path, session_cache_dir):
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *args, "--budget", "4.0bpw", "--generations", "2", "--offspring", "3",
                                "--stages", "2@64,1@128", "--uniform-tokens", "128", "--runs-dir", tmp_path,
                                "--name", "fmt"])
    assert rc == 0, err
    best = json.loads((tmp_path / "fmt" / "best_plan.json").read_text())
    assert best["bpw"] <= 4.0 + 1e-9 and best["budget"] == "4bpw"
    assert "uniform gguf-q4_0-diag" in out
    run = RunDir.open(tmp_path / "fmt")
    assert all(r.bpw <= 4.0 + 1e-9 for r in run.results() if r.method == "evo")
    fig = pareto_figure(run.results(), run.heldout(), run.load_problem())     # bpw budget: a bpw x-axis first
    held = next(t for t in fig.data if t.name == "held-out")
    assert fig.layout.xaxis.title.text == "bpw" and list(held.x) == [r.bpw for r in run.heldout()]
    assert fig.layout.shapes[0].x0 == 4.0
