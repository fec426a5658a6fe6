"""The packed runtime: PackedLinear against the levels DB's own dequantization, pack_model on the
tiny model, real evaluation (KL through the kernels = KL of fake quantization), memory accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.cpu import CpuKind
from kernels.reference import dequantize
from planner.levels.quant import QuantSpec, rtn_quantize
from planner.plan import Plan
from planner.runtime import PackedLinear, RealEvaluator, pack_model, packed_from_quantized, packed_modules
from tests.conftest import TINY_BITS, TINY_GROUP


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_quantized_weight_converts_exactly(bits, symmetric):
    W = torch.randn(48, 100, generator=torch.Generator().manual_seed(bits))
    qw = rtn_quantize(W, QuantSpec(bits, 32, symmetric))
    pw = packed_from_quantized(qw)
    assert torch.equal(dequantize(pw), qw.dequantize())
    assert torch.equal(PackedLinear(pw).dequantize(), qw.dequantize())


@pytest.mark.parametrize("bits,kind", [(2, "unpack"), (3, "unpack"), (4, "int4pack"), (8, "int8pack")])
def test_packed_linear_matches_dense_linear(bits, kind):
    torch.manual_seed(bits)
    dense = nn.Linear(128, 64, bias=True).requires_grad_(False)
    qw = rtn_quantize(dense.weight.detach(), QuantSpec(bits, 64))
    lin = PackedLinear.from_quantized(qw, dense.bias)
    assert lin.kind == kind
    dense.weight.data = qw.dequantize()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for rows in (1, 5, 64):
            x = torch.randn(2, rows, 128).to(dtype)
            y, r = lin(x), dense.to(dtype)(x)
            assert y.dtype == dtype and y.shape == (2, rows, 64)
            assert float((y.float() - r.float()).abs().max()) <= tol * float(r.float().abs().max())
    assert lin.to(torch.bfloat16).packed().scales.dtype == torch.float16   # dtype moves leave scales alone


def _mixed_plan(problem) -> Plan:
    """Every tiny-space bitwidth used, GPTQ and RTN levels alternating."""
    chosen = {}
    for i, u in enumerate(problem.units):
        bits = TINY_BITS[i % len(TINY_BITS)]
        method = "gptq" if i % 2 else "rtn"
        chosen[u] = next(lv for lv in problem.levels[i] if lv.startswith(f"{method}-b{bits}-"))
    return Plan.of(chosen)


def test_pack_model_replaces_the_plans_linears(tiny_sessions):
    from planner.budget import Budget, Metric
    from planner.model.load import load_model

    session = tiny_sessions("fp32")
    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    plan = _mixed_plan(problem)
    model = load_model(session.spec.model).model
    ids = session.windows.ids[:2]
    fake = load_model(session.spec.model).model
    for u, level in plan.as_dict().items():
        fake.get_submodule(u).weight.data = session.db.weight(u, level, torch.float32)
    with torch.no_grad():
        expect = fake(ids).logits
        got = pack_model(model, plan, session.db)(ids).logits
    mods = packed_modules(model)
    assert set(mods) == set(plan.as_dict())
    assert {m.kind for m in mods.values()} == {"unpack", "int8pack"}   # group 48: torch's int4 op does not fit
    assert {m.bits for m in mods.values()} == set(TINY_BITS)
    assert float((got - expect).abs().max()) <= 1e-4 * float(expect.abs().max())
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n in mods)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 3e-3)])
def test_real_kl_equals_fake_quant_kl(tiny_sessions, dtype, tol):
    """KL through the packed runtime vs KL of the dequantized-weight evaluator, same windows."""
    from planner.budget import Budget, Metric

    session = tiny_sessions(dtype)
    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    plan = _mixed_plan(problem)
    fake_ev = session.evaluator(problem)
    real_ev = RealEvaluator(session.loaded.model, session.db, problem, session.windows, dtype=fake_ev.dtype)
    windows = session.windows.heldout[:2]
    fake, real = fake_ev.score(plan, windows), real_ev.score(plan, windows)
    assert fake.kl > 1e-5                                  # a plan that changes the (random, flat) model
    assert abs(real.kl - fake.kl) <= tol * fake.kl, (real.kl, fake.kl)
    assert abs(real.nll - fake.nll) <= tol * fake.nll
    # packed modules are all out again: the base model scores KL 0
    assert not packed_modules(session.loaded.model)
    assert real_ev.score(None, windows).kl == pytest.approx(0.0, abs=1e-6)


def test_real_evaluator_rejects_unknown_levels(tiny_sessions):
    from planner.budget import Budget, Metric
    from planner.errors import BadPlan

    session = tiny_sessions("fp32")
    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    ev = RealEvaluator(session.loaded.model, session.db, problem, session.windows, dtype=torch.float32,
                       cpu_kind=CpuKind.UNPACK)
    with pytest.raises(BadPlan):
        ev.apply(Plan.of({problem.units[0]: "gptq-b7-g48"}))
    assert TINY_GROUP == 48
