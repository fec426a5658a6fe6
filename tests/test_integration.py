"""On the real default model (SmolLM2-135M), with few tokens: loading is cached, GPTQ beats RTN on a
real layer's proxy error, and the unmodified plan has KL exactly 0.

The conversion from GGUF runs once per test session into a private `$PLANNER_CACHE`."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from planner.budget import Budget, Metric
from planner.data.corpus import builtin_text
from planner.data.windows import make_windows, tokenize
from planner.evaluate.evaluator import InProcessEvaluator
from planner.levels.gptq import gptq_quantize, proxy_error
from planner.levels.hessian import collect_hessians
from planner.levels.quant import QuantSpec, rtn_quantize
from planner.model.families import DEFAULT_MODEL
from planner.model.load import load_model
from planner.problem import Problem
from planner.units import find_units

from .conftest import cache_env, torch_threads

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

LAYER = 5
UNITS = (f"model.layers.{LAYER}.mlp.down_proj", f"model.layers.{LAYER}.self_attn.q_proj")


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-model-cache")


@pytest.fixture(scope="module")
def real(real_cache):
    """The default model loaded once (converted from its GGUF into the private cache)."""
    with cache_env(real_cache), torch_threads(1):
        return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def real_tokens(real) -> torch.Tensor:
    return tokenize(real.tokenizer, builtin_text())


def test_default_model_shape(real, real_cache):
    cfg = real.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert cfg.tie_word_embeddings and len(find_units(real.model)) == 210
    assert str(real_cache) in real.source          # converted into the private cache, not ~/.cache


def test_second_load_is_fast_and_identical(real, real_cache):
    with cache_env(real_cache), torch_threads(1):
        t0 = time.perf_counter()
        again = load_model(DEFAULT_MODEL)
        seconds = time.perf_counter() - t0
    assert seconds < 2.0, f"second load took {seconds:.2f} s: the GGUF conversion is not cached"
    assert again.source == real.source
    a, b = real.model.state_dict(), again.model.state_dict()
    for name in (f"model.layers.{LAYER}.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def layer_hessians(real, real_tokens):
    """H of the two units from 8 windows of 256 builtin-corpus tokens.

    Only blocks 0..LAYER are run (the later blocks cannot change these inputs): a 6x cheaper pass."""
    windows = make_windows(real_tokens, 256, calib_tokens=8 * 256, eval_tokens=256, seed=0)
    calib = windows.ids[windows.calib]
    assert calib.shape == (8, 256)
    units = [u for u in find_units(real.model) if u.name in UNITS]
    blocks = real.model.model.layers
    real.model.model.layers = nn.ModuleList(list(blocks)[: LAYER + 1])
    try:
        with torch_threads(1):
            H = collect_hessians(real.model, units, calib)
    finally:
        real.model.model.layers = blocks
    return {u.name: H[u.group] for u in units}


@pytest.mark.parametrize("unit", UNITS)
def test_gptq_beats_rtn_on_a_real_layer(real, layer_hessians, unit):
    H = layer_hessians[unit]
    W = real.model.get_submodule(unit).weight.detach().float()
    assert H.shape == (W.shape[1], W.shape[1]) and torch.isfinite(H).all()
    specs = [QuantSpec(3, 128), QuantSpec(4, 128)]
    with torch_threads(1):
        gptq = gptq_quantize(W, H, specs)
    errors = {}
    for spec, q in zip(specs, gptq, strict=True):
        g = proxy_error(W, q.dequantize(), H)
        r = proxy_error(W, rtn_quantize(W, spec).dequantize(), H)
        assert 0 < g < 0.7 * r, (unit, spec.bits, g, r)     # measured: GPTQ ~0.25-0.3x RTN
        errors[spec.bits] = g
    assert errors[3] > errors[4]


def test_unmodified_plan_has_kl_exactly_zero(real_cache, real_tokens):
    with cache_env(real_cache):
        loaded = load_model(DEFAULT_MODEL)          # the evaluator casts its model to bf16 in place
    units = find_units(loaded.model)
    n = len(units)
    numel = np.array([u.numel for u in units], dtype=np.int64)
    # a one-level problem: the unmodified plan needs no levels DB
    problem = Problem(units=tuple(u.name for u in units), numel=numel, levels=(("base",),) * n,
                      code_bits=16.0 * numel[:, None], stored_bits=16.0 * numel[:, None],
                      budget=Budget(16.0, Metric.BITS))
    windows = make_windows(real_tokens[: 24 * 128], 128, calib_tokens=128, eval_tokens=128, seed=0)
    with torch_threads(1):
        ev = InProcessEvaluator(loaded.model, db=None, problem=problem, windows=windows)  # type: ignore[arg-type]
        pool = windows.pool
        first = ev.score(None, pool[:4])
        assert first.kl == 0.0 and first.tokens == 4 * 128
        assert 1.0 < first.ppl < 1e4
        # a batch mixing cached and fresh reference windows (other batch shapes) is still exactly 0
        assert ev.score(None, pool[2:7]).kl == 0.0
