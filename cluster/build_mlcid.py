"""Build MLCID shards from img2dataset shards on a Ray actor pool (in-process Ray, or a cluster via RAY_ADDRESS).

    mlcid build --shards 'in/{00000..00099}.tar' --out mlcid/ --preset tiny --workers 2      (cli/build.py)

One actor per GPU (or per CPU slot) holds all models; shards are handed out dynamically; failed shards are
retried and then reported; actors are recycled every N shards. Output shard id = input shard id, and complete
shards (stats file present) are skipped, so re-running after a crash — or a SIGKILL at any moment — resumes and
ends with exactly the shards and keys of an uninterrupted run.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, replace

from mlcid.shards import expand_urls
from mlcid.storage import ShardStore
from mlcid.wids_index import index_folder
from mlcid.writer import stats_name
from pipelines.config import PipelineConfig
from pipelines.faults import FaultPolicy
from pipelines.inputs import plan_shard_ids
from pipelines.runner import ShardProcessor

from cluster.pool import PoolReport, ShardPool, ShardTask
from cluster.pool_config import PoolConfig
from cluster.progress import RunProgress, RunSummary, summarize
from cluster.ray_env import RayEnvConfig, ray_session

log = logging.getLogger("cluster.build_mlcid")


@dataclass
class WorkerSpec:
    """Requested actor resources; `None` fields are derived from the cluster's resources (`resolve_pool`)."""

    workers: int | None = None  # default: one per GPU, else one per CPU
    cpus_per_worker: float | None = None  # default: a GPU node's cores ÷ its GPUs; on CPU min(1, CPUs / workers)
    gpus_per_worker: float | None = None  # default: 1 if the cluster has GPUs, else 0


@dataclass
class BuildConfig:
    """One build run: inputs, output folder or fsspec URL, the per-shard pipeline, the pool policy, and Ray."""

    shards: list[str]
    out: str  # local/shared folder, or s3://… gs://… az://… (shards are built locally, then uploaded)
    pipeline: PipelineConfig
    faults: FaultPolicy = field(default_factory=FaultPolicy)
    workers: WorkerSpec = field(default_factory=WorkerSpec)
    pool: PoolConfig = field(default_factory=PoolConfig)  # resource fields are filled in by `resolve_pool`
    ray: RayEnvConfig = field(default_factory=RayEnvConfig)
    progress: bool = True


def plan_tasks(urls: list[str], out: str, prefix: str) -> tuple[list[ShardTask], list[str]]:
    """(tasks to run, urls already complete), from ONE listing of the output. Raises if two inputs share an id."""
    existing = ShardStore(out).names()
    tasks, complete = [], []
    for sid, url in plan_shard_ids(urls).items():
        if stats_name(sid, prefix) in existing:
            complete.append(url)
        else:
            tasks.append(ShardTask(f"{prefix}-{sid:06d}", url))
    return tasks, complete


def cpus_per_gpu(resources: dict[str, float], nodes: list[dict[str, float]] | None = None) -> float:
    """Whole CPUs each GPU can have on every GPU node: min over GPU nodes of cores ÷ GPUs (≥ 1); without a node
    list, the cluster's totals (a CPU-only head node would then count too)."""
    per_node = [n.get("CPU", 0.0) / n["GPU"] for n in nodes or [] if n.get("GPU", 0.0) > 0]
    if not per_node and resources.get("GPU", 0.0) > 0:
        per_node = [resources.get("CPU", 0.0) / resources["GPU"]]
    return max(1.0, float(int(min(per_node)))) if per_node else 1.0


def with_decode_threads(pipeline: PipelineConfig, num_cpus: float) -> PipelineConfig:
    """The pipeline with decode threads raised to the actor's CPUs less one (its main thread drives the GPU):
    decoding and the stages' `prepare` preprocessing run there, off the GPU's path."""
    threads = max(pipeline.decode_threads, int(num_cpus) - 1)
    return pipeline if threads == pipeline.decode_threads else replace(pipeline, decode_threads=threads)


