"""Predicted damage of every (unit, level): a per-unit sensitivity times the level's error.

    hutchinson  0.5 * tr(H_u)/n_u * ||dW||^2   H: Hessian of the mean per-token KL (Hutchinson)
    fisher      0.5 * tr(F_u)/n_u * ||dW||^2   F: empirical Fisher of the next-token NLL
    noise       alpha_u * ||dW||^2 / ||W||^2   alpha: KL response to injected noise (HIGGS)
    proxy       tr(dW H dW^T)                  H: the GPTQ Hessian of the unit's input (layer-local)

dW is the level's dequantized weight (from the levels DB) minus the base weight. The first three
predict KL in nats per token; `proxy` is a layer-local output error with no model-level weight.
Results are cached as JSON next to the levels DB they describe (`<db>/sensitivity/`), keyed by
the score and the settings it depends on.

MoE experts stored as fused 3-D tensors are scored per expert slice like any unit: their gradients
are the slices of the tensor's gradient, and `proxy` uses each expert's Hessian of its routed tokens
(planner/moe/levels.py), what a hook on a per-expert module would see.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from planner.errors import PlannerError
from planner.levels.db import LevelsDB
from planner.levels.gptq import proxy_error
from planner.levels.hessian import collect_hessians
from planner.moe.experts import expert_slice, moe_blocks, unit_weight
from planner.problem import Problem
from planner.rundir import write_json
from planner.sensitivity.curvature import fisher_trace, hutchinson_trace, unit_parameters, unit_slices
from planner.sensitivity.noise import noise_response
from planner.units import Unit

SENS_SCHEMA = 1


class Score(str, enum.Enum):
    HUTCHINSON = "hutchinson"
    FISHER = "fisher"
    NOISE = "noise"
    PROXY = "proxy"


@dataclass(frozen=True)
class SensitivityConfig:
    score: Score = Score.FISHER       # the default: see planner.sensitivity.plans.DEFAULT_SCORE
    tokens: int = 256                 # calibration tokens the score is measured on (proxy: all of them)
    tol: float = 0.1                  # hutchinson/fisher: stop at this relative standard error per unit
    min_probes: int = 8
    max_probes: int = 48
    noise: tuple[float, ...] = (0.01, 0.04)    # noise: relative MSEs injected (HIGGS t^2)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 2 or self.tol <= 0 or not 1 <= self.min_probes <= self.max_probes or not self.noise:
            raise PlannerError(f"invalid sensitivity settings {self}")

    def key(self) -> str:
        """The settings this score depends on (others do not change it, so they do not miss the cache)."""
        s = self.score
        used = {"score": s.value, "schema": SENS_SCHEMA}
        if s in (Score.HUTCHINSON, Score.FISHER):
            used |= {"tokens": self.tokens, "tol": self.tol, "min": self.min_probes, "max": self.max_probes,
                     "seed": self.seed}
        elif s is Score.NOISE:
            used |= {"tokens": self.tokens, "noise": list(self.noise), "seed": self.seed}
        return f"{s.value}-{hashlib.sha1(json.dumps(used, sort_keys=True).encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class Sensitivity:
    score: str
    units: tuple[str, ...]
    value: tuple[float, ...]     # per unit: trace per weight (hutchinson, fisher), alpha (noise), nan (proxy)
    stderr: tuple[float, ...]    # per unit: standard error of `value` (noise: relative fit residual)
    probes: int                  # probes (hutchinson, fisher) or forwards (noise) spent
    seconds: float
    damage: dict                 # unit -> level id -> predicted damage

    def rows(self, problem: Problem) -> list[list[float]]:
        """Damage in a problem's ladder order: the `damage` config of the proxy searchers.

        Clipped at 0: every score estimates a non-negative quantity (the KL Hessian is PSD at the
        base model), so a negative value is estimation noise on a unit that barely matters."""
        missing = [u for u in problem.model_units if u not in self.damage]
        if missing:
            raise PlannerError(f"sensitivity has no entry for unit {missing[0]!r}: recompute it for this model")
        names = problem.members or tuple((u,) for u in problem.units)   # a fused unit's damage: its members' sum
        return [[sum(max(0.0, float(self.damage[n][lv])) for n in names[i]) for lv in problem.levels[i]]
                for i in range(problem.n_units)]

    def to_json(self) -> dict:
        return {"schema": SENS_SCHEMA, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> Sensitivity:
        return cls(d["score"], tuple(d["units"]), tuple(d["value"]), tuple(d["stderr"]), int(d["probes"]),
                   float(d["seconds"]), d["damage"])


def calibration_batch(calib_ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first `tokens` calibration tokens as [windows, length] (one window cut short if fewer)."""
    seqlen = calib_ids.shape[1]
    n = min(len(calib_ids), -(-tokens // seqlen))
    return calib_ids[:n, : min(seqlen, tokens)]


@torch.no_grad()
def level_errors(model: nn.Module, units: list[Unit], db: LevelsDB,
                 hessians: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per unit and level: ||dW||^2 ("sq"), ||dW||^2/||W||^2 ("rel") and, given hessians, tr(dW H dW^T)."""
    out: dict[str, dict[str, dict[str, float]]] = {"sq": {}, "rel": {}, "proxy": {}}
    for u in units:
        W = unit_weight(model, u.name).detach().float()
        norm = float(W.double().pow(2).sum())
        for key in out:
            out[key][u.name] = {}
        for lv in db.levels(u.name):
            W_hat = db.load(u.name, lv.id).dequantize(torch.float32)
            sq = float((W_hat - W).double().pow(2).sum())
            out["sq"][u.name][lv.id] = sq
            out["rel"][u.name][lv.id] = sq / max(norm, 1e-300)
            if hessians is not None:
                out["proxy"][u.name][lv.id] = proxy_error(W, W_hat, hessians[u.group])
    return out


def unit_hessians(model: nn.Module, units: list[Unit], calib_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """unit.group -> H = 2/n X^T X of its input; a fused expert slice's over the tokens routed to it."""
    from planner.moe.levels import expert_hessians

    slices = [u for u in units if expert_slice(model, u.name) is not None]
    H = collect_hessians(model, [u for u in units if u not in slices], calib_ids)
    if slices:
        routed = expert_hessians(model, moe_blocks(model, slices), calib_ids, usable=False)
        H.update({u.group: routed[u.name] for u in slices})
    return H


def compute_sensitivity(model: nn.Module, units: list[Unit], db: LevelsDB, calib_ids: torch.Tensor,
                        blocks_path: str, config: SensitivityConfig, bar=None) -> Sensitivity:
    """The score of `config` on `model` (fp32; its units get gradients) and its damage table."""
    t0 = time.perf_counter()
    ids = calibration_batch(calib_ids, config.tokens)
    names = [u.name for u in units]
    numel = np.array([u.numel for u in units], dtype=np.float64)
    s = config.score
    if s is Score.PROXY:
        errors = level_errors(model, units, db, unit_hessians(model, units, calib_ids))
        value, stderr, probes = np.full(len(units), np.nan), np.zeros(len(units)), 0
        damage = errors["proxy"]
    elif s is Score.NOISE:
        fit = noise_response(model, units, blocks_path, ids, config.noise, config.seed, progress=bar)
        value, stderr, probes = fit.alpha, fit.residual, len(units) * len(config.noise)
        rel = level_errors(model, units, db)["rel"]
        damage = {n: {lv: float(a * r) for lv, r in rel[n].items()} for n, a in zip(names, value, strict=True)}
    else:
        estimate = hutchinson_trace if s is Score.HUTCHINSON else fisher_trace
        params = unit_parameters(model, names)
        est = estimate(model, params, ids, config.tol, config.min_probes, config.max_probes, config.seed, bar,
                       slices=unit_slices(model, names))
        for p in params:
            p.requires_grad_(False)
        value, stderr, probes = est.trace / numel, est.stderr / numel, est.probes
        sq = level_errors(model, units, db)["sq"]
        damage = {n: {lv: float(0.5 * v * e) for lv, e in sq[n].items()} for n, v in zip(names, value, strict=True)}
    return Sensitivity(s.value, tuple(names), tuple(float(v) for v in value), tuple(float(v) for v in stderr),
                       int(probes), time.perf_counter() - t0, damage)


def cache_path(db: LevelsDB, config: SensitivityConfig) -> Path:
    return db.path / "sensitivity" / f"{config.key()}.json"


def load_cached(db: LevelsDB, config: SensitivityConfig) -> Sensitivity | None:
    path = cache_path(db, config)
    if not path.is_file():
        return None
    return Sensitivity.from_json(json.loads(path.read_text()))


def save_cached(db: LevelsDB, config: SensitivityConfig, sens: Sensitivity) -> Path:
    path = cache_path(db, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, sens.to_json())
    return path
