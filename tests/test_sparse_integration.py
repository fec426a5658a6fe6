"""SparseGPT against magnitude and Wanda on real layers of the default model (integration: loads
SmolLM2-135M and runs its first blocks on builtin-corpus windows)."""

from __future__ import annotations

import pytest
from torch import nn

from planner.data.corpus import builtin_text
from planner.data.windows import make_windows, tokenize
from planner.levels.gptq import proxy_error
from planner.levels.hessian import collect_hessians
from planner.levels.sparse_format import Pattern, check_mask
from planner.levels.sparsegpt import magnitude_prune, sparsegpt_prune, wanda_prune
from planner.model.families import DEFAULT_MODEL
from planner.model.load import load_model
from planner.units import find_units

from .conftest import cache_env, torch_threads

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

LAYER = 3
UNITS = (f"model.layers.{LAYER}.self_attn.q_proj", f"model.layers.{LAYER}.mlp.down_proj")


@pytest.fixture(scope="module")
def real_layers(tmp_path_factory):
    """(W, H) of two linears of block LAYER, H from 8 windows of 256 tokens (blocks 0..LAYER only)."""
    with cache_env(tmp_path_factory.mktemp("real-cache")), torch_threads(1):
        loaded = load_model(DEFAULT_MODEL)
    model = loaded.model
    windows = make_windows(tokenize(loaded.tokenizer, builtin_text()), 256, calib_tokens=8 * 256, eval_tokens=256, seed=0)
    units = [u for u in find_units(model) if u.name in UNITS]
    blocks = model.model.layers
    model.model.layers = nn.ModuleList(list(blocks)[: LAYER + 1])
    try:
        with torch_threads(1):
            H = collect_hessians(model, units, windows.ids[windows.calib])
    finally:
        model.model.layers = blocks
    return {u.name: (model.get_submodule(u.name).weight.detach().float(), H[u.group]) for u in units}


@pytest.mark.parametrize("unit", UNITS)
def test_sparsegpt_beats_magnitude_and_wanda_on_a_real_layer(real_layers, unit):
    W, H = real_layers[unit]
    patterns = [Pattern(0.5), Pattern(0.7), Pattern(n=2, m=4)]
    with torch_threads(1):
        pruned = sparsegpt_prune(W, H, [(p, None) for p in patterns])
    for p, r in zip(patterns, pruned, strict=True):
        check_mask(r.keep, p)
        s = proxy_error(W, r.W, H)
        m = proxy_error(W, magnitude_prune(W, p).W, H)
        w = proxy_error(W, wanda_prune(W, H, p).W, H)
        assert 0 < s < 0.8 * m and s < w, (unit, p.id, s, m, w)
