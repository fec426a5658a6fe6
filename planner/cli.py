"""`planner`: the only place that parses arguments and decides exit codes.

Library code raises PlannerError subclasses; here they become one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from planner.budget import HARDWARE, Metric, parse_budget
from planner.errors import BadRunDir, PlannerError
from planner.model.families import DEFAULT_MODEL

DESCRIPTION = """\
planner finds per-layer quantization plans that lose the least quality for a size budget.
It builds every layer's compressed levels once (GPTQ/RTN, real packed weights), then searches
over which level each layer gets, measuring KL divergence to the original model.

quick start:  planner search --budget 3.0bits          (default model and corpus, ~10 min on 2 cores)
then:         planner eval runs/<name>/best_plan.json   (KL and perplexity on held-out text)
              planner report runs/<name>                (HTML page with the Pareto scatter)
"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _model_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help=f"{DEFAULT_MODEL!r} (default, embedded), a local folder, a .gguf file, or a hub id")
    g.add_argument("--dataset", default=None, help="'builtin' (default; Python's pydoc topics, no download), a .txt/.jsonl/.parquet file, or wikitext2/c4/fineweb-edu (network)")
    g.add_argument("--text-field", default=None, help="field holding the text in .jsonl/.parquet files (default: text)")
    g.add_argument("--seqlen", type=_positive, default=None, help="tokens per window (default 512)")
    g.add_argument("--calib-tokens", type=_positive, default=None, help="calibration tokens for GPTQ Hessians (default 8192)")
    g.add_argument("--eval-tokens", type=_positive, default=None, help="held-out tokens for final evaluation (default 8192)")
    g.add_argument("--seed", type=int, default=None, help="seed for window split and search (default 0)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="evaluation dtype (default bf16: 3-4x faster on CPU)")
    g.add_argument("--trust-remote-code", action="store_true", default=None, help="allow model code from the hub (off by default)")
    g.add_argument("--space", default=None, help="search space: a built-in name (gptq-g128, rtn-g128, sparsegpt, nm, "
                   "joint, depth, ...: the files in search_spaces/) or a YAML file")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _workers_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workers (Ray; pip install 'planner[ray]')")
    g.add_argument("--workers", type=_positive, default=None, help="evaluate (and build levels) on N Ray workers; "
                   "without --ray-address a local Ray is started (default: in-process)")
    g.add_argument("--ray-address", default=None, help="join a running Ray cluster: auto or HOST:PORT "
                   "(workers: --workers, else one per GPU or per CPU)")
    g.add_argument("--worker-threads", type=_positive, default=1, help="torch threads per CPU worker (default 1)")


def _cluster(args):
    """The Ray workers asked for, or None (in-process)."""
    if getattr(args, "workers", None) is None and getattr(args, "ray_address", None) is None:
        return None
    from planner.distributed import Cluster, ClusterSpec

    return Cluster(ClusterSpec(workers=args.workers, address=args.ray_address, threads=args.worker_threads))


class _Parser(argparse.ArgumentParser):
    """Usage errors become one line and exit code 2, like every other bad input."""

    def error(self, message: str):
        raise PlannerError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="planner", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("search", help="find the best plan for a budget", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Build levels (cached), measure uniform baselines, search, and compare on held-out text.")
    s.add_argument("--budget", help="3.0bits (code bits per weight), 3.25bpw (stored bits incl. scales), a size like "
                   "45MB, 50%%sparsity (pruned weights), or limits joined by commas: 4.0bits,50%%sparsity")
    s.add_argument("--method", default=None, help="evo (default), uniform, nsga2 / tpe (multi-objective: KL and size, "
                   "--objectives), or a sensitivity method: ilp (exact knapsack "
                   "plan), lagrange (sweep of budgets), hessian (with --max-kl/--max-ppl-increase: bisection to the target), "
                   "or moe-lp (MoE models: MC-MoE expert allocation from routing statistics, --moe-*)")
    s.add_argument("--schedule", default=None, help="evo racing schedule: cpu (default: 30 generations, 16 offspring, "
                   "4@512,1@2048), fast (EvoPress super-fast), paper (EvoPress defaults; needs --kl-topk and much text), refine "
                   "(a second run from a converged plan: --init PLAN.json; 4@512,1@2048,1@8192 and --screen 4)")
    s.add_argument("--generations", type=int, default=None, help="evo / nsga2 generations (evo: overrides the schedule)")
    s.add_argument("--offspring", type=int, default=None, help="evo / nsga2 offspring per generation (evo: overrides the schedule)")
    s.add_argument("--pop-size", type=_positive, default=None, help="nsga2 population (default 24)")
    s.add_argument("--trials", type=_positive, default=None, help="tpe: plans measured (default 200)")
    s.add_argument("--tokens", type=_positive, default=None, help="nsga2 / tpe: tokens every plan is measured on "
                   "(one fixed batch; default 1024)")
    s.add_argument("--objectives", default=None, help="nsga2 / tpe objectives: kl,size (nsga2 default: a front of "
                   "KL vs size within the budget; size = the budget's metric), kl (tpe default), kl,bits,bpw,bytes, "
                   "or hardware: kl,latency (predicted decode-step time, see --max-latency), kl,memory")
    s.add_argument("--storage", default=None, help="tpe: also write the optuna study to sqlite:///study.db (or a journal "
                   "file) for optuna-dashboard; a resumed run continues the same study")
    s.add_argument("--study-name", default=None, help="tpe: the study's name in --storage (default: the run name)")
    s.add_argument("--stages", default=None, help="evo racing stages as survivors@tokens,... (overrides the schedule)")
    s.add_argument("--same-size-only", action="store_true", help="evo swaps bits only between units of one size (EvoPress's default)")
    s.add_argument("--local-repair", action="store_true",
                   help="evo's budget repair moves units at or after the earliest switched block first (more prefix-cache reuse)")
    s.add_argument("--screen", type=_positive, default=None,
                   help="evo breeds N x offspring and races the offspring the sensitivity (--score) predicts least "
                   "damaging (default 1: no screen; see reports/evo_quality.txt)")
    s.add_argument("--evo-config", default=None, help="a JSON/YAML file of evo settings (generations, offspring, stages, max_switches, ...)")
    s.add_argument("--init", default=None, help="evo warm start: uniform (default: the best uniform plan/mix), hessian "
                   "(the exact knapsack plan of --score), moe-lp (MoE models: the moe-lp plan) or a plan JSON file")
    s.add_argument("--score", default=None, help="sensitivity score for ilp/lagrange/hessian and --init hessian: "
                   "fisher (default), hutchinson, noise, proxy (see `planner sensitivity`)")
    s.add_argument("--max-kl", type=float, default=None, help="hessian: accuracy target, the most compressed plan "
                   "with KL <= this (--budget optional: it caps the search)")
    s.add_argument("--max-ppl-increase", default=None, help="hessian: accuracy target as a perplexity increase, e.g. 2%%")
    s.add_argument("--target", choices=["vllm", "llamacpp", "gptqmodel", "packed"], default=None,
                   help="search only plans this engine can serve (its levels; fused groups share one scheme)")
    s.add_argument("--moe-cost", choices=["full", "frequency", "error", "measured"], default=None, help="moe-lp (and "
                   "evo --init moe-lp): expert cost frequency^a x weight^b x output error (full, default), routing only "
                   "(frequency), output error only (error), or the measured routing-weighted error at the block "
                   "output (measured)")
    s.add_argument("--moe-a", type=float, default=None, help="moe-lp: exponent of the activation frequency (default 1)")
    s.add_argument("--moe-b", type=float, default=None, help="moe-lp: exponent of the mean routing weight (default 1)")
    s.add_argument("--moe-layer-budget", action="store_true", help="moe-lp: also hold each MoE layer's experts to "
                   "the budget's average")
    s.add_argument("--moe-min-count", default=None, help="moe-lp: at least N experts per MoE layer at a level, "
                   "e.g. gptq-b2-g128:1,gptq-b4-g128:1")
    s.add_argument("--prune-levels", choices=["none", "dominated", "hull"], default=None, help="cut each unit's "
                   "ladder to the levels no other beats on both cost and proxy error (dominated) or to their lower "
                   "convex hull (hull) before searching (default: the space's prune_levels, none)")
    s.add_argument("--tie-fused", action="store_true", help="fused groups (q/k/v, gate/up) share one level "
                   "(kept by ilp, lagrange and hessian)")
    s.add_argument("--kl-topk", type=_positive, default=None, help="measure KL over the reference's top-K tokens (+ tail); default: full vocabulary")
    s.add_argument("--uniform-tokens", type=_positive, default=None, help="tokens per uniform-baseline measurement (default 2048)")
    s.add_argument("--name", default=None, help="run name (default: a timestamp); the run dir is RUNS_DIR/NAME")
    s.add_argument("--runs-dir", default="runs", help="where run dirs go (default ./runs)")
    s.add_argument("--resume", metavar="RUN", default=None, help="continue an interrupted run dir with its own config")
    s.add_argument("--real", action="store_true", help="evaluate through the packed runtime (real low-bit kernels) "
                   "instead of dequantized weights")
    h = s.add_argument_group("hardware limits (extra limits every searcher keeps; --budget becomes optional)")
    h.add_argument("--max-latency", metavar="MS", default=None, help="predicted time of one decode step at most this: "
                   "5ms, 800us, 0.005s (a bare number is ms); timed once per device on the packed kernels and cached "
                   "next to the levels DB")
    h.add_argument("--max-memory", metavar="SIZE", default=None, help="bytes of the whole packed model at most this "
                   "(60MB, 1.2GB): planned weights as stored plus everything else at 16 bits")
    h.add_argument("--latency-batch", type=_positive, default=None, help="tokens per decode step the latency is "
                   "predicted for (default 1: one sequence)")
    _model_data_args(s)
    _common(s)
    _workers_args(s)

    sn = sub.add_parser("sensitivity", help="per-unit sensitivity scores (cached next to the levels database)")
    sn.add_argument("--score", default=None, help="fisher (default), hutchinson, noise, proxy, or all")
    sn.add_argument("--top", type=int, default=15, help="print the N most sensitive units (default 15)")
    _model_data_args(sn)
    _common(sn)

    lv = sub.add_parser("levels", help="build the levels database")
    lvs = lv.add_subparsers(dest="levels_command", required=True, metavar="ACTION")
    b = lvs.add_parser("build", help="quantize every unit at every level of the search space (cached)")
    _model_data_args(b)
    _common(b)
    _workers_args(b)

    e = sub.add_parser("eval", help="KL and perplexity of a plan on held-out windows")
    e.add_argument("plan", help="a plan JSON (e.g. runs/<name>/best_plan.json); its run's model and data are reused")
    e.add_argument("--real", action="store_true", help="run the plan through the packed runtime (real low-bit kernels)")
    _model_data_args(e)
    _common(e)
    _workers_args(e)

    r = sub.add_parser("report", help="write the dashboard (HTML) or tables of one or more runs")
    r.add_argument("run", nargs="+", help="run dir(s) (runs/<name>); several merge, one point per distinct plan")
    r.add_argument("--format", default="html", choices=["html", "csv", "parquet", "markdown"],
                   help="html (default: the dashboard), or tables: top plans, per-layer allocation, method comparison")
    r.add_argument("--out", default=None, help="html: output file (default RUN/report.html, ./report.html for several "
                   "runs); tables: output directory (default RUN/tables)")
    r.add_argument("--quiet", "-q", action="store_true", help="accepted for symmetry: report shows no progress bars")

    d = sub.add_parser("dashboard", help="serve the dashboard on 127.0.0.1, refreshed while a search runs")
    d.add_argument("run", nargs="+", help="run dir(s) (runs/<name>)")
    d.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free port)")
    d.add_argument("--refresh", type=float, default=5.0, help="seconds between the page's polls (default 5)")

    x = sub.add_parser("export", help="write a plan in a format a serving engine loads",
                       description="Export a run's plan for llama.cpp, GPTQModel, vLLM (compressed-tensors) or the "
                                   "planner's packed format; a plan the target cannot serve is refused.")
    x.add_argument("run", help="a run dir (runs/<name>)")
    x.add_argument("--plan", default="best", help="best (default), a plan_id from RUN/results.jsonl, or a plan JSON file")
    x.add_argument("--format", required=True, help="llamacpp, gptqmodel, compressed-tensors or packed")
    x.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    x.add_argument("--dtype", default="fp16", help="dtype of the unquantized tensors: fp16 (default), bf16, fp32")
    _common(x)
    return parser


DEFAULTS = {"method": "evo", "schedule": "cpu", "uniform_tokens": 2048, "space": "gptq-g128", "init": "uniform"}


def _parse_stages(text: str) -> list[list[int]]:
    try:
        pairs = [part.split("@") for part in text.split(",")]
        return [[int(s), int(t)] for s, t in pairs]
    except ValueError:
        raise PlannerError(f"malformed --stages {text!r}: use survivors@tokens pairs, e.g. 4@512,1@2048") from None


def _evo_config(args) -> dict:
    """Schedule table < --evo-config file < explicit flags."""
    from planner.search.evo import SCHEDULES

    name = args.schedule or DEFAULTS["schedule"]
    if name not in SCHEDULES:
        raise PlannerError(f"unknown --schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    config = {k: [list(s) for s in v] if k == "stages" else v for k, v in SCHEDULES[name].items()}
    if args.evo_config:
        import yaml

        try:
            extra = yaml.safe_load(Path(args.evo_config).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise PlannerError(f"cannot read --evo-config {args.evo_config!r} ({str(e).splitlines()[0]}): pass a JSON/YAML mapping") from None
        if not isinstance(extra, dict):
            raise PlannerError(f"--evo-config {args.evo_config!r} must hold a mapping of evo settings")
        config.update(extra)
    for key, value in (("generations", args.generations), ("offspring", args.offspring)):
        if value is not None:
            config[key] = value
    if args.stages:
        config["stages"] = _parse_stages(args.stages)
    if args.same_size_only:
        config["same_size_only"] = True
    if args.local_repair:
        config["local_repair"] = True
    if args.screen is not None:
        config["screen"] = args.screen
    return config


def _moe_config(args, method: str) -> dict:
    """moe-lp settings from the --moe-* flags (for --method moe-lp, or evo's --init moe-lp)."""
    config = {k: v for k, v in (("cost", args.moe_cost), ("a", args.moe_a), ("b", args.moe_b)) if v is not None}
    if args.moe_layer_budget:
        config["layer_budget"] = True
    if args.moe_min_count:
        try:
            config["min_count"] = [[lv, int(n)] for lv, n in (p.rsplit(":", 1) for p in args.moe_min_count.split(","))]
        except ValueError:
            raise PlannerError(f"malformed --moe-min-count {args.moe_min_count!r}: use LEVEL:N pairs, "
                               "e.g. gptq-b2-g128:1") from None
    if args.init == "moe-lp" and method != "evo":
        raise PlannerError("--init moe-lp warm-starts evo: use it with --method evo (or --method moe-lp alone)")
    if config and "moe-lp" not in (method, args.init):
        raise PlannerError("--moe-* flags apply to --method moe-lp or --init moe-lp")
    return config


def _model_data(args, base: dict | None = None):
    """ModelData from the run's config (if any), overridden by flags given explicitly."""
    from planner.pipeline import ModelData

    values = dict(base or {})
    for f in dataclasses.fields(ModelData):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return ModelData(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(ModelData)}})


def _setup_torch(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


def _hardware_config(args):
    """The hardware limits of --max-latency / --max-memory / --latency-batch (validated, SI units)."""
    from planner.budget import HardwareSpec, parse_latency, parse_memory

    wants_latency = args.max_latency is not None or "latency" in (args.objectives or "").replace(" ", "").split(",")
    if args.latency_batch is not None and not wants_latency:
        raise PlannerError("--latency-batch applies to --max-latency or a latency objective (--objectives kl,latency)")
    return HardwareSpec(max_latency=None if args.max_latency is None else parse_latency(args.max_latency).value,
                        max_memory=None if args.max_memory is None else parse_memory(args.max_memory).value,
                        batch=args.latency_batch or 1)


def _hardware_problem(session, problem, cfg: dict, resumed):
    """The problem with the run's hardware costs and limits; a resumed run reuses the costs it saved
    (a latency table measured again would differ a little and change the search under it)."""
    from planner.budget import HardwareSpec
    from planner.runtime.hardware import attach_hardware

    spec = dataclasses.replace(HardwareSpec(**cfg.get("hardware", {})),
                               objectives=tuple(cfg["method_config"].get("objectives", ())))
    saved = resumed.load_problem().hardware if resumed is not None and (resumed.path / "problem.json").is_file() else None
    return attach_hardware(session, problem, spec, saved)


def cmd_search(args) -> int:
    from planner.pipeline import base_scores, finish, prepare, prune_levels, run_method
    from planner.rundir import RunDir
    from planner.space import PruneLevels, load_space

    if args.resume:
        run = RunDir.open(args.resume)
        cfg = run.config
        md = _model_data(argparse.Namespace(), cfg["model_data"])
    else:
        targeted = args.max_kl is not None or args.max_ppl_increase is not None
        hardware = _hardware_config(args)
        if not args.budget and not targeted and not hardware.limits():
            raise PlannerError("missing --budget: e.g. --budget 3.0bits, 3.25bpw or 45MB (or a --max-latency / --max-memory)")
        if args.budget and any(b.metric in HARDWARE for b in parse_budget(args.budget).limits):
            raise PlannerError(f"--budget {args.budget!r} holds a latency: give it as --max-latency")
        method = args.method or DEFAULTS["method"]
        from planner.search import make_config
        from planner.sensitivity.plans import PROXY_METHODS, parse_score, target_config

        parse_score(args.score)
        method_config = _moo_config(args, method, args.name) or (_evo_config(args) if method == "evo" else {})
        if method in PROXY_METHODS:
            method_config = target_config(method, args.max_kl, args.max_ppl_increase, args.uniform_tokens or
                                          DEFAULTS["uniform_tokens"])
        elif targeted:
            raise PlannerError("--max-kl/--max-ppl-increase need --method hessian")
        make_config(method, method_config)           # validate before any expensive work
        moe = _moe_config(args, method)
        if method == "moe-lp":
            method_config = {**moe, "tokens": args.uniform_tokens or DEFAULTS["uniform_tokens"]}
        if args.init and args.init not in ("uniform", "hessian", "moe-lp"):
            from planner.plan import Plan

            Plan.load(args.init)
        md = _model_data(args)
        name = args.name or datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(args.runs_dir) / name
        if path.exists():
            raise BadRunDir(f"run dir {str(path)!r} already exists: pick another --name, or --resume it")
        cfg = {"budget": args.budget, "method": method, "method_config": method_config,
               "space": args.space or DEFAULTS["space"], "uniform_tokens": args.uniform_tokens if args.uniform_tokens is not None else DEFAULTS["uniform_tokens"],
               "init": args.init or DEFAULTS["init"], "moe_lp": moe,
               "score": args.score, "tie_fused": bool(args.tie_fused), "prune_levels": args.prune_levels, "real": bool(args.real), "target": args.target,
               "hardware": {k: v for k, v in dataclasses.asdict(hardware).items() if k != "objectives"},
               "model_data": dataclasses.asdict(md)}
    space = load_space(cfg["space"])
    budget = parse_budget(cfg["budget"]) if cfg["budget"] else None    # None: only an accuracy target
    _setup_torch(args.threads)
    t0 = time.perf_counter()
    session = prepare(md, space, quiet=args.quiet, cluster=_cluster(args))
    from planner.sensitivity import problem_for

    problem = problem_for(session, budget, cfg.get("tie_fused", False))   # infeasible budget: error before the run dir exists
    if cfg.get("target"):
        from planner.export.targets import Target, search_problem
        from planner.moe.experts import refuse_fused_experts

        refuse_fused_experts(problem.model_units, f"--target {cfg['target']} (exports)", "search without --target "
                             "and measure plans with `planner eval`", session.loaded.model)

        problem = search_problem(problem, Target(cfg["target"]), {u.name: u.shape for u in session.units})
    problem = prune_levels(session, problem, PruneLevels(cfg.get("prune_levels") or space.prune_levels))
    problem = _hardware_problem(session, problem, cfg, run if args.resume else None)
    if cfg.get("real"):
        from planner.runtime import real_evaluator

        real_evaluator(session, problem)              # the session's evaluator from now on: packed kernels
    stages = cfg["method_config"].get("stages", [])
    session.windows.draw(max([cfg["uniform_tokens"], cfg["method_config"].get("tokens", 0), *(t for _, t in stages)]),
                         0)  # fits the search pool?
    if not args.resume:
        run = RunDir.create(path, cfg)
        run.save_problem(problem)
    seed = md.seed
    best = run_method(session, problem, run, cfg["method"], cfg["method_config"], seed, cfg["uniform_tokens"],
                      init=cfg.get("init", "uniform"), score=cfg.get("score"))
    rows = finish(session, problem, run, best, cfg["method"])
    base = base_scores(session, problem)
    print(summary_table(rows, base, problem, session, run, time.perf_counter() - t0))
    return 0


def summary_table(rows, base, problem, session, run, seconds: float) -> str:
    n = problem.total_numel
    lines = [f"\nplanner search: budget {problem.budget}, method {run.config['method']}, "
             f"{len(run.results())} evaluations, {seconds / 60:.1f} min",
             f"held-out: {base.tokens} tokens of {session.spec.dataset!r} never used for calibration or search; "
             f"bits/bpw count the {problem.n_units} decoder-block linears ({n / 1e6:.1f}M weights; embeddings and lm_head excluded)",
             "", f"{'plan':<34} {'bits':>6} {'bpw':>6} {'MB':>7} {'KL':>8} {'ppl':>8}",
             f"{'base model (reference)':<34} {'':>6} {'':>6} {'':>7} {0.0:>8.4f} {base.ppl:>8.3f}"]
    prunes = problem.kept is not None and bool((problem.kept < problem.numel[:, None]).any())
    if prunes:                                      # pruning levels: the sparsity of every plan too
        lines[-2:] = [lines[-2] + f" {'sparse':>7}", lines[-1] + f" {'':>7}"]
    hw = [(m, head, scale) for m, head, scale in ((Metric.LATENCY, "ms", 1e3), (Metric.MEMORY, "mem MB", 1e-6))
          if m in problem.hardware]             # hardware costs: predicted latency, whole-model memory
    for _, head, _ in hw:
        lines[-2:] = [lines[-2] + f" {head:>7}", lines[-1] + f" {'':>7}"]
    for r in rows:
        mark = " *" if r.label == "best" else ""
        label = f"best ({r.method})" if r.label == "best" else r.label
        c = problem.cost(r.x)
        lines.append(f"{label + mark:<34} {r.bits:>6.3f} {r.bpw:>6.3f} {r.bytes / 1e6:>7.2f} {r.kl:>8.4f} {r.ppl:>8.3f}"
                     + (f" {c.sparsity:>7.1%}" if prunes else "")
                     + "".join(f" {c.value(m) * scale:>7.2f}" for m, _, scale in hw))
    lines += ["", f"run dir: {run.path}", f"next:    planner eval {run.path / 'best_plan.json'}",
              f"         planner report {run.path}"]
    return "\n".join(lines)


def cmd_sensitivity(args) -> int:
    from planner.pipeline import prepare
    from planner.sensitivity import Score, SensitivityConfig, session_sensitivity
    from planner.sensitivity.plans import parse_score, summary
    from planner.space import load_space

    scores = list(Score) if args.score == "all" else [parse_score(args.score)]
    _setup_torch(args.threads)
    session = prepare(_model_data(args), load_space(args.space or DEFAULTS["space"]), quiet=args.quiet)
    for score in scores:
        config = SensitivityConfig(score=score)
        print(summary(session_sensitivity(session, config), session.db, config, args.top))
    return 0


def cmd_levels(args) -> int:
    from planner.pipeline import prepare
    from planner.space import load_space

    _setup_torch(args.threads)
    session = prepare(_model_data(args), load_space(args.space or DEFAULTS["space"]), quiet=args.quiet,
                      cluster=_cluster(args))
    print(f"levels database: {session.db.path} ({len(session.db.units)} units x {len(session.space.levels)} levels)")
    return 0


def cmd_eval(args) -> int:
    from planner.pipeline import prepare
    from planner.plan import Plan
    from planner.rundir import RunDir
    from planner.space import load_space

    plan = Plan.load(args.plan)
    run_path = Path(args.plan).resolve().parent
    base_cfg = RunDir.open(run_path).config if (run_path / "config.json").is_file() else {}
    md = _model_data(args, base_cfg.get("model_data"))
    space = load_space(args.space or base_cfg.get("space") or DEFAULTS["space"])
    _setup_torch(args.threads)
    session = prepare(md, space, quiet=args.quiet, cluster=_cluster(args))
    from planner.budget import Budget, Metric

    problem = session.db.problem(session.units, Budget(1e9, Metric.BITS))
    x = problem.encode(plan)
    from planner.runtime import real_evaluator

    ev = real_evaluator(session, problem) if args.real else session.evaluator(problem)
    s = ev.score(plan, session.windows.heldout)
    base = ev.score(None, session.windows.heldout)
    c = problem.cost(x)
    print(json.dumps({"plan": plan.id, "bits": round(c.bits, 4), "bpw": round(c.bpw, 4), "bytes": c.nbytes,
                      "kl": round(s.kl, 5), "ppl": round(s.ppl, 4), "base_ppl": round(base.ppl, 4),
                      "tokens": s.tokens, "dataset": md.dataset, "real": bool(args.real)}))
    print(f"plan {plan.id}: bits {c.bits:.3f}  bpw {c.bpw:.3f}  KL {s.kl:.4f}  ppl {s.ppl:.3f} "
          f"(base {base.ppl:.3f}) on {s.tokens} held-out tokens of {md.dataset!r}", file=sys.stderr)
    return 0


def _moo_config(args, method: str, name: str | None) -> dict:
    """nsga2 / tpe settings from flags; a flag that only another method reads is an error, not ignored."""
    own = {"nsga2": ("generations", "offspring", "pop_size", "tokens"), "tpe": ("trials", "storage", "study_name", "tokens")}
    for flag in ("pop_size", "trials", "storage", "study_name", "objectives", "tokens"):
        users = [m for m, flags in own.items() if flag in flags] or list(own)
        if getattr(args, flag) is not None and method not in users:
            raise PlannerError(f"--{flag.replace('_', '-')} applies to --method {' / '.join(users)}, not {method}")
    if method not in own:
        return {}
    config = {k: getattr(args, k) for k in own[method] if getattr(args, k) is not None}
    if args.objectives:
        config["objectives"] = [o.strip() for o in args.objectives.split(",")]
    if method == "tpe" and args.storage and not args.study_name and name:
        config["study_name"] = name
    return config


def cmd_report(args) -> int:
    if args.format == "html":
        from planner.report.dashboard import write_dashboard

        print(write_dashboard(args.run, Path(args.out) if args.out else None))
        return 0
    from planner.report.tables import load_runs, write_tables

    runs = load_runs(args.run)
    for path in write_tables(runs, Path(args.out) if args.out else runs.runs[0].path / "tables", args.format):
        print(path.read_text() if args.format == "markdown" else path)
    return 0


def cmd_dashboard(args) -> int:
    from planner.report.serve import make_server

    try:
        server = make_server(args.run, args.port, args.refresh)
    except OSError as e:
        raise PlannerError(f"cannot listen on 127.0.0.1:{args.port} ({e.strerror}): pass another --port") from None
    print(f"planner dashboard: http://127.0.0.1:{server.server_address[1]}/ (refreshes every {args.refresh:g} s; "
          "Ctrl-C stops)", flush=True)
    with server:
        server.serve_forever()
    return 0


def cmd_export(args) -> int:
    from planner.export import export_run
    from planner.moe.experts import refuse_fused_experts
    from planner.rundir import RunDir

    refuse_fused_experts(RunDir.open(args.run).load_problem().model_units, "planner export",  # before loading anything
                         f"measure the plan with `planner eval {Path(args.run) / 'best_plan.json'}` instead "
                         "(exports need a checkpoint with one module per expert)")
    _setup_torch(args.threads)
    result = export_run(args.run, args.plan, args.format, args.out, dtype=args.dtype, quiet=args.quiet)
    print("\n".join([f"exported plan as {result.format} to {result.out}", *result.lines]))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except PlannerError as e:
        print(f"planner: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if getattr(args, "quiet", False):
        os.environ.setdefault("TQDM_DISABLE", "1")
    handler = {"search": cmd_search, "levels": cmd_levels, "eval": cmd_eval, "report": cmd_report,
               "export": cmd_export, "sensitivity": cmd_sensitivity, "dashboard": cmd_dashboard}[args.command]
    try:
        return handler(args)
    except PlannerError as e:
        print(f"planner: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (resume with: planner search --resume RUN)" if args.command == "search" else ""
        print(f"planner: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        if "planner.distributed" in sys.modules:      # --workers/--ray-address: stop the actors (and a local Ray)
            sys.modules["planner.distributed"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
