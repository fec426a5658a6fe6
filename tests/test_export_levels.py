"""Format and GGUF-native levels through the exporters and the packed runtime.

Two tiny Llamas: the conftest one (64/128-wide rows: only GGUF's 32-weight blocks fit, so a Q4_K
level falls back to Q5_0 as llama-quantize does) and a one-block "wide" one (256/512-wide rows)
where the K-quants and IQ4_XS are stored as themselves. A llama.cpp export of GGUF levels is read
back by the gguf package and by transformers and must give the planner's dequantized levels bit
for bit; a packed export of a plan mixing gptq, format and gguf levels must reload (export loader
and runtime) to the planner's plan-applied model; targets that cannot serve a level refuse it.
"""

from __future__ import annotations

import dataclasses
import json
import re

import gguf
import numpy as np
import pytest
import torch

from planner.budget import Budget, Metric
from planner.export import NotDeployable, Target, check_deployable, export_plan, require_deployable
from planner.export.gguf_file import row_permutation
from planner.export.level_ids import level_spec
from planner.export.verify import compare_models, planned_model
from planner.levels.formats import FormatSpec, Rounding
from planner.levels.gguf_levels import GGUFSpec, GGUFWeight
from planner.levels.grids import Format, Grid
from planner.model.families import family_of
from planner.plan import Plan
from planner.space import LevelSpec, Method
from tests.conftest import TINY_CALIB_TOKENS, TINY_EVAL_TOKENS, TINY_SEQLEN, cache_env, torch_threads
from tests.test_cli import run_cli

SPACE = """\
name: export-levels
levels:
  - {method: gptq, bits: [4, 8], group_size: 32}
  - {method: rtn, bits: 8, group_size: 32, symmetric: true}
  - {method: format, grid: nf, bits: 4, group_size: 32, rounding: diag}
  - {method: format, grid: int, bits: 4, group_size: 32, symmetric: true, rounding: diag}   # Q4_0's layout
  - {method: format, grid: iq4nl, bits: 4, group_size: 32, rounding: mse}                   # IQ4_NL's layout
  - {method: gguf, types: [Q4_0, Q4_1, Q5_0, Q8_0, IQ4_NL, Q4_K], rounding: diag}
gptq: {damp: 0.01, block_size: 32}
"""
WIDE_SPACE = """\
name: export-levels-wide
levels:
  - {method: gguf, types: [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS], rounding: diag}
  - {method: format, grid: int, bits: 4, group_size: 32, scale_bits: 6, super_groups: 8, rounding: diag}  # Q4_K's
gptq: {damp: 0.01, block_size: 32}
"""
NF4, INT4_SYM, IQ4NL = "nf4-g32-diag", "int4-g32-sym-diag", "iq4nl-g32-mse"


def _prepare(model_data, space_text: str, tmp_path_factory, cache):
    from planner.pipeline import prepare
    from planner.space import load_space

    path = tmp_path_factory.mktemp("levels-space") / "space.yaml"
    path.write_text(space_text)
    with cache_env(cache), torch_threads(1):
        return prepare(model_data, load_space(str(path)), quiet=True), path


@pytest.fixture(scope="module")
def tiny(tiny_model_data, tmp_path_factory, session_cache_dir):
    return _prepare(tiny_model_data, SPACE, tmp_path_factory, session_cache_dir)


