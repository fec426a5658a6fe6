"""`tie: expert` (search_spaces/moe-per-expert.yaml): one unit per MoE expert, its matrices on one
level; moe-lp, evo and the expert heatmap work on that problem, from the library and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner.budget import parse_budget
from planner.errors import BadSearchSpace
from planner.moe.heatmap import expert_bits, expert_layout
from planner.moe.stats import compute_stats, expert_table, lp_data
from planner.search import make_config, make_searcher
from planner.search.moe_lp import solve
from planner.space import Tie, load_space, parse_space

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, cache_env
from .test_cli import run_cli
from .test_moe_models import save
from .test_moe_units import MOE_SPACE

pytestmark = pytest.mark.usefixtures("one_thread")

PER_EXPERT_SPACE = MOE_SPACE.replace("units: linear\n", "units: linear\ntie: expert\n")


def test_builtin_space_ties_experts():
    space = load_space("moe-per-expert")
    assert space.tie is Tie.EXPERT and "gptq-b2-g128" in {s.id for s in space.levels}
    with pytest.raises(BadSearchSpace, match="fused, subblock or expert"):
        parse_space({"tie": "experts", "levels": [{"method": "rtn", "bits": [4], "group_size": 32}]})


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("moe-per-expert")
    (root / "space.yaml").write_text(PER_EXPERT_SPACE)
    return root, {k: save(k, root / k, tiny_model_dir) for k in ("mixtral", "deepseek_v3")}


@pytest.fixture(scope="module")
def sessions(files, tiny_text_file, session_cache_dir):
    from planner.pipeline import ModelData, prepare

    root, folders = files
    out = {}
    with cache_env(session_cache_dir):
        for kind, folder in folders.items():
            md = ModelData(model=str(folder), dataset=str(tiny_text_file), seqlen=TINY_SEQLEN,
                           calib_tokens=TINY_CALIB_TOKENS, eval_tokens=TINY_EVAL_TOKENS, dtype="fp32")
            out[kind] = prepare(md, load_space(str(root / "space.yaml")), quiet=True)
    return out


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_one_unit_per_expert(sessions, kind):
    s = sessions[kind]
    problem = s.problem(parse_budget("3.0bits"))
    experts = {(u.block, u.expert) for u in s.units if u.expert >= 0}
    dense = [u for u in s.units if u.expert < 0]
    assert problem.n_units == len(experts) + len(dense)
    by_expert = {(u.block, u.expert): [] for u in s.units if u.expert >= 0}
    for u in s.units:
        if u.expert >= 0:
            by_expert[(u.block, u.expert)].append(u.name)
    groups = {tuple(g) for g in problem.members if len(g) > 1}
    assert groups == {tuple(names) for names in by_expert.values()}          # gate_up + down of one expert
    untied = s.db.problem(s.units, parse_budget("3.0bits"))
    x = np.random.default_rng(0).integers(0, problem.n_levels)
    plan = problem.decode(x).as_dict()
    for names in by_expert.values():
        assert len({plan[n] for n in names}) == 1
    a, b = problem.cost(x), untied.cost(untied.encode(problem.decode(x)))    # the same plan, the same costs
    assert (a.bits, a.bpw, a.nbytes) == pytest.approx((b.bits, b.bpw, b.nbytes), rel=1e-12)
    assert np.array_equal(problem.encode(problem.decode(x)), x)


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_moe_lp_and_evo_on_one_unit_per_expert(sessions, kind):
    import copy

    s = sessions[kind]
    problem = s.problem(parse_budget("3.0bits"))
    calib = s.windows.ids[s.windows.calib]
    stats = compute_stats(copy.deepcopy(s.loaded.model).float(), s.units, s.db, calib, max_tokens=256)
    data = lp_data(stats, problem)
    n_experts = len({(u.block, u.expert) for u in s.units if u.expert >= 0})
    assert len(data["experts"]) == n_experts and all(len(e) == 1 for e in data["experts"])
    assert sorted([e[0] for e in data["experts"]] + data["dense"]) == list(range(problem.n_units))
    x = solve(problem, make_config("moe-lp", data))
    assert problem.feasible(x)
    layers, n, units = expert_layout(problem, expert_table(stats))
    assert n == 4 and all(len(us) == 1 for row in units for us in row)
    assert np.isfinite(expert_bits(problem, x, units)).all()
    ev = s.evaluator(problem)
    evo = make_searcher("evo", problem, {"generations": 2, "offspring": 4, "stages": [[2, 64], [1, 128]],
                                         "init_x": [int(v) for v in x]}, 0)
    moved = set()
    while not evo.done():
        asked = evo.ask()
        moved |= {i for c in asked for i in np.flatnonzero(np.asarray(c.x) != x)}
        evo.tell(ev.evaluate(asked))
    assert problem.feasible(evo.best())
    assert moved & {e[0] for e in data["experts"]}           # evo moves whole experts


def test_cli_per_expert_space_moe_lp_then_evo(files, tiny_text_file, tmp_path):
    root, folders = files
    args = ["--model", folders["mixtral"], "--dataset", tiny_text_file, "--space", root / "space.yaml",
            "--seqlen", TINY_SEQLEN, "--calib-tokens", TINY_CALIB_TOKENS, "--eval-tokens", TINY_EVAL_TOKENS,
            "--threads", "1", "-q", "--uniform-tokens", "128", "--budget", "3.0bits", "--runs-dir", tmp_path]
    rc, out, err = run_cli(["search", "--method", "moe-lp", *args, "--name", "lp"])
    assert rc == 0, err
    rc, out, err = run_cli(["search", "--method", "evo", "--init", "moe-lp", "--generations", "2", "--offspring", "3",
                            "--stages", "2@64,1@128", *args, "--name", "evo"])
    assert rc == 0, err
    for name in ("lp", "evo"):
        plan = json.loads((tmp_path / name / "best_plan.json").read_text())["plan"]
        for b in (0, 1):
            for j in range(4):
                prefix = f"model.layers.{b}.mlp.experts.{j}"
                assert plan[f"{prefix}.gate_up_proj"] == plan[f"{prefix}.down_proj"]
    problem = json.loads((tmp_path / "evo" / "problem.json").read_text())
    assert len(problem["units"]) == 8 + 8                  # 8 attention linears, 8 experts
    rc, out, err = run_cli(["report", tmp_path / "lp", tmp_path / "evo", "--out", tmp_path / "report.html"])
    assert rc == 0, err
