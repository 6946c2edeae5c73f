"""The Ray actor of the shard pool: owns one processor (models loaded once) and runs shards under their lease."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import ray

from mlcid.lease import Lease, LeaseConfig
from mlcid.storage import ShardStore


class Processor(Protocol):
    """What an actor holds: models loaded once by `setup()`, then `process(url, out_dir) -> stats` per shard."""

    def setup(self) -> Any: ...

    def process(self, input_url: str, out_dir: str) -> dict[str, Any]: ...


def limit_threads(threads: int) -> None:
    """Keep an actor's compute libraries (torch, OpenCV) within its CPU share."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass


@ray.remote(concurrency_groups={"monitor": 1})
class ShardActor:
    """Owns one processor (all models loaded once) and runs shards one at a time; `progress` answers meanwhile."""

    def __init__(self, make_processor: Callable[[], Processor], threads: int, lease: LeaseConfig) -> None:
        limit_threads(threads)
        self.lease = lease
        self.samples = 0
        self.processor = make_processor()
        self.processor.setup()
        params = inspect.signature(self.processor.process).parameters
        self.reports_progress = "on_progress" in params
        self.guards_publish = "before_publish" in params

    def ready(self) -> tuple[int, str]:
        """(pid, node ip) once `setup()` has finished."""
        return os.getpid(), ray.util.get_node_ip_address()

    def _count(self, n: int) -> None:
        self.samples += n

    def process(self, task: Any, out_dir: str) -> dict[str, Any]:
        """Run one shard (`task.key`, `task.url`: a `cluster.pool.ShardTask`) under its lease; its stats plus where
        and how long it ran."""
        lease = Lease(ShardStore(out_dir), task.key, self.lease)
        with lease as waited:
            t0, c0 = time.perf_counter(), time.process_time()
            kwargs: dict[str, Any] = {}
            if self.reports_progress:
                kwargs["on_progress"] = self._count
            if self.guards_publish:
                kwargs["before_publish"] = lease.check  # a holder that lost its lease never publishes
            stats = self.processor.process(task.url, out_dir, **kwargs)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"stats": stats, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "process_seconds": seconds, "cpu_seconds": cpu, "lease_seconds": waited}

    @ray.method(concurrency_group="monitor")
    def progress(self) -> int:
        """Samples this actor has pushed through its stages so far (all shards)."""
        return self.samples

    @ray.method(concurrency_group="monitor")
    def pid(self) -> int:
        return os.getpid()
