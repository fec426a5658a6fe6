"""Search-space files: every built-in one loads with the levels it promises; per-unit overrides,
ties and sub-block units reach the levels DB and the Problem; each malformed file is one
BadSearchSpace line that names the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.budget import parse_budget
from planner.errors import BadSearchSpace
from planner.levels.db import build_levels
from planner.model.load import fingerprint, load_model
from planner.space import Grouping, Tie, builtin_spaces, load_space, parse_space
from planner.units import find_units

from .conftest import TINY_SEQLEN, torch_threads


def test_builtin_spaces_cover_every_level_kind():
    spaces = {n: load_space(n) for n in builtin_spaces()}
    builders = {s.builder for sp in spaces.values() for s in sp.all_levels}
    assert {"gptq", "rtn", "sparsegpt", "wanda", "magnitude", "joint", "drop"} <= builders
    assert spaces["depth"].units is Grouping.SUBBLOCK and [s.id for s in spaces["depth"].levels] == ["keep", "drop"]
    assert spaces["gptq-g64-sym-fused"].tie is Tie.FUSED
    assert spaces["gptq-g128-sequential"].sequential == "gptq-b4-g128"
    assert [s.id for s in spaces["nm"].levels] == ["sparsegpt-s0", "sparsegpt-4of8", "sparsegpt-2of4", "sparsegpt-1of4"]
    assert len(spaces["joint"].levels) == 12 and "joint-b4-s50-g128" in {s.id for s in spaces["joint"].levels}
    mixed = spaces["gptq-mixed"]
    assert [o.blocks for o in mixed.overrides] == [(0,), ()] and mixed.overrides[1].kinds == ("down_proj",)


def test_space_json_keeps_old_keys_stable():
    """Spaces without the new keys hash as before, so existing levels DBs stay valid."""
    assert set(load_space("gptq-g128").to_json()) == {"name", "damp", "block_size", "levels"}
    assert {"overrides", "tie"} <= set(load_space("gptq-mixed").to_json()) | set(load_space("gptq-g64-sym-fused").to_json())


MIXED = {"levels": [{"method": "rtn", "bits": [2, 3], "group_size": 32}],
         "overrides": [{"blocks": [0], "kinds": ["q_proj"], "levels": [{"method": "rtn", "bits": [8], "group_size": 32}]},
                       {"kinds": ["down_proj"], "levels": [{"method": "magnitude", "sparsity": [0, 0.5]}]}],
         "tie": "fused"}


def test_overrides_give_units_their_own_ladders(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir)).model
    units = find_units(model)
    space = parse_space(MIXED)
    calib = torch.randint(0, model.config.vocab_size, (2, TINY_SEQLEN), generator=torch.Generator().manual_seed(0))
    with torch_threads(1):
        db = build_levels(model, units, space, calib, fingerprint(model), root=tmp_path)
    ladders = {u.name: [lv.id for lv in db.levels(u.name)] for u in units}
    for u in units:
        want = (["rtn-b8-g32"] if (u.block, u.kind) == (0, "q_proj") else
                ["magnitude-s0", "magnitude-s50"] if u.kind == "down_proj" else ["rtn-b2-g32", "rtn-b3-g32"])
        assert ladders[u.name] == want, u.name
    p = db.problem(units, parse_budget("3.0bits"))
    i = p.units.index("model.layers.1.mlp.down_proj")
    n = int(p.numel[i])
    assert p.levels[i] == ("magnitude-s50", "magnitude-s0")          # cheapest stored first: 1 + 8 < 16 bpw
    assert p.kept[i].tolist() == [n // 2, n] and p.code_bits[i].tolist() == [16 * n // 2, 16 * n]
    assert p.stored_bits[i].tolist() == [n + 16 * n // 2, 16 * n]


def test_tie_fused_reaches_the_problem(tiny_model_data, tmp_path):
    import dataclasses

    from planner.pipeline import prepare

    space_file = tmp_path / "tied.yaml"
    space_file.write_text("tie: fused\nlevels:\n  - method: rtn\n    bits: [2, 4]\n    group_size: 32\n")
    with torch_threads(1):
        s = prepare(dataclasses.replace(tiny_model_data), load_space(str(space_file)), quiet=True)
    p = s.problem(parse_budget("3.0bits"))
    if getattr(p, "members", ()):         # tie groups collapsed into one unit each: every plan shares levels
        x = np.random.default_rng(0).integers(0, p.n_levels)
        plan = p.decode(x).as_dict()
        for u in s.units:
            mates = [v for v in s.units if v.group == u.group]
            assert {plan[v.name] for v in mates} == {plan[u.name]}
        assert sum(len(g) > 1 for g in p.members) == 4          # q/k/v and gate/up of two blocks
    else:
        assert p.ties == tuple(u.group for u in s.units)
        groups = {tuple(p.units[i].rsplit(".", 1)[-1] for i in g) for g in p.tie_groups()}
        assert groups == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}


L = "  - method: rtn\n    bits: [4]\n"
OL = "    levels:\n      - method: rtn\n        bits: [4]\n"       # an override's levels
MALFORMED = {
    "unknown top-level key": ("levels:\n" + L + "sequential: true\n", "unknown key"),
    "bad units": ("units: experts\nlevels:\n" + L, "units must be"),
    "bad tie": ("tie: always\nlevels:\n" + L, "tie must be"),
    "sparsity 1": ("levels:\n  - method: sparsegpt\n    sparsity: [0.5, 1.0]\n", "sparsity must be"),
    "sparsity text": ("levels:\n  - method: wanda\n    sparsity: half\n", "sparsity must be"),
    "sparsity negative": ("levels:\n  - method: magnitude\n    sparsity: -0.1\n", "sparsity must be"),
    "no sparsity levels": ("levels:\n  - method: sparsegpt\n", "at least one level"),
    "nm dash": ("levels:\n  - method: sparsegpt\n    nm: ['2-4']\n", "nm pattern"),
    "nm n >= m": ("levels:\n  - method: sparsegpt\n    nm: ['4:2']\n", "nm pattern"),
    "nm not a list": ("levels:\n  - method: sparsegpt\n    nm: {2: 4}\n", "nm must be"),
    "sparse unknown key": ("levels:\n  - method: sparsegpt\n    sparsity: 0.5\n    bits: 4\n", "unknown key"),
    "joint without bits": ("levels:\n  - method: joint\n    sparsity: 0.5\n", "bits must be"),
    "joint nm vs group": ("levels:\n  - method: joint\n    bits: 4\n    nm: '2:4'\n    group_size: 30\n", "multiple of 4"),
    "joint bad group": ("levels:\n  - method: joint\n    bits: 4\n    sparsity: 0.5\n    group_size: -1\n", "group_size"),
    "drop bad level": ("units: subblock\nlevels:\n  - method: drop\n    levels: [prune]\n", "keep / drop"),
    "subblock with quant": ("units: subblock\nlevels:\n" + L, "only drop levels"),
    "duplicate levels": ("levels:\n  - method: sparsegpt\n    sparsity: [0.5, 0.50]\n", "duplicate levels"),
    "overrides not a list": ("levels:\n" + L + "overrides: {kinds: [q_proj]}\n", "overrides must be a list"),
    "override without selector": ("levels:\n" + L + "overrides:\n  -" + OL[3:], "kinds and/or blocks"),
    "override negative block": ("levels:\n" + L + "overrides:\n  - blocks: [-1]\n" + OL, "blocks must be"),
    "override unknown key": ("levels:\n" + L + "overrides:\n  - units: [x]\n" + OL, "kinds and/or blocks"),
    "override without levels": ("levels:\n" + L + "overrides:\n  - kinds: [q_proj]\n", "'levels' must be"),
    "override bad method": ("levels:\n" + L + "overrides:\n  - kinds: [q_proj]\n    levels:\n      - method: awq\n",
                            "method must be one of"),
    "calibration key": ("levels:\n" + L + "calibration:\n  order: reverse\n", "only key is sequential"),
    "sequential unknown level": ("levels:\n" + L + "calibration:\n  sequential: rtn-b3-g128\n", "calibration.sequential"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_space_files_fail_with_one_line(case, tmp_path):
    text, words = MALFORMED[case]
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(BadSearchSpace) as e:
        load_space(str(path))
    msg = str(e.value)
    assert "\n" not in msg and words in msg and str(path) in msg, msg
