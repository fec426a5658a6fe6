"""Sequential calibration: block i is calibrated on the compressed prefix's outputs, the build
resumes mid-way, the model is left untouched, and peak memory stays at one block's Hessians."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import planner.levels.db as dbmod
from planner.levels.db import build_levels
from planner.model.load import fingerprint, load_model
from planner.space import parse_space
from planner.units import find_units

from .conftest import TINY_SEQLEN, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = [{"method": "sparsegpt", "sparsity": [0.5, 0.7]}, {"method": "gptq", "bits": [3], "group_size": 32}]


def _space(sequential: str | None):
    return parse_space({"levels": LEVELS, **({"calibration": {"sequential": sequential}} if sequential else {})})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).model
    calib = torch.randint(0, model.config.vocab_size, (6, TINY_SEQLEN), generator=torch.Generator().manual_seed(1))
    return model, find_units(model), calib


def _build(tiny, space, root):
    model, units, calib = tiny
    with torch_threads(1):
        return build_levels(model, units, space, calib, fingerprint(model), root=root)


def _files(db) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted((db.path / "units").iterdir())}


def test_block0_matches_the_one_pass_build_and_later_blocks_see_the_compressed_prefix(tiny, tmp_path):
    model, units, _ = tiny
    before = {u.name: model.get_submodule(u.name).weight.detach().clone() for u in units}
    one = _files(_build(tiny, _space(None), tmp_path / "one"))
    seq = _files(_build(tiny, _space("sparsegpt-s50"), tmp_path / "seq"))
    assert one.keys() == seq.keys()
    for name in one:
        same = all(torch.equal(one[name][k], seq[name][k]) for k in one[name])
        assert same == (".layers.0." in name), name       # block 1's Hessians come from pruned block 0
    for u in units:                                        # the model is the base model again
        assert torch.equal(model.get_submodule(u.name).weight, before[u.name])


def test_a_killed_sequential_build_resumes_to_the_same_files(tiny, tmp_path, monkeypatch):
    full = _files(_build(tiny, _space("gptq-b3-g32"), tmp_path / "full"))
    real, written = dbmod.write_unit, []

    def dies_after_9(path, unit, stored):
        if len(written) == 9:
            raise KeyboardInterrupt
        written.append(unit.name)
        real(path, unit, stored)

    monkeypatch.setattr(dbmod, "write_unit", dies_after_9)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny, _space("gptq-b3-g32"), tmp_path / "resumed")
    monkeypatch.setattr(dbmod, "write_unit", real)
    partial = list((next((tmp_path / "resumed").iterdir()) / "units").iterdir())
    assert len(partial) == 9 and not any(p.name.endswith(".tmp") for p in partial)
    resumed = _files(_build(tiny, _space("gptq-b3-g32"), tmp_path / "resumed"))
    assert resumed.keys() == full.keys()
    for name in full:
        assert all(torch.equal(full[name][k], resumed[name][k]) for k in full[name]), name


def test_sequential_level_must_exist_for_every_unit():
    from planner.errors import BadSearchSpace

    with pytest.raises(BadSearchSpace, match="calibration.sequential"):
        _space("gptq-b4-g32")
    with pytest.raises(BadSearchSpace, match="calibration.sequential"):
        parse_space({"levels": LEVELS, "calibration": {"sequential": "sparsegpt-s50"},
                     "overrides": [{"blocks": [0], "levels": [{"method": "gptq", "bits": [8]}]}]})


# A 40-block model with hidden 32 and intermediate 1024: each block's down_proj Hessian is 4 MiB,
# all of them 160 MiB; under a cap of 100 MiB above the loaded model, the one-pass build (every
# Hessian at once) fails and the sequential one (one block's Hessians at a time) finishes.
MEMCAP = textwrap.dedent("""
    import pathlib, resource, sys, torch
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM
    from planner.levels.db import build_levels
    from planner.space import parse_space
    from planner.units import find_units
    mode, root = sys.argv[1], pathlib.Path(sys.argv[2])
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=1024, num_hidden_layers=40,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    space = parse_space({"levels": [{"method": "sparsegpt", "sparsity": [0.5]}],
                         **({"calibration": {"sequential": "sparsegpt-s50"}} if mode == "seq" else {})})
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(calib[:2], use_cache=False)
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 100 * 2**20, resource.RLIM_INFINITY))
    try:
        db = build_levels(model, find_units(model), space, calib, "memcap-" + mode, root=root)
    except (MemoryError, RuntimeError) as e:
        print("out of memory:", str(e).splitlines()[0][:120])
        sys.exit(3)
    print("built", len(db.units), "units")
""")


@pytest.mark.slow
def test_sequential_build_fits_where_the_one_pass_build_does_not(tmp_path):
    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", MEMCAP, mode, str(tmp_path / mode)], capture_output=True,
                              text=True, timeout=300)

    seq = run("seq")
    assert seq.returncode == 0 and "built 280 units" in seq.stdout, seq.stdout + seq.stderr[-2000:]
    one = run("one")
    assert one.returncode == 3 and "out of memory" in one.stdout, one.stdout + one.stderr[-2000:]
