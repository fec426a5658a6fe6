"""Exports that deployment tools read: one module per format, one registry, one verb.

    export_run("runs/x", "best", "compressed-tensors", "out/")     # what `planner export` runs
    export_plan(session, problem, plan, "gptqmodel", "out/")       # same, from a prepared session

Formats (`EXPORTERS`): llamacpp (tensor-type file + GGUF), gptqmodel (quantize_config.json with
`dynamic` + GPTQ-packed checkpoint), compressed-tensors (vLLM / llm-compressor, pack-quantized),
packed (the planner's own). Each format serves a `Target` whose rules are checked first: an
undeployable plan is refused with one line (`NotDeployable`) before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from planner.errors import BadPlan
from planner.export import compressed, gptq, llamacpp, packed  # noqa: F401  (registration)
from planner.export.base import EXPORTERS, BadExport, ExportContext, ExportResult, NotDeployable
from planner.export.targets import Target, check_deployable, require_deployable, restrict_space
from planner.plan import Plan
from planner.problem import Problem
from planner.rundir import RunDir

__all__ = ["EXPORTERS", "BadExport", "ExportResult", "NotDeployable", "Target", "check_deployable", "export_plan",
           "export_run", "resolve_plan", "restrict_space"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_plan(run: RunDir, problem: Problem, ref: str) -> Plan:
    """`best` (best_plan.json), a plan JSON file, or a plan id from results.jsonl / heldout.jsonl."""
    if ref == "best":
        data = run.read("best_plan.json")
        if data is None:
            raise BadPlan(f"run {str(run.path)!r} has no best_plan.json (the search has not finished): "
                          "pass --plan PLAN_ID from its results.jsonl")
        return Plan.from_json(data)
    if ref.endswith(".json"):
        return Plan.load(ref)
    for row in run.heldout() + run.results():
        if row.plan_id == ref and row.error is None:
            return problem.decode(row.x)
    raise BadPlan(f"no plan {ref!r} in {run.path}/results.jsonl: pass best, a plan_id from that file, or a plan JSON")


def _exporter(fmt: str):
    if fmt not in EXPORTERS:
        raise BadExport(f"unknown export format {fmt!r}: choose one of {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[fmt]


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadExport(f"output {str(out)!r} already exists and is not empty: pick another --out")


def export_plan(session, problem: Problem, plan: Plan, fmt: str, out: str | Path, dtype: str = "fp16",
                run_info: dict | None = None) -> ExportResult:
    """Check the plan against the format's target (with matrix shapes), then write `out` atomically."""
    exporter = _exporter(fmt)
    out = Path(out)
    _check_out(out)
    if dtype not in DTYPES:
        raise BadExport(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    problem.encode(plan)
    require_deployable(plan, problem, Target(exporter.target), {u.name: u.shape for u in session.units})
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx = ExportContext(plan=plan, problem=problem, space=session.space, model=session.loaded.model,
                        tokenizer=session.loaded.tokenizer, source=session.loaded.source, units=session.units,
                        db=session.db, out=tmp, dtype=DTYPES[dtype], run_info=dict(run_info or {}), dest=out)
    try:
        result = exporter.export(ctx)
        result.write_manifest(ctx)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    result.out = out
    return result


def export_run(run_path: str | Path, ref: str, fmt: str, out: str | Path, dtype: str = "fp16",
               quiet: bool = False) -> ExportResult:
    """`planner export`: resolve the plan, refuse it early if the target cannot serve it, then
    rebuild the session (model, levels DB: cached) and export."""
    from planner.pipeline import ModelData, prepare
    from planner.space import load_space

    run = RunDir.open(run_path)
    problem = run.load_problem()
    plan = resolve_plan(run, problem, ref)
    exporter = _exporter(fmt)
    require_deployable(plan, problem, Target(exporter.target))    # cheap checks before loading anything
    _check_out(Path(out))
    cfg = run.config
    session = prepare(ModelData(**cfg["model_data"]), load_space(cfg["space"]), quiet=quiet)
    cost = problem.cost(problem.encode(plan))
    if problem.members:      # a search --target run: exporters see the model's own units
        problem = session.db.problem(session.units, problem.budget)
    info = {"run": str(run.path), "bits": cost.bits, "bpw": cost.bpw, "bytes": cost.nbytes}
    best = run.read("best_plan.json") or {}
    if best.get("id") == plan.id:
        info.update({k: best[k] for k in ("heldout_kl", "heldout_ppl", "heldout_tokens") if k in best})
    return export_plan(session, problem, plan, fmt, out, dtype, info)
