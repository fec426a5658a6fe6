"""Evaluation and levels building on a pool of workers (Ray actors): `--workers N` starts a local
Ray, `--ray-address auto|HOST:PORT` joins a cluster. The in-process evaluator stays the default.

    cluster = Cluster(ClusterSpec(workers=2))
    session = prepare(model_data, space, cluster=cluster)    # levels DB built across the workers
    ev = session.evaluator(problem)                          # a RayExecutor: evaluate(candidates)

Importing this package does not import Ray (or torch): the CLI calls `shutdown()` on every exit.
"""

from planner.distributed.cluster import Cluster, ClusterSpec, shutdown

__all__ = ["Cluster", "ClusterSpec", "shutdown"]
