"""`planner search --target T` only produces plans T can serve (levels and fused schemes)."""

from __future__ import annotations

import json

from planner.cli import main
from planner.export.targets import Target, check_deployable
from planner.plan import Plan
from planner.rundir import RunDir
from tests.conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN

SPACE = """\
name: tiny-g32
levels:
  - method: rtn
    bits: [2, 3, 4, 8]
    group_size: 32
"""


def test_search_target_vllm_gives_deployable_plans(tmp_path, tiny_model_dir, tiny_text_file, one_thread):
    space = tmp_path / "g32.yaml"
    space.write_text(SPACE)
    runs = tmp_path / "runs"
    rc = main(["search", "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file), "--space", str(space),
               "--seqlen", str(TINY_SEQLEN), "--calib-tokens", str(TINY_CALIB_TOKENS), "--eval-tokens",
               str(TINY_EVAL_TOKENS), "--budget", "6.0bits", "--target", "vllm", "--generations", "2",
               "--offspring", "3", "--stages", "2@64,1@128", "--uniform-tokens", "128", "--threads", "1", "-q",
               "--runs-dir", str(runs), "--name", "r"])
    assert rc == 0
    run = RunDir.open(runs / "r")
    problem = run.load_problem()
    assert problem.members, "fused groups are single units"
    for row in run.results():
        plan = problem.decode(row.x).as_dict()
        assert all(lv.split("-")[1] in ("b4", "b8") for lv in plan.values())
        for group in problem.members:
            assert len({plan[u] for u in group}) == 1
    best = Plan.from_json(json.loads((runs / "r" / "best_plan.json").read_text()))
    assert check_deployable(best, problem, Target.VLLM) == []
    # and the engine's format takes it: fused units expand back to the model's own modules
    assert main(["export", str(runs / "r"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
                 "--threads", "1", "-q"]) == 0
