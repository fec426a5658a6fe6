"""Expert statistics on calibration data, and the data the `moe-lp` searcher takes.

Per expert (one pass over the calibration windows, base fp32 model):
- frequency: share of calibration tokens routed to it (a layer's experts sum to top_k);
- weight: its mean routing weight over those tokens (0 when none reached it);
- error[level]: mean squared error of its output on (up to `max_tokens` of) its routed tokens
  with all its matrices at that level and everything else exact (quantized alone; MC-MoE's);
- damage[level]: the squared error it adds to its block's output per calibration token,
  routing weights included (planner/moe/damage.py).
Per dense unit (attention, shared experts, dense MLPs), at each level:
- block[level]: the squared error it adds to its decoder block's output per token, alone at that
  level: the experts' `damage` currency, so one program weighs both (`Currency.BLOCK`, default);
- dense[level]: the older layer-local error at the linear's own output, E||dW x||^2 per token =
  tr(dW S dW^T), paired with the experts' frequency * weight^2 * error (`Currency.LINEAR`, kept as
  an ablation: its q/k, gate/up and gated shared-expert errors are in other units than the block
  output's, which mis-weighed dense units against experts; damage.py says how).
Per decoder block: kl, the measured KL of the model with only that block's units at their cheapest
level. Its gain, that KL over what the block's damages predict for it, turns a damage into KL: an
early block's error, which travels through every later block, then weighs what it costs (without
gains the program gave the first 19 layers' experts 2 bits at 2.5 bits on the MoEfied SmolLM2 and
lost to uniform); gains from isotropic noise at a block's output fell 100x with depth, as the
residual stream's few huge dimensions set the noise scale, and starved the late layers instead.

Cached as JSON next to the levels DB (whose key already pins model, calibration and space).
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from planner.levels.hessian import collect_hessians
from planner.moe.damage import block_damage
from planner.moe.experts import MoeBlock, moe_blocks
from planner.moe.routing import capture_routing, expert_matrices, routed
from planner.rundir import write_json
from planner.units import Unit

STATS_SCHEMA = 4


class Currency(str, enum.Enum):
    """Where the program's errors are measured (both then times their block's gain)."""

    BLOCK = "block"      # the decoder block's output, per token: experts and dense units alike
    LINEAR = "linear"    # each dense linear's own output; experts frequency * weight^2 * error


@dataclass(frozen=True)
class ExpertStat:
    block: int
    expert: int
    units: tuple[str, ...]
    tokens: int                 # calibration tokens routed to it
    frequency: float            # tokens / calibration tokens
    weight: float               # mean routing weight over its routed tokens
    error: dict[str, float]     # level id -> mean squared output error per routed token, alone at that level
    damage: dict[str, float]    # level id -> routing-weighted block-output error per calibration token


@dataclass(frozen=True)
class MoeStats:
    experts: tuple[ExpertStat, ...]
    dense: dict[str, dict[str, float]]   # dense unit -> level id -> E||dW x||^2 per token (its own output)
    block: dict[str, dict[str, float]]   # dense unit -> level id -> block-output error per token
    kl: dict[int, float]                 # decoder block -> KL with its units at their cheapest level
    gain: dict[str, dict[int, float]]    # currency -> decoder block -> kl / the block's predicted damage
    tokens: int                          # calibration tokens
    max_tokens: int                      # routed tokens per expert the errors were measured on (at most)
    damage_tokens: int                   # calibration tokens the block-output damages were measured on
    seconds: float

    def to_json(self) -> dict:
        return {"schema": STATS_SCHEMA, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> MoeStats:
        experts = tuple(ExpertStat(**{**e, "units": tuple(e["units"])}) for e in d["experts"])
        blocks = lambda m: {int(b): float(v) for b, v in m.items()}  # noqa: E731  (JSON keys are strings)
        return cls(experts, d["dense"], d["block"], blocks(d["kl"]), {c: blocks(g) for c, g in d["gain"].items()},
                   int(d["tokens"]), int(d["max_tokens"]), int(d["damage_tokens"]), float(d["seconds"]))


def _levels_of(db, unit: str) -> list[str]:
    return [lv.id for lv in db.levels(unit)]


@torch.no_grad()
def _expert_stats(model: nn.Module, blocks: list[MoeBlock], db, calib_ids: torch.Tensor, max_tokens: int,
                  damage: dict[tuple[int, int], dict[str, float]], progress=None) -> list[ExpertStat]:
    count: dict[tuple[int, int], int] = {}
    wsum: dict[tuple[int, int], float] = {}
    kept: dict[tuple[int, int], list[torch.Tensor]] = {}

    def fn(mb: MoeBlock, X: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        for j in range(mb.n_experts):
            tok, wj = routed(idx, w, j)
            key = (mb.block, j)
            count[key] = count.get(key, 0) + int(tok.numel())
            wsum[key] = wsum.get(key, 0.0) + float(wj.float().sum())
            have = sum(len(t) for t in kept.setdefault(key, []))
            if tok.numel() and have < max_tokens:
                kept[key].append(X[tok[:max_tokens - have]].float().clone())

    capture_routing(model, blocks, calib_ids, fn, progress=progress)
    n_tokens = int(calib_ids.numel())
    out = []
    for mb in blocks:
        for j, units in enumerate(mb.units):
            key = (mb.block, j)
            n = count.get(key, 0)
            ids = [lv for lv in _levels_of(db, units[0].name) if all(lv in _levels_of(db, u.name) for u in units)]
            error = {lv: 0.0 for lv in ids}
            if kept.get(key):
                X = torch.cat(kept[key])
                ref = expert_matrices(model, mb, j).forward(X)
                for lv in ids:
                    q = {u.name: db.load(u.name, lv).dequantize(torch.float32) for u in units}
                    error[lv] = float((expert_matrices(model, mb, j, q).forward(X) - ref).pow(2).sum(-1).mean())
            out.append(ExpertStat(mb.block, j, tuple(u.name for u in units), n, n / n_tokens,
                                  wsum.get(key, 0.0) / n if n else 0.0, error, damage.get(key, {lv: 0.0 for lv in ids})))
    return out


@torch.no_grad()
def _dense_errors(model: nn.Module, units: list[Unit], db, calib_ids: torch.Tensor, progress=None
                  ) -> dict[str, dict[str, float]]:
    H = collect_hessians(model, units, calib_ids, progress=progress)    # 2/n X^T X per fused group
    out = {}
    for u in units:
        S = H[u.group].double() / 2
        W = model.get_submodule(u.name).weight.double()
        out[u.name] = {}
        for lv in _levels_of(db, u.name):
            D = db.load(u.name, lv).dequantize(torch.float32).double() - W
            out[u.name][lv] = float(((D @ S) * D).sum())
    return out


def _cheapest(db, unit: str) -> str:
    return min(db.levels(unit), key=lambda lv: (lv.stored_bits, lv.code_bits)).id


@torch.no_grad()
def block_kl(model: nn.Module, units: list[Unit], db, ids: torch.Tensor) -> dict[int, float]:
    """Per decoder block: the KL (per token) of the model with only that block's units at their
    cheapest level: one measured point per block that calibrates the damages' sum (`gains`)."""
    from planner.moe.experts import unit_weight

    clean = model(ids, use_cache=False).logits.float().log_softmax(-1)
    out = {}
    for b in sorted({u.block for u in units}):
        mine = [u for u in units if u.block == b]
        saved = {u.name: unit_weight(model, u.name).detach().clone() for u in mine}
        try:
            for u in mine:
                unit_weight(model, u.name).copy_(db.load(u.name, _cheapest(db, u.name)).dequantize(torch.float32))
            logp = model(ids, use_cache=False).logits.float().log_softmax(-1)
        finally:
            for u in mine:
                unit_weight(model, u.name).copy_(saved[u.name])
        out[b] = float((clean.exp() * (clean - logp)).sum(-1).mean())
    return out


