"""`moe-lp` in the pipeline: expert statistics for a prepared session (cached next to the levels DB)
turned into the searcher's config, or into evo's warm start (`--init moe-lp`).

Works on a `planner.pipeline.Session` (duck-typed; the pipeline imports this module lazily). The
statistics need the base weights in fp32, so a fresh copy of the model is loaded when they are not
cached (the session's model is held in the evaluation dtype, with plans swapped in).
"""

from __future__ import annotations

import torch

from planner.moe.stats import MoeStats, cached_stats, expert_table, lp_data


def session_stats(session, max_tokens: int = 512) -> MoeStats:
    from planner.model.load import load_model

    def fp32_model():
        spec = session.spec
        return load_model(spec.model, dtype=torch.float32, trust_remote_code=spec.trust_remote_code).model

    calib = session.windows.ids[session.windows.calib]
    with session.bar(total=len(calib), desc="moe statistics (windows)") as bar:
        return cached_stats(fp32_model, session.units, session.db, calib, max_tokens, bar)


def moe_inputs(session, problem, run, method: str, config: dict, init: str | None) -> dict:
    """`config` completed for `method` = moe-lp (the statistics), or for evo with init moe-lp
    (`init_x`: the program's plan, its knobs from the run config's `moe_lp`)."""
    from planner.search import make_config
    from planner.search.moe_lp import solve

    stats = session_stats(session)
    if run is not None:
        run.write("moe_stats.json", expert_table(stats))
    data = lp_data(stats, problem)
    if method == "moe-lp":
        return {**config, **data}
    knobs = dict(run.config.get("moe_lp") or {}) if run is not None else {}
    x = solve(problem, make_config("moe-lp", {**knobs, **data}))
    return {**config, "init_x": [int(v) for v in x]}