def resolve_pool(spec: WorkerSpec, base: PoolConfig, resources: dict[str, float], strict: bool,
                 nodes: list[dict[str, float]] | None = None) -> PoolConfig:
    """Fill actor counts and sizes from the cluster's resources (`nodes`: each alive node's resources). A GPU actor
    gets its node's cores ÷ GPUs by default, so preprocessing, mask rules and writing never wait for a core.
    `strict` (in-process Ray): refuse what won't fit."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    num_gpus = spec.gpus_per_worker if spec.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    if num_gpus > 0:
        workers = spec.workers or max(1, int(gpus // num_gpus))
        num_cpus = spec.cpus_per_worker if spec.cpus_per_worker is not None else \
            max(1.0, float(int(cpus_per_gpu(resources, nodes) * num_gpus)))
    else:
        workers = spec.workers or max(1, int(cpus))
        num_cpus = spec.cpus_per_worker if spec.cpus_per_worker is not None else min(1.0, cpus / workers)
    if strict and (workers * num_cpus > cpus + 1e-9 or workers * num_gpus > gpus + 1e-9):
        raise ValueError(f"{workers} worker(s) × ({num_cpus} CPU, {num_gpus} GPU) do not fit this Ray instance "
                         f"({cpus:g} CPU, {gpus:g} GPU); lower --workers/--cpus-per-worker or raise --num-cpus")
    if workers * num_gpus > gpus or workers * num_cpus > cpus:
        log.warning("%d worker(s) need more than the cluster has now (%g CPU, %g GPU); waiting for the autoscaler",
                    workers, cpus, gpus)
    return PoolConfig(**{**base.__dict__, "workers": workers, "num_cpus": num_cpus, "num_gpus": num_gpus})


def build(config: BuildConfig) -> RunSummary:
    """Run the whole build and return its summary (failed shards are listed there, not raised)."""
    t0 = time.perf_counter()
    # 1. Inputs → tasks; complete output shards (stats file listed) are skipped up front.
    store = ShardStore(config.out)
    out = store.local_dir() if store.local else store.url
    urls = expand_urls(config.shards)
    tasks, complete = plan_tasks(urls, out, config.pipeline.prefix)
    log.info("%d input shard(s): %d to build, %d already complete in %s", len(urls), len(tasks), len(complete), out)
    if not tasks:  # nothing to build: no need to start Ray
        return summarize(PoolReport(outcomes=[]), len(complete), 0, time.perf_counter() - t0)
    # 2. Ray (started here or joined) → actor sizes; 3. the pool with its progress line.
    with ray_session(config.ray) as resources:
        import ray  # cluster.pool imports it already; here only for the per-node resources

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        pool_cfg = resolve_pool(config.workers, config.pool, resources, strict=config.ray.resolved_address() is None,
                                nodes=nodes)
        log.info("pool: %d actor(s) × (%g CPU, %g GPU), ≤%d shard(s) in flight each, %d retries, recycle every %s",
                 pool_cfg.workers, pool_cfg.num_cpus, pool_cfg.num_gpus, pool_cfg.max_in_flight,
                 pool_cfg.max_retries, pool_cfg.recycle_every or "never")
        progress = RunProgress(len(tasks), skipped=len(complete), enabled=config.progress)
        try:
            pipeline = with_decode_threads(config.pipeline, pool_cfg.num_cpus)
            pool = ShardPool(functools.partial(ShardProcessor, pipeline, config.faults), out, pool_cfg, progress)
            report = pool.run(tasks)
        finally:
            progress.close()
    # 4. The wids index over every complete shard in `out`, then the totals.
    index_folder(out, config.pipeline.prefix)
    return summarize(report, len(complete), pool_cfg.workers, time.perf_counter() - t0)