@pytest.fixture(scope="module")
def wide(tiny_model_dir, tiny_text_file, tmp_path_factory, session_cache_dir):
    """One Llama block with 256/512-wide rows (K-quant super-blocks fit), the conftest tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from planner.pipeline import ModelData

    out = tmp_path_factory.mktemp("wide-llama")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    config = AutoConfig.from_pretrained(tiny_model_dir)        # the conftest Llama, wider and one block deep
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 512, 1
    config.head_dim = 256 // config.num_attention_heads
    with torch_threads(1):
        torch.manual_seed(1)
        LlamaForCausalLM(config).save_pretrained(out)
    md = ModelData(model=str(out), dataset=str(tiny_text_file), seqlen=TINY_SEQLEN, calib_tokens=TINY_CALIB_TOKENS,
                   eval_tokens=TINY_EVAL_TOKENS, seed=0, dtype="fp32")
    return _prepare(md, WIDE_SPACE, tmp_path_factory, session_cache_dir)


def _problem(session):
    return session.db.problem(session.units, Budget(1e9, Metric.BITS))


def _plan(session, levels: list[str]) -> Plan:
    """Unit i takes levels[i % len(levels)]: every level kind appears, on every linear kind."""
    return Plan.of({u.name: levels[i % len(levels)] for i, u in enumerate(session.units)})


GGUF_TINY = ["gguf-q4_0-diag", "gguf-q4_1-diag", "gguf-q5_0-diag", "gguf-q8_0-diag", "gguf-iq4_nl-diag",
             "gguf-q4_k-diag", INT4_SYM, IQ4NL, "rtn-b8-g32-sym"]
MIXED = ["gptq-b4-g32", NF4, INT4_SYM, "gguf-q4_1-diag", "gguf-q4_k-diag", IQ4NL, "gguf-q8_0-diag", "gptq-b8-g32"]


# --- level ids and targets ---------------------------------------------------------------------

def test_level_ids_read_back_into_their_specs(tiny, wide):
    specs = [*tiny[0].space.all_levels, *wide[0].space.all_levels,
             FormatSpec(Format(Grid.KMEANS, 3, 128), Rounding.GPTQ, awq=True),
             FormatSpec(Format(Grid.INT, 3, 16, True, 6, 16), Rounding.MINMAX),
             FormatSpec(Format(Grid.NF, 2, 0), Rounding.MSE), GGUFSpec("IQ4_XS", Rounding.LLAMA),
             LevelSpec(Method.RTN, 8, 0, True)]
    for s in specs:
        assert level_spec(s.id) == s, s.id
    for other in ("sparsegpt-0.5", "drop", "gguf-q9_9-diag", "nf4-g32-sym-diag", "int4-g32-bogus"):
        assert level_spec(other) is None


def test_targets_serve_what_they_can(tiny):
    session, _ = tiny
    problem, shapes = _problem(session), {u.name: u.shape for u in session.units}
    for target in (Target.VLLM, Target.GPTQMODEL):
        v = check_deployable(_plan(session, [NF4]), problem, target, shapes)
        assert len(v) == len(session.units) and NF4 in v[0].reason and target.value in v[0].reason
        assert "gguf-q4_k-diag" in check_deployable(_plan(session, ["gguf-q4_k-diag"]), problem, target)[0].reason
    assert check_deployable(_plan(session, GGUF_TINY), problem, Target.LLAMACPP, shapes) == []
    assert check_deployable(_plan(session, MIXED), problem, Target.PACKED, shapes) == []
    why = check_deployable(_plan(session, [NF4]), problem, Target.LLAMACPP, shapes)[0].reason
    assert "no GGUF type" in why and NF4 in why
    with pytest.raises(NotDeployable, match=f"cannot be served by vllm: .* {NF4}"):
        require_deployable(_plan(session, [NF4]), problem, Target.VLLM)


# --- llama.cpp: GGUF levels are written as they are stored ---------------------------------------

def _check_gguf_export(session, plan: Plan, out, want_types: dict[str, str]) -> None:
    """Types in tensor-types.txt and model.gguf are the levels' stored types; the file's blocks, read
    back by gguf and by transformers, are the planner's dequantized levels bit for bit."""
    from transformers import AutoModelForCausalLM

    from planner.export.llamacpp import gguf_name

    export_plan(session, _problem(session), plan, "llamacpp", out, dtype="fp32")
    db, cfg = session.db, session.loaded.model.config
    rules = [line.rsplit("=", 1) for line in (out / "tensor-types.txt").read_text().split()]
    tensors = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}
    encoded = {t["unit"]: t["encoded"] for t in json.loads((out / "llamacpp.json").read_text())["tensors"]}
    family = family_of(cfg.model_type)
    for u in session.units:
        level = plan.as_dict()[u.name]
        name = gguf_name(u, family)
        t = tensors[name]
        assert t.tensor_type.name == want_types[level], (u.name, level)
        assert [typ for rx, typ in rules if re.search(rx, name)] == [want_types[level].lower()]
        stored = db.load(u.name, level)
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(name.split(".")[2])
        perm = row_permutation(u.shape[0], heads) if heads else np.arange(u.shape[0])
        data = np.asarray(t.data).reshape(u.shape[0], -1)
        if isinstance(stored, GGUFWeight):
            assert encoded[u.name] == "raw" and np.array_equal(data, stored.blocks.numpy()[perm])
        deq = gguf.quants.dequantize(data, t.tensor_type).reshape(u.shape)
        back = np.empty_like(deq)
        back[perm] = deq
        assert torch.equal(torch.from_numpy(back), db.weight(u.name, level, torch.float32)), (u.name, level)
    with torch_threads(1):
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    for u in session.units:          # transformers dequantizes (and un-permutes) to the same weights
        assert torch.equal(model.get_submodule(u.name).weight, db.weight(u.name, plan.as_dict()[u.name],
                                                                          torch.float32)), u.name
    with torch_threads(1):
        c = compare_models(planned_model(session.loaded.model, db, plan), model,
                           session.windows.ids[session.windows.heldout][:2])
    assert c.kl == pytest.approx(0.0, abs=1e-6)


