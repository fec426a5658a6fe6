"""Drop levels on sub-block units: exact costs summed over the sub-block, a dropped block is the
identity, and a depth problem with a sparsity budget searches like any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.budget import parse_budget
from planner.errors import BadSearchSpace
from planner.levels.db import build_levels
from planner.model.load import fingerprint, load_model
from planner.space import parse_space
from planner.units import find_units, subblock_units

from .conftest import TINY_SEQLEN, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTH = {"name": "depth", "units": "subblock", "levels": [{"method": "drop"}]}


@pytest.fixture(scope="module")
def depth(tiny_model_dir, tmp_path_factory):
    """(model, sub-block units, levels DB) of the tiny model under a keep/drop space."""
    model = load_model(str(tiny_model_dir)).model
    units = subblock_units(model, find_units(model))
    calib = torch.randint(0, model.config.vocab_size, (2, TINY_SEQLEN), generator=torch.Generator().manual_seed(0))
    with torch_threads(1):
        db = build_levels(model, units, parse_space(DEPTH), calib, fingerprint(model), root=tmp_path_factory.mktemp("lv"))
    return model, units, db


def test_subblock_units_stand_for_their_linears(depth):
    model, units, _ = depth
    linears = {u.name: u for u in find_units(model)}
    assert [(u.block, u.kind) for u in units] == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    for u in units:
        assert u.name.endswith("o_proj" if u.kind == "attn" else "down_proj")
        assert u.name == u.parts[-1][0] and u.shape == linears[u.name].shape
        assert u.numel == sum(linears[name].numel for name, _ in u.parts)
    attn = units[0]
    assert [n.rsplit(".", 1)[-1] for n, _ in attn.parts] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # hidden 64, 4 heads of 16, 2 KV heads: q/o 64x64, k/v 32x64; MLP: 3 x 64x128
    assert attn.numel == 2 * 64 * 64 + 2 * 32 * 64 and units[1].numel == 3 * 64 * 128


def test_costs_are_summed_over_the_subblock(depth):
    _, units, db = depth
    for u in units:
        levels = {lv.id: lv for lv in db.levels(u.name)}
        assert levels["keep"].code_bits == levels["keep"].stored_bits == 16 * u.numel
        assert levels["keep"].kept == u.numel and levels["keep"].nbytes == 2 * u.numel
        assert (levels["drop"].code_bits, levels["drop"].stored_bits, levels["drop"].kept, levels["drop"].nbytes) == (0, 0, 0, 0)
    p = db.problem(units, parse_budget("50%sparsity"))
    x_all_keep = p.n_levels - 1
    assert p.levels[0] == ("drop", "keep")
    assert p.cost(x_all_keep).density == 1.0 and p.cost(np.zeros(4, dtype=int)).density == 0.0
    x = np.array([1, 0, 1, 1])                         # drop block 0's MLP
    assert p.cost(x).density == pytest.approx(1 - units[1].numel / sum(u.numel for u in units))
    assert p.cost(x).bits == pytest.approx(16 * p.cost(x).density)


def _block_io(model, plan: dict[str, torch.Tensor], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output hidden states of one decoder block with `plan`'s weights swapped in."""
    seen = {}
    layer = model.model.layers[block]
    hooks = [layer.register_forward_pre_hook(lambda _m, a: seen.__setitem__("in", a[0].clone())),
             layer.register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out.clone()))]
    base = {n: model.get_submodule(n).weight.data for n in plan}
    try:
        for n, w in plan.items():
            model.get_submodule(n).weight.data = w
        with torch.no_grad():
            model(torch.arange(32)[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for n, w in base.items():
            model.get_submodule(n).weight.data = w
    return seen["in"], seen["out"]


def test_dropping_both_subblocks_makes_the_block_the_identity(depth):
    model, units, db = depth
    plan = {u.name: db.weight(u.name, "drop", torch.float32) for u in units if u.block == 0}
    inp, out = _block_io(model, plan, 0)
    assert torch.equal(out, inp)
    kept = {u.name: db.weight(u.name, "keep", torch.float32) for u in units if u.block == 0}
    inp, out = _block_io(model, kept, 0)
    assert not torch.allclose(out, inp)
    assert torch.equal(kept[units[0].name], model.get_submodule(units[0].name).weight.data)   # keep = the base weight


def test_dropping_attention_leaves_only_the_mlp_residual(depth):
    model, units, db = depth
    layer = model.model.layers[1]
    inp, out = _block_io(model, {units[2].name: db.weight(units[2].name, "drop", torch.float32)}, 1)
    with torch.no_grad():
        expected = inp + layer.mlp(layer.post_attention_layernorm(inp))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_subblock_spaces_take_only_drop_levels():
    with pytest.raises(BadSearchSpace, match="subblock takes only drop levels"):
        parse_space({"units": "subblock", "levels": [{"method": "rtn", "bits": 4}]})
    with pytest.raises(BadSearchSpace, match="keep / drop"):
        parse_space({"units": "subblock", "levels": [{"method": "drop", "levels": ["skip"]}]})


def test_tie_subblock_drops_whole_subblocks_next_to_quantized_ones(tiny_model_data, tmp_path):
    """`tie: subblock` on linear units: a sub-block's linears share one level, `drop` included."""
    from planner.pipeline import prepare
    from planner.space import load_space

    path = tmp_path / "depth-rtn.yaml"
    path.write_text("tie: subblock\nlevels:\n  - method: rtn\n    bits: [2, 4]\n    group_size: 32\n"
                    "  - method: drop\n    levels: [drop]\n")
    with torch_threads(1):
        s = prepare(tiny_model_data, load_space(str(path)), quiet=True)
    p = s.problem(parse_budget("50%sparsity"))
    assert p.n_units == 4 and [len(m) for m in p.members] == [4, 3, 4, 3]
    assert all(lad == ("drop", "rtn-b2-g32", "rtn-b4-g32") for lad in p.levels)
    assert p.code_bits[:, 0].tolist() == [0, 0, 0, 0] and p.code_bits[1, 2] == 4 * p.numel[1]
    x = np.array([0, 0, 2, 1])                        # block 0 dropped whole, block 1 at 4 / 2 bits
    plan = p.decode(x).as_dict()
    assert {plan[n] for n in p.members[0] + p.members[1]} == {"drop"} and len(plan) == 14
    assert p.cost(x).sparsity == pytest.approx(sum(p.numel[:2]) / p.total_numel)
    ev = s.evaluator(p)
    model = s.loaded.model
    ev.apply(p.decode(x))
    try:
        inp, out = _block_io(model, {}, 0)
    finally:
        ev.apply(None)
    assert torch.equal(inp, out)
