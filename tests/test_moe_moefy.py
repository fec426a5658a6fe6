"""MoEfication (planner/moe/moefy.py) on the tiny Llama: with every expert active and a flat router
the MoE is the dense model; with top-2 the experts fire unevenly and the table finds its units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.model.load import load_model
from planner.moe.experts import moe_blocks
from planner.moe.moefy import MoefySpec, balanced_kmeans, moefy
from planner.moe.routing import capture_routing
from planner.units import find_units

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    return load_model(str(tiny_model_dir)).model


def _ids(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (n, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shared", [0.0, 0.25])
def test_all_experts_and_a_flat_router_reproduce_the_dense_model(dense, shared):
    moe = moefy(dense, _ids(), MoefySpec(n_experts=4, top_k=4, shared=shared, temperature=0.0, iters=3))
    assert moe.config.model_type == ("qwen2_moe" if shared else "mixtral")
    x = _ids(2, seed=1)
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-4, atol=1e-4)


def test_top2_routes_unevenly_and_is_planned(dense):
    moe = moefy(dense, _ids(8), MoefySpec(n_experts=4, top_k=2, shared=0.25, iters=4))
    units = find_units(moe)
    blocks = moe_blocks(moe, units)
    assert len(blocks) == 2 and sum(u.kind.startswith("shared.") for u in units) == 6
    counts = np.zeros((2, 4))
    capture_routing(moe, blocks, _ids(4, seed=2), lambda mb, X, idx, w: np.add.at(counts[mb.block], idx.flatten().numpy(), 1))
    freq = counts / counts.sum(axis=1, keepdims=True) * 2
    assert freq.max() > 1.2 * freq.min()                 # uneven
    x = _ids(2, seed=3)
    assert torch.isfinite(moe(x).logits).all()


def test_balanced_kmeans_makes_equal_clusters():
    rng = np.random.default_rng(0)
    f = torch.randn(64, 10)
    a = balanced_kmeans(f, 4, 5, rng)
    assert np.bincount(a).tolist() == [16] * 4
