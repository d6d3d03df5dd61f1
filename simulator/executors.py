"""Executors for experiment replications beyond local processes: Dask distributed and Ray.

Where it sits: beside :mod:`simulator.experiment`, whose runner takes any ``concurrent.futures``
executor. Both libraries are optional (``pip install molo-hubs[dask]`` / ``[ray]``); each is imported
only when asked for.

- **Dask**: ``distributed.Client(address).get_executor()``, the library's own ``concurrent.futures``
  executor. The scheduler address comes from ``MOLO_DASK_SCHEDULER`` (a real cluster); unset, a
  ``LocalCluster`` of ``workers`` single-threaded worker processes is started and closed with it.
- **Ray**: ``ray.init(address=MOLO_RAY_ADDRESS or a local instance)``; each submitted call becomes a
  Ray task and its ``ObjectRef.future()`` (Ray's own ``concurrent.futures.Future``) is returned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from typing import Any

__all__ = ["RayExecutor", "dask_executor", "open_executor", "ray_executor"]


class MissingDependencyError(RuntimeError):
    """An optional executor's library is not installed."""


@contextmanager
def dask_executor(workers: int | None = None, address: str | None = None) -> Iterator[Executor]:
    """A Dask executor on the cluster at ``address`` (or ``MOLO_DASK_SCHEDULER``), else on a local
    cluster of ``workers`` processes with one thread each."""
    try:
        from distributed import Client, LocalCluster  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError("the Dask executor needs `pip install molo-hubs[dask]` (distributed)") from exc
    address = address or os.environ.get("MOLO_DASK_SCHEDULER")
    if address:
        with Client(address) as client:  # type: ignore[no-untyped-call]  # distributed is untyped
            yield client.get_executor()
        return
    with (
        LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        yield client.get_executor()


class RayExecutor(Executor):
    """``concurrent.futures.Executor`` over Ray tasks (one task per call)."""

    def __init__(self, num_cpus: int | None = None) -> None:
        import ray  # noqa: PLC0415

        self._ray = ray
        self._remote: dict[Callable[..., Any], Any] = {}
        self._num_cpus = num_cpus

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(num_cpus=1)(fn)
        future: Future[Any] = remote.remote(*args, **kwargs).future()
        return future


@contextmanager
def ray_executor(workers: int | None = None, address: str | None = None) -> Iterator[Executor]:
    """A Ray executor on the cluster at ``address`` (or ``MOLO_RAY_ADDRESS``), else on a local Ray
    instance with ``workers`` CPUs, shut down afterwards."""
    # Under `uv run`, Ray would start every worker through `uv run` again, with the working directory
    # packaged as a runtime environment: slow, and it re-syncs environments. The workers share this
    # interpreter's environment, so that is switched off (before Ray is imported: it reads it then).
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError("the Ray executor needs `pip install molo-hubs[ray]`") from exc
    address = address or os.environ.get("MOLO_RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        yield RayExecutor()
    finally:
        if started:
            ray.shutdown()


def open_executor(kind: str, workers: int | None = None) -> Any:
    """The context manager of executor ``kind`` (``dask`` or ``ray``)."""
    if kind == "dask":
        return dask_executor(workers)
    if kind == "ray":
        return ray_executor(workers)
    raise ValueError(f"unknown executor {kind!r}: local, dask or ray")