def test_llamacpp_writes_gguf_levels_losslessly(tiny, tmp_path):
    session, _ = tiny
    want = {"gguf-q4_0-diag": "Q4_0", "gguf-q4_1-diag": "Q4_1", "gguf-q5_0-diag": "Q5_0", "gguf-q8_0-diag": "Q8_0",
            "gguf-iq4_nl-diag": "IQ4_NL", "gguf-q4_k-diag": "Q5_0",     # 64/128-wide rows: llama-quantize's fallback
            INT4_SYM: "Q4_0", IQ4NL: "IQ4_NL", "rtn-b8-g32-sym": "Q8_0"}
    _check_gguf_export(session, _plan(session, GGUF_TINY), tmp_path / "gguf", want)
    lines = (tmp_path / "gguf" / "planner-export.json").read_text()
    assert json.loads(lines)["gguf_file"] == "model.gguf"


def test_llamacpp_writes_k_quants_losslessly(wide, tmp_path):
    session, _ = wide
    assert all(u.shape[1] % 256 == 0 for u in session.units)      # every row holds whole super-blocks
    levels = ["gguf-q2_k-diag", "gguf-q3_k-diag", "gguf-q4_k-diag", "gguf-q5_k-diag", "gguf-q6_k-diag",
              "gguf-iq4_xs-diag", "int4-g32-d6x8-diag"]
    want = {lv: lv.split("-")[1].upper() for lv in levels[:-1]} | {"int4-g32-d6x8-diag": "Q4_K"}
    _check_gguf_export(session, _plan(session, levels), tmp_path / "gguf", want)


# --- packed: any level kind, exported and reloaded ----------------------------------------------

def test_packed_export_carries_every_level_kind(tiny, tmp_path):
    from safetensors.torch import load_file

    from planner.export.packed import load_packed, load_packed_weights
    from planner.runtime import load_packed as load_runtime
    from planner.runtime.packed import DequantLinear, PackedLinear, packed_modules

    session, _ = tiny
    plan = _plan(session, MIXED)
    out = tmp_path / "packed"
    export_plan(session, _problem(session), plan, "packed", out, dtype="fp32")
    manifest = json.loads((out / "packed.json").read_text())
    assert manifest["schema"] == 2
    assert {m["builder"] for m in manifest["modules"].values()} == {"gptq", "format", "gguf"}
    tensors = load_file(str(out / "packed.safetensors"))
    for name, stored in load_packed_weights(out).items():       # the DB's stored bytes, unchanged
        level = plan.as_dict()[name]
        assert manifest["modules"][name]["spec"] == level_spec(level).to_json()
        for key, t in session.db.load(name, level).to_tensors(name).items():
            assert torch.equal(tensors[key], t), key
        assert torch.equal(stored.dequantize(), session.db.weight(name, level, torch.float32))
    ref = planned_model(session.loaded.model, session.db, plan)
    ids = session.windows.ids[session.windows.heldout][:2]
    with torch_threads(1):
        assert compare_models(ref, load_packed(out), ids).kl == pytest.approx(0.0, abs=1e-6)
        runtime = load_runtime(out, dtype=torch.float32)
        c = compare_models(ref, runtime, ids)
    assert c.kl == pytest.approx(0.0, abs=1e-5)
    mods = packed_modules(runtime)
    assert set(mods) == set(plan.as_dict())
    kernel = {lv for n, lv in plan.as_dict().items() if isinstance(mods[n], PackedLinear)}
    # integer grids with fp16 scales run on the kernels (Q4_K falls back to Q5_0 on these rows)
    assert kernel == {"gptq-b4-g32", "gptq-b8-g32", INT4_SYM, "gguf-q4_k-diag", "gguf-q8_0-diag"}
    for m in mods.values():
        if isinstance(m, DequantLinear):
            assert "kernel=dequant-per-forward" in repr(m) and "no dense weight kept" in repr(m)
            assert not any(p.numel() == m.in_features * m.out_features for p in m.parameters())
            assert m.weight_nbytes < m.in_features * m.out_features     # < 1 byte per weight


