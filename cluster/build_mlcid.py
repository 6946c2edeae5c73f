"""Build MLCID shards from img2dataset shards on a Ray actor pool (in-process Ray, or a cluster via RAY_ADDRESS).

    python -m cluster.build_mlcid --shards 'in/{00000..00099}.tar' --out mlcid/ --preset tiny --workers 2

One actor per GPU (or per CPU slot) holds all models; shards are handed out dynamically; failed shards are
retried and then reported; actors are recycled every N shards. Output shard id = input shard id, and complete
shards (stats file present) are skipped, so re-running after a crash — or a SIGKILL at any moment — resumes and
ends with exactly the shards and keys of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlcid.shards import expand_urls
from mlcid.storage import ShardStore
from mlcid.wids_index import index_folder
from mlcid.writer import stats_name
from pipelines.build import add_pipeline_arguments, fault_policy_from_args, pipeline_options_from_args
from pipelines.config import PipelineConfig
from pipelines.faults import FaultPolicy
from pipelines.inputs import plan_shard_ids
from pipelines.runner import ShardProcessor

from cluster.pool import PoolConfig, PoolError, PoolReport, ShardPool, ShardTask
from cluster.progress import RunProgress, RunSummary, format_summary, summarize
from cluster.ray_env import RayEnvConfig, ray_session

log = logging.getLogger("cluster.build_mlcid")

DEFAULT_RECYCLE_EVERY = 25  # shards per actor lifetime (a real shard is ~10k images)


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cluster.build_mlcid",
        description="Build MLCID shards from img2dataset shards on a Ray actor pool. Without RAY_ADDRESS/--address "
        "Ray starts in this process; with it the run joins that cluster. Complete output shards are skipped, so "
        "re-running resumes an interrupted build.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--shards", required=True, nargs="+",
                   help="input shards: paths, brace patterns ('in/{00000..00099}.tar'), folders or fsspec URLs")
    g.add_argument("--out", required=True, help="output: a folder every node sees, or an fsspec URL "
                   "(s3://bucket/prefix, gs://…, az://…; credentials and endpoint from the standard environment)")
    add_pipeline_arguments(p.add_argument_group("pipeline"))
    g = p.add_argument_group("workers")
    g.add_argument("--workers", type=int, help="actors (default: one per GPU, else one per CPU)")
    g.add_argument("--cpus-per-worker", type=float, help="logical CPUs per actor; fractions allowed "
                   "(default: 1 on GPU, else min(1, CPUs/workers))")
    g.add_argument("--gpus-per-worker", type=float, help="GPUs per actor (default: 1 if the cluster has GPUs)")
    g.add_argument("--max-in-flight", type=int, default=2, help="shards queued per actor")
    g.add_argument("--max-retries", type=int, default=2, help="re-runs of a failed shard before it is reported")
    g.add_argument("--recycle-every", type=int, default=DEFAULT_RECYCLE_EVERY,
                   help="restart an actor after this many shards (0 = never)")
    g.add_argument("--lease-ttl", type=float, default=PoolConfig.lease_ttl_s,
                   help="seconds after which the lease of a shard whose worker stopped renewing it may be taken")
    g = p.add_argument_group("ray")
    g.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS; none → start Ray here)")
    g.add_argument("--num-cpus", type=float, help="CPUs of an in-process Ray (default: all cores)")
    g.add_argument("--num-gpus", type=int, help="GPUs of an in-process Ray (default: detected)")
    g.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (in-process Ray)")
    g.add_argument("--dashboard-port", type=int, default=8265)
    g.add_argument("--ray-temp-dir", help="in-process Ray's temp dir (default: $RAY_TMPDIR or .work/ray)")
    g = p.add_argument_group("output")
    g.add_argument("--summary-json", help="also write the run summary to this JSON file")
    g.add_argument("--no-progress", action="store_true", help="no live progress line")
    g.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING…)")
    return p.parse_args(argv)


def config_from_cli(args: argparse.Namespace) -> BuildConfig:
    """CLI namespace → `BuildConfig` (the only place that reads argparse values)."""
    return BuildConfig(
        shards=args.shards,
        out=args.out,
        pipeline=pipeline_options_from_args(args).to_config(),
        faults=fault_policy_from_args(args),
        workers=WorkerSpec(args.workers, args.cpus_per_worker, args.gpus_per_worker),
        pool=PoolConfig(max_in_flight=args.max_in_flight, max_retries=args.max_retries,
                        recycle_every=args.recycle_every, lease_ttl_s=args.lease_ttl),
        ray=RayEnvConfig(args.address, args.num_cpus, args.num_gpus, args.dashboard, args.dashboard_port,
                         args.ray_temp_dir),
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when every shard is complete, 1 when some failed after their retries."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_cli(args)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from e
    try:
        summary = build(config)
    except (ValueError, FileNotFoundError, PoolError) as e:  # bad inputs, or actors that cannot load models
        raise SystemExit(f"error: {e}") from e
    print(format_summary(summary), flush=True)
    if args.summary_json:
        path = Path(args.summary_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary.to_dict(), indent=1))
        os.replace(tmp, path)
    return 1 if summary.shards_failed else 0


if __name__ == "__main__":
    sys.exit(main())
