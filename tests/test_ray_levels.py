"""The levels DB built across 2 local Ray workers (each quantizes a block range into the same
folder, the driver writes the manifest) equals the serial build, file for file."""

from __future__ import annotations

import pytest

from .conftest import cache_env, torch_threads

pytest.importorskip("ray")
pytestmark = pytest.mark.slow      # a Ray start and worker processes: tens of seconds

from .test_ray import cluster  # noqa: E402,F401  (the module-scoped local Ray with 2 CPUs)


def test_levels_db_built_across_workers_equals_the_serial_build(cluster, tiny_sessions, tiny_model_data,  # noqa: F811
                                                               tiny_space_file, tmp_path):
    from planner.pipeline import prepare
    from planner.space import load_space

    serial = tiny_sessions("fp32").db
    with cache_env(tmp_path), torch_threads(1):
        db = prepare(tiny_model_data, load_space(str(tiny_space_file)), quiet=True, cluster=cluster).db
    assert db.path.name == serial.path.name and db.path != serial.path
    assert db.manifest == serial.manifest
    files = sorted(p.name for p in (serial.path / "units").iterdir())
    assert files == sorted(p.name for p in (db.path / "units").iterdir()) and len(files) == 14
    for name in files:
        assert (db.path / "units" / name).read_bytes() == (serial.path / "units" / name).read_bytes(), name
