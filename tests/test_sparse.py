"""Pruning and joint levels: exact counts and costs, valid N:M masks, the stored format round trip,
and SparseGPT's layer-local error below magnitude's at equal sparsity."""

from __future__ import annotations

import math

import pytest
import torch

from planner.levels.gptq import proxy_error
from planner.levels.joint import JointSpec, parse_joint
from planner.levels.quant import QuantSpec
from planner.levels.sparse import PruneMethod, SparseSpec, parse_sparse
from planner.levels.sparse_format import Pattern, SparseWeight, check_mask
from planner.levels.sparsegpt import magnitude_prune, sparsegpt_prune, wanda_prune

SHAPES = [(24, 40), (7, 13), (16, 64)]          # 13 and 40 columns: ragged N:M groups, ragged grid groups
PATTERNS = [Pattern(0.0), Pattern(0.3), Pattern(0.5), Pattern(0.55), Pattern(0.9), Pattern(n=2, m=4),
            Pattern(n=1, m=4), Pattern(n=4, m=8), Pattern(n=3, m=5), Pattern(0.5, offset=-37), Pattern(0.0, offset=5),
            Pattern(0.6, offset=10_000)]             # EvoPress-style offsets; the last one clamps to all pruned


def correlated_layer(out: int, inp: int, n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W and H = 2/n X^T X of inputs with strongly correlated columns and a few large ones."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inp) + 2 * torch.randn(inp, inp, generator=g) / inp ** 0.5
    X = torch.randn(n, inp, generator=g) @ mix
    X[:, : max(1, inp // 16)] *= 8            # outlier features, as in LLM activations
    return torch.randn(out, inp, generator=g), 2 * X.T @ X / n


def _all_levels(W, H, patterns):
    return {
        "sparsegpt": sparsegpt_prune(W, H, [(p, None) for p in patterns], block_size=16),
        "wanda": [wanda_prune(W, H, p) for p in patterns],
        "magnitude": [magnitude_prune(W, p) for p in patterns],
    }


@pytest.mark.parametrize("shape", SHAPES)
def test_every_mask_has_the_exact_count_and_every_nm_mask_is_valid(shape):
    W, H = correlated_layer(*shape)
    for method, results in _all_levels(W, H, PATTERNS).items():
        for p, r in zip(PATTERNS, results, strict=True):
            check_mask(r.keep, p)                      # exact count; N:M: n kept in every group of m
            assert torch.all(r.W[~r.keep] == 0), (method, p)
            assert int(r.keep.sum()) == p.kept(shape)


def test_check_mask_rejects_a_bad_nm_mask():
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[:, [0, 1, 4, 5]] = True
    check_mask(keep, Pattern(n=2, m=4))
    keep[0, 1], keep[0, 2] = False, True
    check_mask(keep, Pattern(n=2, m=4))               # another valid 2:4 mask
    keep[0, 2], keep[0, 4] = False, True
    keep[0, 5], keep[0, 6] = True, True
    keep[0, 0] = True
    with pytest.raises(ValueError):
        check_mask(keep, Pattern(n=2, m=4))


def test_unstructured_counts_follow_the_documented_rounding():
    # P(c) = floor(s * out * c + 1/2) with s the exact decimal: 0.55 * 7 * 13 = 50.05 -> 50 pruned
    assert Pattern(0.55).kept((7, 13)) == 91 - 50
    assert Pattern(0.5).kept((3, 3)) == 9 - 5          # 4.5 rounds half up
    assert Pattern(0.1).kept((10, 10)) == 90           # 0.1 is exact 1/10, not 0.1000000000000000055
    assert Pattern(n=2, m=4).kept((3, 13)) == 3 * (3 * 2 + 1)
    assert Pattern(n=3, m=5).kept((2, 13)) == 2 * (2 * 3 + 3)


@pytest.mark.parametrize("shape", SHAPES)
def test_costs_are_exact_and_match_the_stored_tensors(shape):
    out, inp = shape
    W, H = correlated_layer(*shape)
    grids = [None, QuantSpec(4, 8), QuantSpec(3, 0, True), QuantSpec(2, 16)]
    levels = [(p, q) for p in PATTERNS for q in grids if q is None or not p.is_nm or q.group_size % p.m == 0]
    for (p, q), r in zip(levels, sparsegpt_prune(W, H, levels, block_size=16), strict=True):
        k = p.kept(shape)
        pos = 0 if k == out * inp else (k * math.ceil(math.log2(p.m)) if p.is_nm else out * inp)
        if q is None:
            spec = SparseSpec(PruneMethod.SPARSEGPT, p)
            assert spec.code_bits(shape) == 16 * k
            assert spec.stored_bits(shape) == pos + 16 * k
            sw = SparseWeight.from_dense(r.W, r.keep, p)
            assert sw.nbytes == spec.nbytes(shape) == math.ceil(pos / 8) + 2 * k
            continue
        js = JointSpec(p, q)
        groups = out * -(-inp // q.group_size) if q.group_size else out
        assert js.code_bits(shape) == q.bits * k
        assert js.stored_bits(shape) == pos + q.bits * k + groups * (16 + (0 if q.symmetric else q.bits))
        sw = SparseWeight.from_codes(r.codes, r.scale, r.zero, r.keep, p, q)
        assert sw.nbytes == js.nbytes(shape)


def test_stored_form_round_trips_bit_exactly():
    W, H = correlated_layer(24, 40)
    levels = [(Pattern(0.6), None), (Pattern(n=2, m=4), None), (Pattern(0.0), None),
              (Pattern(0.5), QuantSpec(4, 8)), (Pattern(n=2, m=4), QuantSpec(3, 8, True)), (Pattern(0.7), QuantSpec(2, 0))]
    for (p, q), r in zip(levels, sparsegpt_prune(W, H, levels, block_size=16), strict=True):
        sw = SparseWeight.from_dense(r.W, r.keep, p) if q is None else \
            SparseWeight.from_codes(r.codes, r.scale, r.zero, r.keep, p, q)
        back = SparseWeight.from_tensors(sw.to_tensors("lv"), "lv")
        assert torch.equal(back.mask(), r.keep)
        assert torch.equal(back.dequantize(), r.W), (p, q)     # the solver's W_hat is what evaluation sees
        if q is not None:
            assert int(r.codes[r.keep].max()) <= q.maxq


def test_one_pass_for_all_levels_equals_one_pass_per_level():
    W, H = correlated_layer(16, 40)
    levels = [(Pattern(0.5), None), (Pattern(n=2, m=4), QuantSpec(4, 8)), (Pattern(0.7), QuantSpec(3, 16, True))]
    together = sparsegpt_prune(W, H, levels, block_size=16)
    for lv, r in zip(levels, together, strict=True):
        alone = sparsegpt_prune(W, H, [lv], block_size=16)[0]
        assert torch.equal(alone.W, r.W) and torch.equal(alone.keep, r.keep)


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7])
def test_sparsegpt_error_below_magnitude_on_a_correlated_layer(sparsity):
    W, H = correlated_layer(64, 96, seed=3)
    p = Pattern(sparsity)
    sgpt = proxy_error(W, sparsegpt_prune(W, H, [(p, None)], block_size=32)[0].W, H)
    mag = proxy_error(W, magnitude_prune(W, p).W, H)
    wanda = proxy_error(W, wanda_prune(W, H, p).W, H)
    assert sgpt < 0.8 * mag and sgpt < wanda


def test_sparsegpt_2of4_error_below_magnitude():
    W, H = correlated_layer(64, 96, seed=4)
    p = Pattern(n=2, m=4)
    assert proxy_error(W, sparsegpt_prune(W, H, [(p, None)])[0].W, H) < proxy_error(W, magnitude_prune(W, p).W, H)


def test_joint_error_between_pruning_alone_and_quantizing_harder():
    W, H = correlated_layer(32, 64, seed=5)
    prune, joint4, joint2 = sparsegpt_prune(W, H, [(Pattern(0.5), None), (Pattern(0.5), QuantSpec(4, 16)),
                                                    (Pattern(0.5), QuantSpec(2, 16))], block_size=16)
    e = [proxy_error(W, r.W, H) for r in (prune, joint4, joint2)]
    assert e[0] < e[1] < e[2]


def test_family_parsing_and_ids():
    specs = parse_sparse({"method": "wanda", "sparsity": [0, 0.5, 0.625], "nm": ["2:4"]}, "x")
    assert [s.id for s in specs] == ["wanda-s0", "wanda-s50", "wanda-s62.5", "wanda-2of4"]
    joint = parse_joint({"method": "joint", "bits": [3, 4], "sparsity": 0.5, "nm": "2:4", "group_size": 64,
                         "symmetric": True}, "x")
    assert [s.id for s in joint] == ["joint-b3-s50-g64-sym", "joint-b3-2of4-g64-sym", "joint-b4-s50-g64-sym",
                                     "joint-b4-2of4-g64-sym"]


def test_offsets_follow_the_documented_counts_and_clamp():
    shape = (10, 20)
    assert [Pattern(0.6, offset=d).kept(shape) for d in (-200, -50, 0, 50, 100)] == [200, 130, 80, 30, 0]
    assert Pattern(0.6, offset=-50).id == "s60-50w" and Pattern(0.6, offset=50).id == "s60+50w"
    assert Pattern(0.0, offset=3).position_bits(shape) == 200 and Pattern(0.6, offset=-120).position_bits(shape) == 0
    specs = parse_sparse({"method": "magnitude", "sparsity": [0.5], "steps": 2, "step_weights": 7}, "x")
    assert [s.id for s in specs] == ["magnitude-s50-14w", "magnitude-s50-7w", "magnitude-s50", "magnitude-s50+7w",
                                     "magnitude-s50+14w"]
    assert [s.kept((24, 40)) for s in specs] == [494, 487, 480, 473, 466]     # exactly 7 weights per step


def test_files_written_before_offsets_still_load():
    W, H = correlated_layer(8, 16)
    r = magnitude_prune(W, Pattern(0.5))
    tensors = SparseWeight.from_dense(r.W, r.keep, Pattern(0.5)).to_tensors("lv")
    tensors["lv.meta"] = tensors["lv.meta"][:9]                     # the 9-entry meta of the first format
    assert torch.equal(SparseWeight.from_tensors(tensors, "lv").dequantize(), r.W)
