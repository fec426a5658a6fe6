"""The levels database built across workers: each worker quantizes the units of a contiguous range
of decoder blocks into the same DB folder; the driver then writes the manifest.

The DB's per-unit files are written atomically (temp file + rename) and its key is a content hash
of model, calibration tokens and space, so the result is the same folder a serial build writes,
interchangeable with it, and a build killed anywhere resumes (only missing units are redone).
Each worker loads the model from its folder (shared storage on a multi-node cluster), collects the
GPTQ Hessians of its own units in one calibration pass that stops after its last block (no later
blocks, no lm_head), and quantizes them. Numerics equal a serial build at the same thread count.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from planner.levels.db import LevelsDB, _build_unit, _by_builder, build_levels, levels_key, write_unit
from planner.levels.hessian import collect_hessians
from planner.levels.registry import BUILDERS
from planner.model.load import cache_root, load_model
from planner.space import SearchSpace
from planner.units import Unit


class _Prefix(nn.Module):
    """The decoder's blocks < stop, without the head: a calibration pass for the units there.
    Module names resolve against the whole model, as `collect_hessians` expects."""

    def __init__(self, lm: nn.Module, stop: int):
        super().__init__()
        self.lm, self.stop = lm, stop

    def get_submodule(self, target: str) -> nn.Module:
        return self.lm.get_submodule(target)

    def forward(self, ids: torch.Tensor, use_cache: bool = False):
        decoder = self.lm.base_model
        layers = decoder.layers
        decoder.layers = nn.ModuleList(list(layers)[:self.stop])
        try:
            return decoder(ids, use_cache=use_cache)
        finally:
            decoder.layers = layers


def quantize_units(model_src: str, units: list[Unit], space: SearchSpace, calib_ids: torch.Tensor, path: str,
                   threads: int = 1, trust_remote_code: bool = False) -> tuple[list[str], float]:
    """Worker side: quantize `units` at every level of `space` into `path`/units/ (the serial
    builder's per-unit step, on this worker's share)."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # GPU path written to spec, not run here
    model = load_model(model_src, torch.float32, trust_remote_code).model.to(device)
    hessians: dict[str, torch.Tensor] = {}
    if any(BUILDERS[b].needs_hessian for b in _by_builder(space)):
        hessians = collect_hessians(_Prefix(model, max(u.block for u in units) + 1), units, calib_ids.to(device))
    for u in units:
        W = model.get_submodule(u.name).weight.detach().float()
        write_unit(Path(path), u, _build_unit(W, hessians.get(u.group), space, u))   # safetensors copies to host
    return [u.name for u in units], time.perf_counter() - t0


def by_blocks(units: list[Unit], parts: int) -> list[list[Unit]]:
    """Contiguous block ranges with about equal weight counts (a worker's calibration pass stops
    after its last block, so contiguous ranges also keep those passes short)."""
    total, out, acc = sum(u.numel for u in units), [[]], 0
    blocks = sorted({u.block for u in units})
    per_block = {b: [u for u in units if u.block == b] for b in blocks}
    for b in blocks:
        share = sum(u.numel for u in per_block[b])
        if out[-1] and acc + share / 2 > total * len(out) / parts and len(out) < parts:
            out.append([])
        out[-1] += per_block[b]
        acc += share
    return out


def build_levels_distributed(cluster, model_src: str, model: nn.Module, units: list[Unit], space: SearchSpace,
                             calib_ids: torch.Tensor, model_fingerprint: str, root: Path | None = None,
                             progress_factory=None, trust_remote_code: bool = False) -> LevelsDB:
    """`build_levels`, with the missing units quantized on the cluster's workers first."""
    import ray

    path = (root or cache_root() / "levels") / levels_key(model_fingerprint, calib_ids, space)
    todo = [u for u in units if not (path / "units" / f"{u.name}.safetensors").is_file()]
    if todo and not space.sequential:   # sequential spaces quantize block after block: serial only
        cluster.release()      # evaluation actors would hold the CPUs/GPUs these tasks need
        (path / "units").mkdir(parents=True, exist_ok=True)
        task = ray.remote(quantize_units).options(num_cpus=cluster.spec.threads, num_gpus=cluster.gpus, max_retries=3)
        calib = ray.put(calib_ids)
        refs = {task.remote(model_src, part, space, calib, str(path), cluster.spec.threads,
                            trust_remote_code): len(part) for part in by_blocks(todo, cluster.size)}
        bar = progress_factory(total=len(units), desc=f"levels (units, {len(refs)} workers)",
                               initial=len(units) - len(todo)) if progress_factory else None
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready[0])              # a worker's error ends the build here, files so far kept
            if bar is not None:
                bar.update(refs[ready[0]])
        if bar is not None:
            bar.close()
    # every unit file is there now: the serial builder only checks them and writes the manifest
    return build_levels(model, units, space, calib_ids, model_fingerprint, root, progress_factory)
