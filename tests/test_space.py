"""Search spaces: built-in ones load; every malformed YAML is one BadSearchSpace line."""

from __future__ import annotations

import pytest

from planner.errors import BadSearchSpace
from planner.space import DEFAULT_SPACE, LevelSpec, Method, builtin_spaces, load_space, parse_space

from .conftest import TINY_SPACE_YAML


def test_builtin_spaces_load():
    spaces = builtin_spaces()
    assert DEFAULT_SPACE in spaces and "rtn-g128" in spaces
    for name, path in spaces.items():
        by_name, by_path = load_space(name), load_space(str(path))
        assert by_name == by_path
        assert by_name.name == name and by_name.levels
        ids = [s.id for s in by_name.levels]
        assert len(ids) == len(set(ids))


def test_default_space_levels():
    s = load_space(DEFAULT_SPACE)
    assert [lv.id for lv in s.levels] == [f"gptq-b{b}-g128" for b in (2, 3, 4, 5, 6, 8)]
    assert all(lv.method is Method.GPTQ and not lv.symmetric for lv in s.levels)


def test_tiny_space_file_loads(tiny_space_file):
    s = load_space(str(tiny_space_file))
    assert s.name == "tiny" and s.block_size == 32
    assert {lv.id for lv in s.levels} == {f"{m}-b{b}-g48" for m in ("gptq", "rtn") for b in (2, 3, 4, 8)}


def test_level_ids():
    assert LevelSpec(Method.GPTQ, 3, 128).id == "gptq-b3-g128"
    assert LevelSpec(Method.RTN, 4, 0).id == "rtn-b4-pc"
    assert LevelSpec(Method.RTN, 4, 64, symmetric=True).id == "rtn-b4-g64-sym"


def test_defaults_and_single_int_bits():
    s = parse_space({"levels": [{"method": "rtn", "bits": 4}]}, default_name="x")
    assert s.name == "x" and s.levels == (LevelSpec(Method.RTN, 4, 128, False),)
    assert (s.damp, s.block_size) == (0.01, 128)


LEVEL = "  - method: gptq\n    bits: [2, 3]\n    group_size: 64\n"
MALFORMED = {
    "unknown top-level key": "levels:\n" + LEVEL + "colour: blue\n",
    "unknown level key": "levels:\n" + LEVEL + "    act_order: true\n",
    "bad method": "levels:\n  - method: awq\n    bits: [4]\n",
    "missing method": "levels:\n  - bits: [4]\n",
    "bits 9": "levels:\n  - method: rtn\n    bits: [4, 9]\n",
    "bits 0": "levels:\n  - method: rtn\n    bits: 0\n",
    "bits 'x'": "levels:\n  - method: rtn\n    bits: x\n",
    "bits ['x']": "levels:\n  - method: rtn\n    bits: ['x']\n",
    "bits float": "levels:\n  - method: rtn\n    bits: [3.5]\n",
    "bits bool": "levels:\n  - method: rtn\n    bits: true\n",
    "bits empty list": "levels:\n  - method: rtn\n    bits: []\n",
    "negative group size": "levels:\n  - method: rtn\n    bits: [4]\n    group_size: -64\n",
    "group size text": "levels:\n  - method: rtn\n    bits: [4]\n    group_size: big\n",
    "symmetric not bool": "levels:\n  - method: rtn\n    bits: [4]\n    symmetric: maybe\n",
    "duplicate level": "levels:\n" + LEVEL + LEVEL,
    "duplicate bits": "levels:\n  - method: rtn\n    bits: [4, 4]\n",
    "not a mapping (list)": "- method: rtn\n  bits: [4]\n",
    "not a mapping (scalar)": "just a sentence\n",
    "empty file": "",
    "invalid YAML": "levels: [\n  - method: rtn\n",
    "invalid YAML (tabs)": "levels:\n\t- method: rtn\n",
    "empty levels": "levels: []\n",
    "missing levels": "name: nothing\n",
    "levels not a list": "levels:\n  method: rtn\n",
    "level not a mapping": "levels:\n  - rtn\n",
    "units other than linear": "units: experts\nlevels:\n" + LEVEL,
    "gptq unknown key": "levels:\n" + LEVEL + "gptq:\n  act_order: true\n",
    "gptq damp 0": "levels:\n" + LEVEL + "gptq:\n  damp: 0\n",
    "gptq damp text": "levels:\n" + LEVEL + "gptq:\n  damp: lots\n",
    "gptq block_size 0": "levels:\n" + LEVEL + "gptq:\n  block_size: 0\n",
    "gptq not a mapping": "levels:\n" + LEVEL + "gptq: [1, 2]\n",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_space_is_one_line(tmp_path, case):
    path = tmp_path / "space.yaml"
    path.write_text(MALFORMED[case])
    with pytest.raises(BadSearchSpace) as e:
        load_space(str(path))
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    assert str(path) in msg            # says which file is wrong


def test_well_formed_variant_of_the_malformed_cases_loads(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("levels:\n" + LEVEL + "gptq:\n  damp: 0.05\n  block_size: 64\n")
    s = load_space(str(path))
    assert [lv.id for lv in s.levels] == ["gptq-b2-g64", "gptq-b3-g64"]
    assert s.name == "ok" and s.damp == 0.05


def test_unknown_space_name_lists_the_builtins():
    with pytest.raises(BadSearchSpace, match="unknown search space 'nope'") as e:
        load_space("nope")
    assert "gptq-g128" in str(e.value) and "\n" not in str(e.value)


def test_a_directory_is_not_a_space(tmp_path):
    with pytest.raises(BadSearchSpace):
        load_space(str(tmp_path))


def test_binary_file_is_bad_search_space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"\xff\xfe\x00levels\x80\x81")
    with pytest.raises(BadSearchSpace):
        load_space(str(path))


def test_tiny_space_yaml_constant_parses():
    import yaml

    assert parse_space(yaml.safe_load(TINY_SPACE_YAML)).name == "tiny"