def block_gains(units: list[Unit], db, experts: list[ExpertStat], dense: dict, kl: dict[int, float],
          currency: Currency) -> dict[int, float]:
    """Per decoder block: its measured KL over the damage its units at their cheapest level add up
    to in `currency` (block: dense `block` damages + experts' `damage`; linear: dense E||dW x||^2 +
    experts' frequency * weight^2 * error)."""
    out = {}
    for b, measured in kl.items():
        level = {u.name: _cheapest(db, u.name) for u in units if u.block == b}
        predicted = sum(dense[u][lv] for u, lv in level.items() if u in dense)
        for e in (e for e in experts if e.block == b):
            lv = level[e.units[0]]
            predicted += e.damage[lv] if currency is Currency.BLOCK else e.frequency * e.weight ** 2 * e.error[lv]
        out[b] = max(measured, 0.0) / predicted if predicted > 0 else 1.0
    return out


def compute_stats(model: nn.Module, units: list[Unit], db, calib_ids: torch.Tensor, max_tokens: int = 512,
                  progress=None, gain_windows: int = 2, damage_tokens: int = 2048) -> MoeStats:
    """Statistics of every expert and dense unit among `units` (model: fp32 base weights); the
    block-output damages on the first `damage_tokens` calibration tokens (whole windows)."""
    t0 = time.perf_counter()
    blocks = moe_blocks(model, units)
    ids = calib_ids[:max(1, -(-damage_tokens // calib_ids.shape[1]))]
    block, damage = block_damage(model, units, blocks, db, ids)
    experts = _expert_stats(model, blocks, db, calib_ids, max_tokens, damage, progress)
    dense = _dense_errors(model, [u for u in units if u.expert < 0], db, calib_ids)
    kl = block_kl(model, units, db, calib_ids[:gain_windows])
    gain = {Currency.BLOCK.value: block_gains(units, db, experts, block, kl, Currency.BLOCK),
            Currency.LINEAR.value: block_gains(units, db, experts, dense, kl, Currency.LINEAR)}
    return MoeStats(tuple(experts), dense, block, kl, gain, int(calib_ids.numel()), max_tokens, int(ids.numel()),
                    time.perf_counter() - t0)


def cached_stats(model_fn, units: list[Unit], db, calib_ids: torch.Tensor, max_tokens: int = 512,
                 progress=None) -> MoeStats:
    """`compute_stats` cached next to the levels DB; `model_fn()` gives the fp32 model when needed."""
    import json

    path = db.path / f"moe_stats-{max_tokens}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        stats = MoeStats.from_json(saved) if saved.get("schema") == STATS_SCHEMA else None
        if stats and {u for e in stats.experts for u in e.units} | set(stats.block) >= {u.name for u in units}:
            return stats
    stats = compute_stats(model_fn(), units, db, calib_ids, max_tokens, progress)
    write_json(path, stats.to_json())
    return stats


def lp_data(stats: MoeStats, problem, gains: bool = True, currency: Currency | str = Currency.BLOCK) -> dict:
    """The `moe-lp` config fields (JSON-able) for `problem`'s units, from `stats`: errors and damages
    in `currency`, times their block's gain (`gains=False`: as measured). A problem whose units are
    tie groups (`tie: expert`, `tie: fused`) gets each expert as its problem units and each dense
    unit's damage summed over its members."""
    currency = Currency(currency)
    members = problem.members or tuple((u,) for u in problem.units)
    at = {n: i for i, names in enumerate(members) for n in names}      # model unit -> problem unit
    experts = [e for e in stats.experts if all(u in at for u in e.units)]
    levels = [lv for lv in experts[0].error if all(lv in e.error for e in experts)] if experts else []
    in_expert = {at[u] for e in experts for u in e.units}
    dense = [i for i in range(problem.n_units) if i not in in_expert]
    table = stats.block if currency is Currency.BLOCK else stats.dense
    missing = [n for i in dense for n in members[i] if n not in table]
    if missing:
        from planner.errors import PlannerError

        raise PlannerError(f"moe statistics lack unit {missing[0]!r}: recompute them for this model and space")
    blocks = problem.blocks or (0,) * problem.n_units
    g = {b: (stats.gain[currency.value].get(b, 1.0) if gains else 1.0) for b in set(blocks)}
    data = {"experts": [sorted({at[u] for u in e.units}) for e in experts], "layers": [e.block for e in experts],
            "frequency": [e.frequency for e in experts], "weight": [e.weight for e in experts],
            "levels": levels, "error": [[g[e.block] * e.error[lv] for lv in levels] for e in experts],
            "dense": dense, "damage": [[g[blocks[i]] * sum(table[n][lv] for n in members[i])
                                        for lv in problem.levels[i]] for i in dense]}
    if currency is Currency.BLOCK:
        data["expert_damage"] = [[g[e.block] * e.damage[lv] for lv in levels] for e in experts]
    return data


def expert_table(stats: MoeStats) -> dict:
    """Per-expert statistics for the run dir (moe_stats.json) and the report's heatmap."""
    return {"tokens": stats.tokens, "experts": [
        {"block": e.block, "expert": e.expert, "units": list(e.units), "tokens": e.tokens,
         "frequency": e.frequency, "weight": e.weight, "error": e.error, "damage": e.damage} for e in stats.experts]}


def frequency_summary(stats: MoeStats) -> np.ndarray:
    """[layers, experts] activation frequency (for quick looks and tests)."""
    blocks = sorted({e.block for e in stats.experts})
    n = max(e.expert for e in stats.experts) + 1
    out = np.zeros((len(blocks), n))
    for e in stats.experts:
        out[blocks.index(e.block), e.expert] = e.frequency
    return out
