"""`mlcid build`: build MLCID shards from img2dataset shards on a Ray actor pool (`cluster.build_mlcid.build`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

HELP = ("build MLCID shards from img2dataset shards on a Ray actor pool (in this process, or joining RAY_ADDRESS); "
        "re-running resumes")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    from cli.pipeline_args import add_pipeline_arguments
    from cluster.pool_config import DEFAULT_RECYCLE_EVERY, PoolConfig

    p.description = ("Build MLCID shards from img2dataset shards on a Ray actor pool. Without RAY_ADDRESS/--address "
                     "Ray starts in this process; with it the run joins that cluster. Complete output shards are "
                     "skipped, so re-running resumes an interrupted build. Exit status: 0 every shard complete, 1 some "
                     "failed after their retries, 2 bad arguments or inputs.")
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
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
    g.add_argument("--max-in-flight", type=int, default=PoolConfig.max_in_flight, help="shards queued per actor")
    g.add_argument("--max-retries", type=int, default=PoolConfig.max_retries,
                   help="re-runs of a failed shard before it is reported")
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


def build_config(args: argparse.Namespace):
    """The parsed arguments → `cluster.build_mlcid.BuildConfig` (the only place that reads them)."""
    from cli.pipeline_args import fault_policy, pipeline_options
    from cluster.build_mlcid import BuildConfig, WorkerSpec
    from cluster.pool_config import PoolConfig
    from cluster.ray_env import RayEnvConfig

    return BuildConfig(
        shards=args.shards,
        out=args.out,
        pipeline=pipeline_options(args).to_config(),
        faults=fault_policy(args),
        workers=WorkerSpec(args.workers, args.cpus_per_worker, args.gpus_per_worker),
        pool=PoolConfig(max_in_flight=args.max_in_flight, max_retries=args.max_retries,
                        recycle_every=args.recycle_every, lease_ttl_s=args.lease_ttl),
        ray=RayEnvConfig(args.address, args.num_cpus, args.num_gpus, args.dashboard, args.dashboard_port,
                         args.ray_temp_dir),
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from cli.main import fail
    from cluster.build_mlcid import build
    from cluster.pool import PoolError
    from cluster.progress import format_summary

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = build(build_config(args))
    except (ValueError, TypeError, FileNotFoundError, PoolError) as e:  # bad settings or inputs, actors that
        return fail(args, e)  # cannot load their models
    print(format_summary(summary), flush=True)
    if args.summary_json:
        path = Path(args.summary_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary.to_dict(), indent=1))
        os.replace(tmp, path)
    return 1 if summary.shards_failed else 0
