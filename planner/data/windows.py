"""Token windows for calibration, search fitness and held-out evaluation, always disjoint.

The corpus is tokenized once and cut into non-overlapping windows of `seqlen` tokens. A seeded
permutation assigns windows to three pools: calibration (Hessians), held-out (final evaluation,
`planner eval`), and the search pool from which each fitness measurement draws its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from planner.errors import BadDataset


@dataclass(frozen=True)
class Windows:
    ids: torch.Tensor            # [n_windows, seqlen] int64
    calib: np.ndarray            # window indices for calibration
    heldout: np.ndarray          # window indices for held-out evaluation
    pool: np.ndarray             # window indices the search draws fitness batches from

    @property
    def seqlen(self) -> int:
        return int(self.ids.shape[1])

    def draw(self, tokens: int, seed: int) -> np.ndarray:
        """`tokens` worth of search-pool windows, chosen by `seed` (the fidelity's batch)."""
        n = max(1, -(-tokens // self.seqlen))
        if n > len(self.pool):
            raise BadDataset(f"a fidelity of {tokens} tokens needs {n} windows but the search pool has {len(self.pool)}: "
                             "use a larger dataset or fewer tokens per stage")
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(self.pool, size=n, replace=False))


def make_windows(token_ids: list[int] | torch.Tensor, seqlen: int, calib_tokens: int, eval_tokens: int,
                 seed: int, min_pool_windows: int = 4) -> Windows:
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    n = ids.numel() // seqlen
    n_calib = max(1, -(-calib_tokens // seqlen))
    n_eval = max(1, -(-eval_tokens // seqlen))
    if n < n_calib + n_eval + min_pool_windows:
        raise BadDataset(f"the dataset has {ids.numel()} tokens = {n} windows of {seqlen}, but calibration, "
                         f"held-out evaluation and the search pool need {n_calib}+{n_eval}+{min_pool_windows}: "
                         "lower --calib-tokens/--eval-tokens/--seqlen or use more text")
    windows = ids[: n * seqlen].view(n, seqlen)
    perm = np.random.default_rng(seed).permutation(n)
    return Windows(windows, np.sort(perm[:n_calib]), np.sort(perm[n_calib:n_calib + n_eval]),
                   np.sort(perm[n_calib + n_eval:]))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)
