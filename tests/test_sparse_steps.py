"""EvoPress-style sparsity levels (a fixed number of weights per step): on a real levels DB, every
level switch between any two units keeps the number of kept weights exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.budget import parse_budget
from planner.levels.db import build_levels
from planner.model.load import fingerprint, load_model
from planner.search.operators import level_switch
from planner.space import parse_space
from planner.units import find_units

from .conftest import TINY_SEQLEN, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny model's smallest linear has 32 x 64 = 2048 weights: +-3 steps of 256 around 50% never clamp
STEPPED = {"levels": [{"method": "magnitude", "sparsity": [0.5], "steps": 3, "step_weights": 256}]}


def test_level_switches_keep_the_kept_weights_exactly(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir)).model
    units = find_units(model)
    calib = torch.randint(0, model.config.vocab_size, (2, TINY_SEQLEN), generator=torch.Generator().manual_seed(0))
    with torch_threads(1):
        db = build_levels(model, units, parse_space(STEPPED), calib, fingerprint(model), root=tmp_path)
    p = db.problem(units, parse_budget("50%sparsity"))
    assert all(np.all(np.diff(p.kept[i]) == 256) for i in range(p.n_units))     # cheapest (sparsest) first
    x0 = np.array([lad.index("magnitude-s50") for lad in p.levels])
    total = p.spend(x0)
    assert total == p.total_numel // 2 and p.feasible(x0)
    rng, x, moved = np.random.default_rng(0), x0, 0
    for _ in range(50):
        x = level_switch(x, p, rng, n_switches=2)
        assert p.spend(x) == total                   # no repair needed: every switch is an exact swap
        moved = max(moved, int(np.abs(x - x0).max()))
    assert moved >= 2
