"""A Ray connection and the evaluation actors of one session.

    cluster = Cluster(ClusterSpec(workers=2))            # starts a local Ray with 2 CPUs
    cluster = Cluster(ClusterSpec(address="auto"))       # joins a running cluster
    ev = cluster.executor(session, problem)              # RayExecutor: evaluate(candidates) -> results

One actor per device: `num_gpus=1` each (or a fraction, `gpus=0.25`, to pack small models four to
a GPU) when the cluster has GPUs, else CPU actors of `threads` torch threads each (one by default:
workers never each take all cores). Actors restart after a crash (`max_restarts`) and rebuild
their evaluator; the dispatcher re-sends the lost task.

Ray's runtime is process-global, so the clusters this process opened are kept in a module-level
set for `shutdown()` (the CLI calls it on exit). A Ray that was already initialized (a test
fixture, a notebook) is used as it is and left running.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from planner.distributed.dispatch import Dispatcher
from planner.errors import PlannerError

log = logging.getLogger(__name__)

_OPEN: set = set()      # strong references: a session may be gone before shutdown() runs


@dataclass(frozen=True)
class ClusterSpec:
    workers: int | None = None     # actors; a local Ray gets workers * threads CPUs. None: fill the cluster
    address: str | None = None     # None: start a local Ray; "auto" or HOST:PORT: join a running cluster
    threads: int = 1               # torch threads per CPU worker
    gpus: float | None = None      # GPUs per worker; None: 1 when the cluster has GPUs, else CPU workers
    max_restarts: int = 2          # per actor, after a crash
    max_attempts: int = 3          # per task, across worker deaths
    cache_bytes: float | None = None   # dequantized levels a worker keeps (LRU); None: all (CPU), half the GPU
    # tasks on whole window batches only: for kernels whose numbers depend on the batch a window is
    # in (results stay bit-identical to in-process there); costs efficiency at 16+ workers
    whole_batches: bool = False
    # base-model hidden states kept in the object store to share references (the driver's LRU of
    # ObjectRefs, in bytes: 2 GB is ~120 windows of 2048 tokens of Llama-3-8B in bf16); 0: every
    # task makes the references of its windows itself
    reference_bytes: float = 2e9
    # workers idle in a batch's tail make the references of the batches the searcher announced next
    # (EvoPress's next stages), which then start with them made; off: each batch makes its own
    prefetch: bool = True
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1 or self.threads < 1:
            raise PlannerError(f"--workers and threads per worker must be >= 1, got {self.workers}, {self.threads}")


def _ray():
    try:
        import ray
    except ImportError:
        raise PlannerError("--workers/--ray-address need Ray: pip install 'planner[ray]'") from None
    return ray


class Cluster:
    def __init__(self, spec: ClusterSpec):
        ray = _ray()
        self.spec, self.owned = spec, not ray.is_initialized()
        if self.owned:
            kw = {"logging_level": logging.WARNING, "include_dashboard": False}
            if spec.address:
                ray.init(address=spec.address, logging_level=logging.WARNING)
            else:   # "local": never attach to someone else's `ray start` on this machine by accident
                ray.init(address="local", num_cpus=(spec.workers or 1) * spec.threads, dashboard_port=free_port(), **kw)
        res = ray.cluster_resources()
        self.gpus = spec.gpus if spec.gpus is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
        self.size = spec.workers or max(1, int(res.get("GPU", 0) / self.gpus if self.gpus else
                                               res.get("CPU", 1) // spec.threads))
        self.dispatcher = Dispatcher(self.size, spec.max_restarts, spec.max_attempts)
        self.actors: list = []
        self._worker_spec = None
        _OPEN.add(self)

    def start(self, worker_spec) -> list:
        """The actors for `worker_spec` (planner.distributed.worker.WorkerSpec), started once."""
        if self.actors and worker_spec == self._worker_spec:
            return self.actors
        self.release()
        ray = _ray()
        from planner.distributed.worker import EvalWorker

        cls = ray.remote(EvalWorker).options(num_cpus=self.spec.threads, num_gpus=self.gpus,
                                             max_restarts=self.spec.max_restarts, max_task_retries=0)
        self._spec_ref = ray.put(worker_spec)       # kept alive here: a restarting actor reads it again
        self.actors = [cls.remote(self._spec_ref) for _ in range(self.size)]
        self._worker_spec = worker_spec
        try:
            infos = ray.get([a.info.remote() for a in self.actors], timeout=self.spec.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.release()
            raise PlannerError(f"{self.size} workers did not start within {self.spec.start_timeout_s:.0f} s: the cluster "
                               f"has {ray.cluster_resources()}; ask for fewer --workers") from None
        except ray.exceptions.RayActorError as e:
            self.release()
            raise PlannerError(f"a worker failed to start ({_first_line(e)}): are the model folder and the levels "
                               "DB on storage every node can read?") from None
        for stats, info in zip(self.dispatcher.stats, infos, strict=True):
            stats.pid, stats.node, stats.device = info["pid"], info["node"], info["device"]
        log.info("started %d workers: %s", self.size, infos)
        return self.actors

    def executor(self, session, problem):
        from planner.distributed.ray_executor import RayExecutor

        return RayExecutor(self, session, problem)

    def pids(self, timeout_s: float = 120.0) -> list[int]:
        """Current process id of every actor (a restarted actor has a new one; one that is still
        restarting is waited for)."""
        ray, t0 = _ray(), time.monotonic()
        while True:
            try:
                return [i["pid"] for i in ray.get([a.info.remote() for a in self.actors])]
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() - t0 > timeout_s:
                    raise
                time.sleep(0.5)

    def release(self) -> None:
        """Stop the actors (they hold the cluster's CPUs/GPUs); `start` makes new ones."""
        ray = _ray()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def close(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            self.release()
            if self.owned:
                ray.shutdown()
        _OPEN.discard(self)


def shutdown() -> None:
    """Close every cluster this process opened (actors killed; a Ray started here shut down)."""
    for c in list(_OPEN):
        c.close()


def free_port() -> int:
    """A free local port for the (minimal) dashboard head: two Rays on one machine must not share one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(e).__name__
