"""The CLI on a tiny MoE whose experts are slices of fused 3-D tensors (transformers' Mixtral):
sensitivity scores and the proxy searchers work per expert slice; exports (every format), the
packed runtime (`--real`), `--target` and sequential calibration stop before any work with one
line and exit code 2, leaving nothing on disk. The per-expert modules of older checkpoints are not
refused."""

from __future__ import annotations

import json

import pytest

from planner.moe.experts import fused_slices

from .conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN
from .test_cli import assert_no_run_dir, assert_one_error_line, run_cli
from .test_moe_models import save
from .test_moe_units import MOE_SPACE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_args(tmp_path_factory, tiny_model_dir, tiny_text_file) -> list[str]:
    root = tmp_path_factory.mktemp("moe-cli")
    (root / "space.yaml").write_text(MOE_SPACE)
    folder = save("mixtral", root / "mixtral", tiny_model_dir)
    return ["--model", str(folder), "--dataset", str(tiny_text_file), "--space", str(root / "space.yaml"),
            "--seqlen", str(TINY_SEQLEN), "--calib-tokens", str(TINY_CALIB_TOKENS),
            "--eval-tokens", str(TINY_EVAL_TOKENS), "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def uniform_run(data_args, tmp_path_factory):
    runs = tmp_path_factory.mktemp("moe-cli-runs")
    rc, out, err = run_cli(["search", "--budget", "3.0bits", "--method", "uniform", "--uniform-tokens", "128",
                            *data_args, "--runs-dir", runs, "--name", "u"])
    assert rc == 0, err
    return runs / "u"


@pytest.mark.parametrize("score", ["fisher", "proxy", "noise"])
def test_sensitivity_scores_every_expert_slice(data_args, score):
    rc, out, err = run_cli(["sensitivity", "--score", score, "--top", "100", *data_args])
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    names = [r[0] for r in rows]
    assert len(names) == 24 and len(fused_slices(names)) == 16        # 8 attention linears, 4 experts x 2 x 2 layers
    assert all(float(r[-1]) > 0 for r in rows)                       # every slice has its own damage


def test_proxy_searcher_on_fused_experts(data_args, tmp_path):
    rc, out, err = run_cli(["search", "--budget", "3.0bits", "--method", "ilp", "--uniform-tokens", "128",
                            *data_args, "--runs-dir", tmp_path, "--name", "ilp"])
    assert rc == 0, err
    best = json.loads((tmp_path / "ilp" / "best_plan.json").read_text())
    assert best["method"] == "ilp" and best["bits"] <= 3.0 + 1e-9
    sens = json.loads((tmp_path / "ilp" / "sensitivity.json").read_text())
    assert len(fused_slices(sens["units"])) == 16


@pytest.mark.parametrize("fmt", ["packed", "llamacpp", "gptqmodel", "compressed-tensors"])
def test_export_refuses_fused_experts(uniform_run, tmp_path, fmt):
    out = tmp_path / "export"
    line = assert_one_error_line(*run_cli(["export", uniform_run, "--format", fmt, "--out", out, "-q"]),
                                 match="planner export does not support MoE experts stored as fused 3-D tensors")
    assert "planner eval" in line and "experts.0.gate_up_proj" in line
    assert not out.exists() and not (tmp_path / "export.partial").exists()


def test_real_runtime_refuses_fused_experts(uniform_run, data_args, tmp_path):
    match = "the packed runtime (--real) does not support MoE experts stored as fused 3-D tensors"
    assert_one_error_line(*run_cli(["eval", uniform_run / "best_plan.json", "--real", *data_args]), match=match)
    runs = tmp_path / "runs"
    assert_one_error_line(*run_cli(["search", "--budget", "3.0bits", "--real", *data_args, "--runs-dir", runs]),
                          match=match)
    assert_no_run_dir(runs)


def test_target_refuses_fused_experts(data_args, tmp_path):
    runs = tmp_path / "runs"
    line = assert_one_error_line(*run_cli(["search", "--budget", "3.0bits", "--target", "packed", *data_args,
                                           "--runs-dir", runs]), match="--target packed (exports) does not support")
    assert "search without --target" in line
    assert_no_run_dir(runs)


def test_names_alone_tell_fused_from_per_expert_modules():
    fused = ["model.layers.0.mlp.experts.3.gate_up_proj", "model.layers.0.mlp.experts.3.down_proj"]
    legacy = ["model.layers.0.block_sparse_moe.experts.3.w1", "model.layers.0.mlp.experts.3.down_proj",
              "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.0.up_proj"]
    dense = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    assert fused_slices(fused + legacy[:1] + dense) == fused
    assert fused_slices(legacy + dense) == []


def test_sequential_calibration_refuses_fused_experts(data_args, tmp_path, monkeypatch):
    space = tmp_path / "seq.yaml"
    space.write_text(MOE_SPACE + "calibration:\n  sequential: gptq-b4-g16\n")
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "cache"))
    args = [a if a != data_args[data_args.index("--space") + 1] else space for a in data_args]
    assert_one_error_line(*run_cli(["levels", "build", *args]), match="calibration: sequential does not support")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))
