"""Where a flow's tasks run: threads in the flow's process (the default), or a Dask cluster (prefect-dask).

``task_runner(spec)``:

- ``None`` / ``"threads"``: the flow's own runner;
- ``"dask"``: a ``LocalCluster`` of ``workers`` processes with one thread each (each task's torch uses the
  worker's cores; processes also keep the imports of parallel tasks apart);
- ``"tcp://HOST:PORT"``: an existing Dask scheduler (a ``dask-jobqueue`` SLURM/PBS cluster, a Kubernetes
  ``dask-kubernetes`` cluster: docs/flows.md).

GPU-bound work on a shared cluster: start the Dask workers with ``--resources GPU=1`` and give the flow
``task_runner_resources={"GPU": 1}`` (each task then holds one GPU), or guard the deployment with a Prefect
concurrency limit (docs/flows.md).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["task_runner"]


def task_runner(
    spec: str | None, *, workers: int | None = None, resources: dict[str, float] | None = None
) -> Any:
    """A Prefect task runner for ``spec`` (see the module docstring), or None for the flow's default."""
    if spec in (None, "", "threads"):
        return None
    from prefect_dask import DaskTaskRunner

    if spec == "dask":
        n = workers or max(1, min(4, os.cpu_count() or 1))
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
                            **({"resources": resources} if resources else {})},
        )  # fmt: skip
    if spec.startswith(("tcp://", "tls://")):
        return DaskTaskRunner(address=spec)
    raise ValueError(
        f"task runner must be 'threads', 'dask' or a Dask scheduler address tcp://HOST:PORT; got {spec!r}"
    )
