"""The actor pool's policy (resources, hand-out, retries, recycling, leases) as a plain dataclass; no Ray import."""

from __future__ import annotations

from dataclasses import dataclass

from mlcid.lease import LeaseConfig

DEFAULT_RECYCLE_EVERY = 25  # shards per actor lifetime for a build (a real shard is ~10k images)


@dataclass
class PoolConfig:
    """Actor resources and the hand-out / retry / recycling policy."""

    workers: int = 1  # actors alive at once
    num_cpus: float = 1.0  # logical CPUs per actor (fractions allowed)
    num_gpus: float = 0.0  # GPUs per actor (1 on GPU nodes: one actor per GPU)
    max_in_flight: int = 2  # shards queued per actor (one running + the next one)
    max_retries: int = 2  # re-runs of a shard whose task failed or whose actor died while running it
    recycle_every: int = 0  # kill and restart an actor after this many shards (0 = never)
    max_startup_failures: int = 3  # actors dying during setup in a row before the pool gives up
    torch_threads: int | None = None  # torch intra-op threads per actor (default: max(1, int(num_cpus)))
    lease_ttl_s: float = 300.0  # a shard's lease expires this long after its holder stopped renewing it
    lease_wait_s: float = 7200.0  # how long a shard waits for a lease held by a live stale worker
    poll_seconds: float = 1.0  # how often live sample counts are polled from the actors
    startup_timeout_s: float = 1800.0  # give up if no actor is ready by then (e.g. no node has the resources)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {self.workers}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_cpus + self.num_gpus <= 0:
            raise ValueError(f"an actor needs CPUs or GPUs: num_cpus={self.num_cpus}, num_gpus={self.num_gpus}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be ≥ 1, got {self.max_in_flight}")
        if self.max_retries < 0 or self.recycle_every < 0 or self.max_startup_failures < 1:
            raise ValueError("max_retries and recycle_every must be ≥ 0 and max_startup_failures ≥ 1")

    @property
    def lease(self) -> LeaseConfig:
        return LeaseConfig(ttl_s=self.lease_ttl_s, wait_s=self.lease_wait_s)

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))
