"""Base-model references made once per cluster and shared through Ray's object store.

A window's reference (planner/evaluate/kl.py: the base model's next-token distribution) costs one
full forward of the base model. When several tasks score the same window (chunks of the candidates
of one fidelity group, e.g. EvoPress's first stage: 128 plans on one window, 32 chunks on 32
workers), one of them, the window's *producer*, makes it and publishes what it took; the others
fetch that and skip the base model's forward.

What is shipped: the base model's final hidden states of the window (T x hidden in the evaluation
dtype, as bytes: 16.8 MB for a 2048-token window of Llama-3-8B in bf16), from which a consumer
makes the reference with the head alone (lm_head + log-softmax, ~7% of a Llama-3-8B forward).
The same kernels on the same bits give the same reference, so results stay bit-identical
(tests/test_ray_dispatch.py, fp32 and bf16). Shipping the reference itself would skip the head but
is bigger: full-vocabulary float32 is T x vocab x 4 bytes (1.05 GB for Llama-3's 128k vocabulary,
100 MB for a 512-token window of the default model); only a top-K reference (`--kl-topk 256`:
T x 256 x 12 bytes, 6.3 MB) is smaller, and it saves 7% of a forward per consumer, not worth a
second mechanism.

Driver side (`ReferenceTable`): window -> handle (an ObjectRef on Ray), an LRU bounded in bytes;
evicting drops the driver's ref, and Ray frees the object once no task in flight holds it.
Worker side (`PendingReference`, `to_wire`, `from_wire`): a consumer's reference is fetched and
finished on first use, i.e. when its task's first KL needs it, so the task's own forwards (the
anchor pass, the first plan) overlap the producer's reference forward.

numpy only at import: the scheduling side and the simulation use the table without torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

import numpy as np


class ReferenceTable:
    """Which windows' hidden states exist somewhere in the cluster, and a handle to each."""

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self._handles: OrderedDict[Hashable, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._handles)

    def __contains__(self, window: Hashable) -> bool:
        """Published (or being made), and not evicted; unlike `known`, not a use."""
        return window in self._handles

    def known(self, windows: Iterable[Hashable]) -> dict[Hashable, object]:
        """The handles of those of `windows` that were published (and not evicted)."""
        out = {}
        for w in windows:
            if w in self._handles:
                self._handles.move_to_end(w)
                out[w] = self._handles[w]
        return out

    def roles(self, windows: Iterable[Hashable], publish: Iterable[Hashable]) -> tuple[dict[Hashable, object], list]:
        """For a task on `windows` that is to publish `publish`: the handles it fetches (every
        published window, this call's or an earlier one's), and the windows it must still make and
        publish (the caller `add`s their handles when it sends the task)."""
        shared = self.known(windows)
        return shared, [w for w in publish if w not in shared]

    def add(self, windows: Iterable[Hashable], handles: Iterable[object]) -> None:
        for w, h in zip(windows, handles, strict=True):
            self._handles[w] = h
            self._handles.move_to_end(w)
        while len(self._handles) > self.capacity:
            self._handles.popitem(last=False)

    def forget(self, windows: Iterable[Hashable], handles: Iterable[object]) -> None:
        """A producer died: its handles will never resolve, so later tasks make those references
        themselves (or a retried producer publishes them again)."""
        for w, h in zip(windows, handles, strict=True):
            if w in self._handles and self._handles[w] is h:
                del self._handles[w]


class PendingReference:
    """A reference another worker is making: `resolve()` runs on first use of any of the
    Reference's fields (p, p_log_p, index, tail); `nbytes` is known before, for the evaluator's
    reference LRU."""

    def __init__(self, resolve: Callable[[], object], nbytes: int):
        self._resolve, self.nbytes, self._ref = resolve, nbytes, None

    def __getattr__(self, name: str):
        if name.startswith("_"):            # not a Reference field (copy/pickle probes): never resolve
            raise AttributeError(name)
        if self._ref is None:
            self._ref, self._resolve = self._resolve(), None
        return getattr(self._ref, name)


def reference_nbytes(seqlen: int, vocab: int, topk: int | None) -> int:
    """A Reference's size (kl.Reference.nbytes) from its shape: p float32, plus int64 ids and a
    float32 tail with top-K."""
    if topk is None or topk >= vocab:
        return seqlen * vocab * 4
    return seqlen * topk * (4 + 8) + seqlen * 4


def to_wire(hidden) -> np.ndarray:
    """[T, hidden] states (any dtype: numpy has no bfloat16) as a uint8 array, for the object store."""
    import torch

    return hidden.detach().contiguous().cpu().view(torch.uint8).numpy()


def from_wire(data: np.ndarray, dtype, device):
    """to_wire's array back as a tensor of `dtype` on `device`; a writable copy (the object
    store's arrays are read-only)."""
    import torch

    return torch.from_numpy(np.array(data)).view(dtype).to(device)
