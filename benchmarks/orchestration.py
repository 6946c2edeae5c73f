"""Benchmark the Ray layer: throughput with 1 vs N actors and the framework overhead per sample (tiny presets).

    python -m benchmarks.orchestration --shards 32 --samples-per-shard 32 --workers 1 2 --repeats 2

Synthetic img2dataset shards go through the real `ShardProcessor` (tiny random-weight models) on the actor pool.
Actors are started and loaded first (`ShardPool.warm_up`), so the timed part is steady-state work only. Per run:
  - samples/s and speed-up over the first row;
  - stage s/sample: time inside the pipeline stages (the stats files' per-stage timings);
  - process s/sample: time inside `processor.process` on the actors (stages + decode + encode + files);
  - overhead ms/sample = (steady wall × workers − stage time) / samples: everything that is not a stage;
  - Ray ms/sample = (steady wall × workers − process time) / samples: what the pool itself adds;
  - CPU s/sample and CPU share = actor CPU time / (steady wall × workers): a share well below 1 means the actors
    waited for a core (other load on the machine), so the speed-up there says nothing about the framework;
  - control: just before each run, as many plain Python busy loops as actors run for 2 s; the cores they got
    together, and their ratio to the first row's, is the speed-up the machine itself allowed at that moment.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlcid.registry import tiny_root
from mlcid.synthetic import SceneConfig, write_dataset
from pipelines.config import STAGE_ORDER, PipelineConfig
from pipelines.runner import ShardProcessor

from cluster.pool import PoolConfig, ShardPool, ShardTask
from cluster.ray_env import RayEnvConfig, ray_session

log = logging.getLogger("benchmarks.orchestration")

PIPELINE_PRESETS = ("instructblip", "owlv2", "sam", "depth-saliency")  # tiny folders the tiny profile loads


@dataclass
class BenchRow:
    """One pool run."""

    workers: int
    shards: int
    samples: int
    startup_s: float  # actor start + model loading (not in the throughput)
    steady_s: float  # first shard handed out → last shard done
    samples_per_s: float
    speedup: float
    stage_s_per_sample: float
    process_s_per_sample: float
    overhead_ms_per_sample: float
    ray_ms_per_sample: float
    cpu_s_per_sample: float  # CPU time of the actors (all threads) per sample
    cpu_share: float  # actor CPU time / (steady wall × workers): < 1 means the actors waited for a core
    control_cores: float = 0.0  # cores that `workers` plain busy-loop processes got just before this run
    control_speedup: float = 1.0  # control_cores / the first row's: the speed-up the machine allowed then


_BUSY = ("import time\nt0, c0 = time.perf_counter(), time.process_time()\n"
         "while time.perf_counter() - t0 < {s}: pass\n"
         "print((time.process_time() - c0) / (time.perf_counter() - t0))")


def control_cores(n: int, seconds: float = 2.0) -> float:
    """Cores that `n` plain Python busy loops get together right now (other load on the machine shows here)."""
    procs = [subprocess.Popen([sys.executable, "-c", _BUSY.format(s=seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    return round(sum(float(p.communicate()[0]) for p in procs), 2)


def ensure_tiny_models() -> Path:
    """The tiny pipeline presets under `tiny_root()`, built there (random weights) if missing."""
    root = tiny_root()
    if not all((root / name).exists() for name in PIPELINE_PRESETS):
        from pipelines.tiny import build_tiny_models

        log.info("building tiny pipeline presets in %s", root)
        build_tiny_models(root)
    return root


def run_one(workers: int, tasks: list[ShardTask], out: Path, config: PipelineConfig) -> BenchRow:
    """Warm up `workers` actors (1 CPU each), then time the pool over every task."""
    shutil.rmtree(out, ignore_errors=True)
    pool = ShardPool(functools.partial(ShardProcessor, config), out,
                     PoolConfig(workers=workers, num_cpus=1.0, max_in_flight=2, recycle_every=0))
    startup = pool.warm_up()
    report = pool.run(tasks)
    if report.failed:
        raise RuntimeError(f"benchmark shards failed: {[o.errors for o in report.failed]}")
    steady = report.wall_seconds
    stats = [o.stats for o in report.outcomes]
    samples = sum(s["read"] for s in stats)
    stage = sum(v for s in stats for k, v in s["timings"].items() if k in STAGE_ORDER)
    process = sum(o.process_seconds for o in report.outcomes)
    cpu = sum(o.cpu_seconds for o in report.outcomes)
    rate = samples / steady
    return BenchRow(
        workers=workers, shards=len(tasks), samples=samples, startup_s=round(startup, 2), steady_s=round(steady, 2),
        samples_per_s=round(rate, 2), speedup=1.0,
        stage_s_per_sample=round(stage / samples, 4), process_s_per_sample=round(process / samples, 4),
        overhead_ms_per_sample=round(1000 * (steady * workers - stage) / samples, 1),
        ray_ms_per_sample=round(1000 * (steady * workers - process) / samples, 1),
        cpu_s_per_sample=round(cpu / samples, 4), cpu_share=round(cpu / (steady * workers), 2),
    )


def markdown(rows: list[BenchRow]) -> str:
    head = ("| workers | shards | samples | start-up s | steady s | samples/s | speed-up | stage s/sample | "
            "process s/sample | overhead ms/sample | Ray ms/sample | CPU s/sample | CPU share | "
            "control cores | control speed-up |")
    lines = [head, "|" + "---:|" * 15]
    for r in rows:
        lines.append(f"| {r.workers} | {r.shards} | {r.samples} | {r.startup_s} | {r.steady_s} | {r.samples_per_s} | "
                     f"{r.speedup}× | {r.stage_s_per_sample} | {r.process_s_per_sample} | "
                     f"{r.overhead_ms_per_sample} | {r.ray_ms_per_sample} | {r.cpu_s_per_sample} | {r.cpu_share} | "
                     f"{r.control_cores} | {r.control_speedup}× |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.orchestration", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", type=int, default=32, help="synthetic input shards")
    p.add_argument("--samples-per-shard", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="synthetic image side (px)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="actor counts to compare")
    p.add_argument("--repeats", type=int, default=2, help="runs per worker count (the best one is reported)")
    p.add_argument("--work-dir", default=".work/bench-orchestration", help="where shards and outputs go")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.work_dir).absolute()
    # 1. Tiny models and synthetic input shards.
    ensure_tiny_models()
    raw = work / "raw"
    shutil.rmtree(work, ignore_errors=True)
    write_dataset(raw, work / "gt", samples=args.shards * args.samples_per_shard, seed=0, shards=args.shards,
                  config=SceneConfig(size=args.size), progress=False)
    tasks = [ShardTask(f"mlcid-{i:06d}", str(raw / f"{i:05d}.tar")) for i in range(args.shards)]
    config = PipelineConfig.from_preset("tiny", max_side=max(8, args.size // 8 * 8))
    # 2. One in-process Ray sized for the largest run; each run gets 1 CPU per actor.
    #    Repeats alternate the worker counts and keep each count's best run (other load on the machine only
    #    ever slows a run down).
    best: dict[int, BenchRow] = {}
    with ray_session(RayEnvConfig(num_cpus=max(args.workers))):
        for rep in range(args.repeats):
            for n in args.workers:
                cores = control_cores(n)
                row = run_one(n, tasks, work / f"out-{n}", config)
                row.control_cores = cores
                print(f"repeat {rep + 1}/{args.repeats}, workers={n}: {row.samples_per_s} samples/s",
                      file=sys.stderr, flush=True)
                if n not in best or row.samples_per_s > best[n].samples_per_s:
                    best[n] = row
    rows = [best[n] for n in args.workers]
    for r in rows:
        r.speedup = round(r.samples_per_s / rows[0].samples_per_s, 2)
        r.control_speedup = round(r.control_cores / max(1e-9, rows[0].control_cores), 2)
    # 3. Report.
    cmd = "python -m benchmarks.orchestration " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"\n`{cmd.strip()}` ({time.strftime('%Y-%m-%d')}, tiny presets, {args.shards} shards × "
          f"{args.samples_per_shard} samples at {args.size}px, 1 CPU per actor, best of {args.repeats}, "
          f"{os.cpu_count()} cores)\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
