"""Loader throughput vs trainer consumption: does the MLCID data loader keep the LayerDiff trainer fed?

    python -m benchmarks.loader [--data SHARDS] [--resolution 256] [--loader-workers 0 1 2] [--batches 20]
                                 [--preset tiny] [--steps 5]

Three numbers, all in samples/s on this machine:
  decode   MLCIDReader alone (tar read + PNG/JPEG decode + validation): also the cost of the resume skip
  loader   `model.training.data.build_loader` batches (decode + shared crop/resize + tensors + collate), per worker count
  trainer  optimiser steps of the Trainer (frozen VAE/CLIP encoding + UNet forward/backward + AdamW) on batches
           already in memory, i.e. what the model consumes when data is free
Without --data it writes synthetic MLCID shards (`mlcid.synthetic`) into a temp folder first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlcid.reader import MLCIDReader
from mlcid.registry import PRESETS
from model.training.config import CONFIG_DIR, DataConfig, load_config
from model.training.data import build_loader

log = logging.getLogger(__name__)


def synthetic_shards(folder: Path, samples: int, size: int, shards: int = 4) -> str:
    from mlcid.synthetic import SceneConfig, write_dataset

    write_dataset(folder / "raw", folder / "mlcid", samples=samples, shards=shards, config=SceneConfig(size=size),
                  progress=False)
    return str(folder / "mlcid")


def bench_decode(data: str, samples: int) -> float:
    reader = MLCIDReader(data, resample=True)
    it = iter(reader)
    next(it)
    start = time.perf_counter()
    for _ in range(samples):
        next(it)
    return samples / (time.perf_counter() - start)


def bench_loader(data: str, config: DataConfig, batch_size: int, batches: int) -> float:
    it = iter(build_loader(data, config, batch_size))
    next(it)  # worker start-up and the first batch are not throughput
    start = time.perf_counter()
    n = sum(len(next(it)) for _ in range(batches))
    return n / (time.perf_counter() - start)


def bench_trainer(data: str, config_path: str | None, overrides: list[str], steps: int, out: Path) -> tuple[float, int]:
    """Samples/s of optimiser steps on in-memory batches; returns (samples/s, parameters)."""
    from model.training.trainer import Trainer

    config = load_config(config_path, overrides)
    trainer = Trainer(config, data, out).setup()
    cached = [next(trainer.batches) for _ in range(config.grad_accum * 2)]
    trainer.batches = itertools.cycle(cached)
    trainer._optimizer_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer._optimizer_step()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in trainer.unet.parameters())
    trainer.close()
    return steps * config.batch_size * config.grad_accum / seconds, params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", help="MLCID shards (default: synthetic shards written to a temp folder)")
    p.add_argument("--samples", type=int, default=96, help="synthetic samples to write when --data is absent")
    p.add_argument("--size", type=int, default=384, help="synthetic image side when --data is absent")
    p.add_argument("--resolution", type=int, default=256, help="training crop side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=12, help="batches timed per loader setting")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default=None, help="trainer YAML (default model/configs/tiny.yaml)")
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--steps", type=int, default=4, help="timed optimiser steps of the trainer (0 = skip)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of this process")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp = Path(tmp)
        data = args.data or synthetic_shards(tmp / "data", args.samples, args.size)
        results: dict[str, object] = {"resolution": args.resolution, "batch_size": args.batch_size,
                                      "threads": torch.get_num_threads()}
        results["decode_samples_per_s"] = round(bench_decode(data, args.batches * args.batch_size), 1)
        for w in args.loader_workers:
            cfg = DataConfig(resolution=args.resolution, num_workers=w, shuffle_buffer=16, block_size=10_000)
            results[f"loader_w{w}_samples_per_s"] = round(bench_loader(data, cfg, args.batch_size, args.batches), 1)
        if args.steps:
            config = args.config or str(CONFIG_DIR / "tiny.yaml")
            overrides = [f"preset={args.preset}", f"data.resolution={args.resolution}", "grad_accum=1",
                         f"batch_size={args.batch_size}", "data.num_workers=0", "checkpoint_every=1000000"]
            sps, params = bench_trainer(data, config, overrides, args.steps, tmp / "run")
            results["trainer_samples_per_s"] = round(sps, 1)
            results["trainer_parameters"] = params

    print(f"| measure (res {args.resolution}, batch {args.batch_size}) | samples/s |\n|---|---|")
    for key, value in results.items():
        if key.endswith("_samples_per_s"):
            print(f"| {key.removesuffix('_samples_per_s')} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
