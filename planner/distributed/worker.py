"""What runs inside one worker process (a Ray actor): its own model and in-process evaluator,
built once, scoring the tasks the driver sends. Plain Python; ray_executor.py wraps it in an actor.

The model is loaded from the folder the driver loaded (the cached safetensors conversion for the
default model; a shared filesystem on a multi-node cluster), the levels DB is opened from its
path (a folder of per-unit safetensors files). A task is a chunk of candidates on a run of window
batches; the worker scores one batch at a time and returns per-batch sums of KL and NLL, which the
driver folds in batch order (tasks.fold), exactly as the in-process evaluator does.
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from planner.data.windows import Windows
from planner.distributed.dispatch import Done
from planner.evaluate.evaluator import InProcessEvaluator
from planner.evaluate.kl import Scores
from planner.levels.db import LevelsDB
from planner.model.load import load_model
from planner.plan import Plan
from planner.problem import Problem

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class WorkerSpec:
    model: str                  # a local folder (shared storage on a cluster) or a hub id
    db_path: str
    windows: Windows
    dtype: str = "bf16"
    kl_topk: int | None = None
    threads: int = 1            # torch threads of a CPU worker: one per core it was given, never all cores
    trust_remote_code: bool = False
    cache_bytes: float | None = None   # dequantized levels kept (LRU); None: all on CPU, half the free memory on GPU


@dataclass(frozen=True)
class Work:
    """One task: `xs` (level vectors) on `batches` (window indices, one array per batch); with
    `xs` None, the single `plan` (None: the base model) instead."""

    xs: tuple[tuple[int, ...], ...] | None
    batches: tuple[np.ndarray, ...]
    plan: Plan | None = None


@dataclass(frozen=True)
class Output:
    sums: np.ndarray            # [batches, plans, 2]: KL and NLL sums; nan where a plan failed
    errors: dict[int, str]      # plan position -> error text


class _SumsEvaluator(InProcessEvaluator):
    """The in-process evaluator, reporting sums over windows instead of means (Scores.kl/.nll hold
    sums), so the driver can fold batches scored on different workers in the in-process order."""

    def _scores(self, kl: float, nll: float, n_windows: int) -> Scores:
        return Scores(kl=kl, nll=nll, tokens=n_windows * self.windows.seqlen)


class _DeviceDB:
    """A levels DB whose dequantized weights live on the worker's device in an LRU of `budget`
    bytes, none kept on the host: LevelsDB caches every level of every unit it reads (6 bf16
    levels: 12 bytes a weight, 84 GB for Llama-3-8B), which no GPU holds. A plan touches few units
    beyond its parent's, so the working set is small; a miss reads the unit's file and dequantizes
    just the level asked for."""

    def __init__(self, db: LevelsDB, device: torch.device, budget: float):
        self._db, self._device, self.budget = db, device, budget
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.nbytes = self.misses = 0

    def __getattr__(self, name):
        return getattr(self._db, name)

    def weight(self, unit: str, level: str, dtype: torch.dtype) -> torch.Tensor:
        key = (unit, level, dtype)
        if key not in self._cache:
            self.misses += 1
            w = self._db.load(unit, level).dequantize(dtype).to(self._device)
            self._cache[key] = w
            self.nbytes += w.numel() * w.element_size()
            while self.nbytes > self.budget and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self.nbytes -= old.numel() * old.element_size()
        self._cache.move_to_end(key)
        return self._cache[key]


class EvalWorker:
    def __init__(self, spec: WorkerSpec):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(spec.model, torch.float32, spec.trust_remote_code).model.to(self.device)
        db = LevelsDB(spec.db_path)
        budget = spec.cache_bytes
        if budget is None and self.device.type == "cuda":
            budget = 0.5 * torch.cuda.mem_get_info()[0]
        self.db = db if budget is None else _DeviceDB(db, self.device, budget)
        w = spec.windows     # ids arrive read-only from the object store: a private (device) copy
        self.windows = Windows(w.ids.to(self.device, copy=True), w.calib, w.heldout, w.pool)
        self._key: str | None = None
        self._ev: _SumsEvaluator | None = None

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": socket.gethostname(), "device": str(self.device),
                "threads": torch.get_num_threads()}

    def _evaluator(self, key: str, problem: Problem) -> _SumsEvaluator:
        if key != self._key:      # a new problem (budget, ties): the model and DB stay loaded
            self._ev = _SumsEvaluator(self.model, self.db, problem, self.windows, dtype=DTYPES[self.spec.dtype],
                                      kl_topk=self.spec.kl_topk)
            self._key = key
        return self._ev

    def run(self, key: str, problem: Problem, work: Work) -> Done:
        t0 = time.perf_counter()
        ev = self._evaluator(key, problem)
        n = 1 if work.xs is None else len(work.xs)
        sums = np.full((len(work.batches), n, 2), np.nan)
        errors: dict[int, str] = {}
        for b, idx in enumerate(work.batches):
            idx = np.array(idx)        # writable: arrays from the object store are read-only
            if work.xs is None:     # a single plan (held-out, `planner eval`): errors are the caller's
                s = ev.score(work.plan, idx)
                sums[b, 0] = s.kl, s.nll
                continue
            for i, s in enumerate(_score_many(ev, work.xs, idx, errors)):
                if s is not None:
                    sums[b, i] = s.kl, s.nll
        tokens = sum(len(idx) for idx in work.batches) * ev.windows.seqlen * n
        return Done(Output(sums, errors), time.perf_counter() - t0, tokens, os.getpid())


def _score_many(ev: InProcessEvaluator, xs, idx: np.ndarray, errors: dict[int, str]) -> list[Scores | None]:
    """score_many, and on failure one plan at a time: one bad plan must not fail its siblings
    (the in-process evaluator's rule, applied per batch)."""
    try:
        return ev.score_many(list(xs), idx)
    except (RuntimeError, ValueError):
        out: list[Scores | None] = []
        for i, x in enumerate(xs):
            try:
                out.append(ev.score(ev.problem.decode(x), idx))
            except (RuntimeError, ValueError) as e:     # e.g. out of memory: the searcher decides
                errors.setdefault(i, f"{type(e).__name__}: {e}")
                out.append(None)
        return out
