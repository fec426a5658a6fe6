"""The in-process evaluator: applies a plan by swapping dequantized weights into the base model
(by reference, no copies) and measures KL to the base model's next-token distribution and
perplexity on token windows. bf16 by default (2.5x faster than fp32 on this CPU; its KL noise
floor, ~1e-3, is far below the differences between 2-4 bit plans).

Prefix caching: the candidates of one batch (a searcher's offspring) mostly agree with one
anchor plan — the per-unit majority level, i.e. the parent. The anchor's input to every decoder
block is computed once per batch of windows; a candidate whose first differing unit sits in
block i runs only blocks i.. from the cached input. Same windows, same batching, same kernels:
the result is bit-identical to a full forward (tested in fp32).

The cache is memory-bounded (`prefix_cache_bytes`): when every block's input for every window batch
would not fit (a large model on long stages), only every k-th block's input is kept - checkpoints -
and a plan that leaves the anchor in block i resumes from the last checkpoint at or before i. The
blocks in between run with the plan's own weights, which equal the anchor's there: still bit-exact.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from planner.data.windows import Windows
from planner.errors import BadPlan
from planner.evaluate.kl import Reference, Scores, kl_and_nll, reference
from planner.levels.db import LevelsDB
from planner.moe.experts import ExpertSlices, expert_slice
from planner.plan import Plan
from planner.problem import Problem
from planner.search.base import Candidate, Result

Prefix = list[list[torch.Tensor]]   # per window batch, the input hidden states of every block


class InProcessEvaluator:
    def __init__(self, model: nn.Module, db: LevelsDB, problem: Problem, windows: Windows,
                 dtype: torch.dtype = torch.bfloat16, batch_windows: int = 4, ref_cache_bytes: float = 3e9,
                 prefix_cache: bool = True, kl_topk: int | None = None, prefix_cache_bytes: float = 2e9,
                 references=None):
        self.model = model.to(dtype)
        self.db, self.problem, self.windows, self.dtype = db, problem, windows, dtype
        self.batch_windows = batch_windows
        self.prefix_cache, self.kl_topk = prefix_cache, kl_topk
        self.prefix_cache_bytes = prefix_cache_bytes
        self._decoder = model.base_model
        slices = [u for u in problem.model_units if expert_slice(model, u) is not None]   # fused MoE experts
        self._modules = {u: model.get_submodule(u) for u in problem.model_units if u not in slices}
        self._experts = ExpertSlices(model, slices, lambda u, level: db.weight(u, level, dtype))
        self._base = {u: m.weight.data for u, m in self._modules.items()}
        self._blocks = np.asarray(problem.blocks if problem.blocks else np.zeros(problem.n_units, dtype=int))
        self._ref: OrderedDict[int, Reference] = OrderedDict()
        self._ref_cap = int(ref_cache_bytes)
        # references made elsewhere (planner/distributed/references.py): `get(window)` gives one or None,
        # `made(window, hidden)` sees the base model's final hidden states of each reference made here
        self.references = references
        self.evaluations = 0
        self.blocks_run = 0      # decoder blocks executed (x windows batches): what prefix caching saves
        self.on_scored = None    # optional callback after each plan is scored (progress bars)

    # --- plans -------------------------------------------------------------------------
    def apply(self, plan: Plan | None) -> None:
        """Swap in the plan's weights; units the plan does not name keep the base weights."""
        chosen = plan.as_dict() if plan else {}
        unknown = set(chosen) - set(self.problem.model_units)
        if unknown:
            raise BadPlan(f"plan names {len(unknown)} unit(s) this model/space lacks, e.g. {sorted(unknown)[0]!r}: "
                          "was it made for another model or search space?")
        for u, level in chosen.items():
            if level not in self.problem.levels[self.problem.unit_index(u)]:
                raise BadPlan(f"plan gives {u} the level {level!r}, which the search space lacks")
        for u, m in self._modules.items():
            level = chosen.get(u)
            m.weight.data = self.db.weight(u, level, self.dtype) if level else self._base[u]
        self._experts.apply(chosen)    # slices of 3-D expert tensors: only changed slices are copied

    # --- forward pieces ----------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return len(self._decoder.layers)

    def _batches(self, window_idx: np.ndarray) -> list[np.ndarray]:
        return [window_idx[s:s + self.batch_windows] for s in range(0, len(window_idx), self.batch_windows)]

    @contextmanager
    def _from_block(self, start: int, stop: int | None = None):
        """Temporarily drop blocks < start (the decoder then runs blocks start.. on inputs_embeds) and,
        with `stop`, blocks >= stop."""
        layers = self._decoder.layers
        if start or stop is not None:
            self._decoder.layers = nn.ModuleList(list(layers)[start:stop])
        try:
            yield
        finally:
            self._decoder.layers = layers

    def _hidden(self, idx: np.ndarray, start: int = 0, h: torch.Tensor | None = None,
                capture: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Final hidden states of windows `idx`, running blocks start.. (from `h` if start > 0);
        with `capture`, append every block's input hidden states to it."""
        hooks = []
        if capture is not None:
            hooks = [layer.register_forward_pre_hook(lambda _m, args: capture.append(args[0]))
                     for layer in self._decoder.layers]
        try:
            with self._from_block(start):
                if start:
                    out = self._decoder(inputs_embeds=h, use_cache=False)
                else:
                    out = self._decoder(self.windows.ids[idx], use_cache=False)
        finally:
            for hk in hooks:
                hk.remove()
        self.blocks_run += self.n_blocks - start
        return out.last_hidden_state

    def _window_scores(self, idx: np.ndarray, hidden: torch.Tensor) -> tuple[float, float]:
        """KL and NLL sums of one batch of windows, one window's logits at a time."""
        head = self.model.get_output_embeddings()
        kl = nll = 0.0
        for j, w in enumerate(idx):
            k, n = kl_and_nll(head(hidden[j]), self._ref[int(w)], self.windows.ids[int(w)])
            kl, nll = kl + k, nll + n
        return kl, nll

    def _scores(self, kl: float, nll: float, n_windows: int) -> Scores:
        T = self.windows.seqlen
        return Scores(kl=kl / (n_windows * T), nll=nll / (n_windows * (T - 1)), tokens=n_windows * T)

    @torch.no_grad()
    def _reference(self, window_idx: np.ndarray) -> None:
        shared = self.references
        for w in window_idx:
            if shared is not None and int(w) not in self._ref and (r := shared.get(int(w))) is not None:
                self._ref[int(w)] = r
        missing = np.array([w for w in window_idx if int(w) not in self._ref], dtype=np.int64)
        if len(missing):
            self.apply(None)
            head = self.model.get_output_embeddings()
            for idx in self._batches(missing):
                hidden = self._hidden(idx)
                for j, w in enumerate(idx):
                    self._ref[int(w)] = reference(head(hidden[j]), self.kl_topk)
                    if shared is not None:
                        shared.made(int(w), hidden[j])
        for w in window_idx:
            self._ref.move_to_end(int(w))
        per = next(iter(self._ref.values())).nbytes
        keep = max(len(window_idx), self._ref_cap // per)
        while len(self._ref) > keep:
            self._ref.popitem(last=False)

    # --- measurement -------------------------------------------------------------------
    @torch.no_grad()
    def score(self, plan: Plan | None, window_idx: np.ndarray) -> Scores:
        """One plan, full forward (no prefix cache): the reference path for everything else."""
        window_idx = np.asarray(window_idx)
        self._reference(window_idx)
        self.apply(plan)
        try:
            kl = nll = 0.0
            for idx in self._batches(window_idx):
                k, n = self._window_scores(idx, self._hidden(idx))
                kl, nll = kl + k, nll + n
        finally:
            self.apply(None)
        self._scored()
        return self._scores(kl, nll, len(window_idx))

    def _scored(self) -> None:
        self.evaluations += 1
        if self.on_scored is not None:
            self.on_scored()

    @torch.no_grad()
    def score_many(self, xs: list[tuple[int, ...]], window_idx: np.ndarray) -> list[Scores]:
        """Several plans (level vectors) on the same windows, sharing the anchor's block prefix."""
        window_idx = np.asarray(window_idx)
        if not self.prefix_cache or len(xs) < 2:
            return [self.score(self.problem.decode(x), window_idx) for x in xs]
        self._reference(window_idx)
        X = np.asarray(xs)
        anchor = np.array([np.bincount(col).argmax() for col in X.T])
        first = [int(self._blocks[d].min()) if (d := np.flatnonzero(x != anchor)).size else self.n_blocks for x in X]
        batches = self._batches(window_idx)
        prefix: Prefix = []
        # the anchor runs only up to the deepest block input a plan starts from: a chunk of plans
        # that all leave it early (a worker's share of EvoPress's first stage) pays a short pass
        last = max(min(f, self.n_blocks - 1) for f in first)
        every = self._checkpoint_stride(window_idx, last + 1)
        self.apply(self.problem.decode(anchor))
        try:
            for idx in batches:  # the anchor's block inputs, up to the last block anyone needs
                states: list[torch.Tensor] = []
                with self._from_block(0, last + 1):
                    self._hidden(idx, capture=states)
                prefix.append([h if i % every == 0 else None for i, h in enumerate(states)])
            out = []
            for x, start in zip(X, first, strict=True):
                self.apply(self.problem.decode(x))
                start = min(start, self.n_blocks - 1) // every * every   # the checkpoint at or before it
                kl = nll = 0.0
                for b, idx in enumerate(batches):
                    hidden = self._hidden(idx, start, prefix[b][start])
                    k, n = self._window_scores(idx, hidden)
                    kl, nll = kl + k, nll + n
                self._scored()
                out.append(self._scores(kl, nll, len(window_idx)))
        finally:
            self.apply(None)
        return out

    def _checkpoint_stride(self, window_idx: np.ndarray, n_states: int) -> int:
        """k: keep every k-th block input so all batches' kept inputs fit in prefix_cache_bytes."""
        hidden = self.model.config.hidden_size
        per_block = len(window_idx) * self.windows.seqlen * hidden * torch.finfo(self.dtype).bits // 8
        return max(1, -(-per_block * n_states // max(int(self.prefix_cache_bytes), 1)))

    def evaluate(self, candidates: list[Candidate]) -> list[Result]:
        """The executor interface: one Result per candidate, failures reported, never raised.
        Candidates sharing a fidelity are scored together (prefix cache)."""
        results: dict[int, Result] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(candidates):
            groups.setdefault((c.fidelity.tokens, c.fidelity.seed), []).append(i)
        for (tokens, seed), members in groups.items():
            windows = self.windows.draw(tokens, seed)
            try:
                scores = self.score_many([candidates[i].x for i in members], windows)
                results.update({i: Result(candidates[i], kl=s.kl, ppl=s.ppl) for i, s in zip(members, scores, strict=True)})
            except (RuntimeError, ValueError):  # one bad plan must not fail its siblings: retry one by one
                results.update({i: self._evaluate_one(candidates[i], windows) for i in members})
        return [results[i] for i in range(len(candidates))]

    def _evaluate_one(self, c: Candidate, windows: np.ndarray) -> Result:
        try:
            s = self.score(self.problem.decode(c.x), windows)
            return Result(c, kl=s.kl, ppl=s.ppl)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: the searcher decides
            return Result(c, error=f"{type(e).__name__}: {e}")