def test_kernel_form_is_exact_or_absent(tiny):
    from planner.runtime.packed import kernel_form

    session, _ = tiny
    u = session.units[0].name
    for level, has in ((INT4_SYM, True), ("gguf-q4_0-diag", True), ("gguf-q5_0-diag", True),
                       ("gguf-q8_0-diag", True), ("gptq-b4-g32", True), (NF4, False), (IQ4NL, False),
                       ("gguf-q4_1-diag", False), ("gguf-iq4_nl-diag", False)):
        stored = session.db.load(u, level)
        qw = kernel_form(stored)
        assert (qw is not None) == has, level
        if qw is not None:
            assert torch.equal(qw.dequantize(), stored.dequantize())


def test_real_evaluator_takes_every_level_kind(tiny):
    from planner.runtime import RealEvaluator, packed_modules

    session, _ = tiny
    problem = _problem(session)
    plan = _plan(session, MIXED)
    fake_ev = session.evaluator(problem)
    real_ev = RealEvaluator(session.loaded.model, session.db, problem, session.windows, dtype=fake_ev.dtype)
    windows = session.windows.heldout[:2]
    with torch_threads(1):
        fake, real = fake_ev.score(plan, windows), real_ev.score(plan, windows)
    assert fake.kl > 1e-5
    assert real.kl == pytest.approx(fake.kl, rel=1e-4) and real.nll == pytest.approx(fake.nll, rel=1e-5)
    assert not packed_modules(session.loaded.model)


# --- the CLI ------------------------------------------------------------------------------------

@pytest.fixture
def run_dir(tiny, tiny_model_data, tmp_path):
    from planner.rundir import RunDir

    session, space = tiny

    def make(levels: list[str], name: str):
        run = RunDir.create(tmp_path / name, {"budget": "8bits", "method": "uniform", "space": str(space),
                                              "model_data": dataclasses.asdict(tiny_model_data)})
        run.save_problem(_problem(session))
        run.write("best_plan.json", _plan(session, levels).to_json())
        return run.path

    return make


def test_cli_refuses_levels_a_target_cannot_serve(run_dir, tmp_path, session_cache_dir):
    from tests.test_cli import assert_one_error_line

    run = run_dir([NF4, "gptq-b4-g32"], "nf4")
    for fmt, words in (("compressed-tensors", "vllm"), ("gptqmodel", "gptqmodel"), ("llamacpp", "no GGUF type")):
        out = tmp_path / f"out-{fmt}"
        with cache_env(session_cache_dir):
            line = assert_one_error_line(*run_cli(["export", run, "--format", fmt, "--out", out, "-q"]), words)
        assert NF4 in line and not out.exists() and not out.with_name(out.name + ".partial").exists()
    with cache_env(session_cache_dir):
        rc, _, err = run_cli(["export", run, "--format", "packed", "--out", tmp_path / "p", "-q", "--threads", "1"])
    assert rc == 0, err
    gguf_run = run_dir(GGUF_TINY, "gguf")
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["export", gguf_run, "--format", "llamacpp", "--out", tmp_path / "g", "--threads", "1"])
    assert rc == 0, err
    assert "raw" in out and "llama-cli -m" in out


@pytest.fixture
def cli_args(tiny, tiny_model_dir, tiny_text_file):
    return ["--model", tiny_model_dir, "--dataset", tiny_text_file, "--space", tiny[1], "--seqlen", TINY_SEQLEN,
            "--calib-tokens", TINY_CALIB_TOKENS, "--eval-tokens", TINY_EVAL_TOKENS, "--threads", "1", "-q"]


def test_cli_eval_real_takes_every_level_kind(run_dir, cli_args, session_cache_dir):
    run, args = run_dir(MIXED, "mixed"), cli_args
    results = {}
    for flag in ([], ["--real"]):
        with cache_env(session_cache_dir):
            rc, out, err = run_cli(["eval", run / "best_plan.json", *args, *flag])
        assert rc == 0, err
        results[bool(flag)] = json.loads(out.strip().splitlines()[-1])
    assert results[True]["real"] and results[True]["kl"] == pytest.approx(results[False]["kl"], rel=1e-3, abs=1e-5)


def test_cli_search_real_over_format_and_gguf_levels(cli_args, tmp_path, session_cache_dir):
    with cache_env(session_cache_dir):
        rc, out, err = run_cli(["search", *cli_args, "--budget", "4.6bpw", "--method", "uniform", "--uniform-tokens",
                                "128", "--real", "--runs-dir", tmp_path, "--name", "real"])
    assert rc == 0, err
    best = json.loads((tmp_path / "real" / "best_plan.json").read_text())
    assert best["heldout_kl"] >= 0
    assert any(level_spec(lv).builder in ("format", "gguf") for lv in best["plan"].values())
