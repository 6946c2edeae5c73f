"""`layerdiff train --data SHARDS --out RUN [--workers N]`: train LayerDiff in this process (`Trainer`), or in N
DDP workers through Ray Train (`cluster.train.launch`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mlcid.registry import PRESETS

HELP = ("train LayerDiff on MLCID shards (paper recipe by default), here or in --workers N through Ray Train; exit "
        "0 done, 2 bad input or checkpoint, 3 diverged (NaN), 130 interrupted (Ctrl-C: checkpoint written)")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.description = ("Train LayerDiff on MLCID shards (paper recipe by default) in this process, or with --workers N "
                     "in N DDP workers through Ray Train (in-process Ray unless RAY_ADDRESS names a cluster; a lost "
                     "worker restarts the group from the newest checkpoint). The data is checked "
                     "before step 1. Exit codes: 0 done, 2 bad input/checkpoint, 3 diverged (NaN), 130 interrupted "
                     "(Ctrl-C, checkpoint written).")
    p.add_argument("--data", required=True, help="MLCID shards: brace pattern, folder, space-separated list or URLs")
    p.add_argument("--out", required=True, help="run folder: a path or an fsspec URL such as s3://bucket/runs/x")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default model/configs/layerdiff_sd15.yaml)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", help="SD 1.x hub id or local pipeline folder to start from")
    src.add_argument("--preset", choices=PRESETS, help="registry preset for sd15 (tiny = offline test model)")
    p.add_argument("--max-steps", type=int, help="optimiser steps (overrides the config)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out from its newest complete checkpoint (or from CHECKPOINT)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable, e.g. --set data.resolution=64 --set batch_size=4")
    p.add_argument("-v", "--verbose", action="store_true")
    g = p.add_argument_group("Ray Train (with --workers)")
    g.add_argument("--workers", type=int, help="DDP training processes through Ray Train (default: none, train here)")
    g.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    g.add_argument("--max-failures", type=int, default=None,
                   help="worker-group restarts after a lost worker (default 3 when joining a cluster via RAY_ADDRESS, "
                   "else 0)")


def train_config(args: argparse.Namespace):
    """The parsed arguments → `TrainConfig` (the YAML, then --set overrides, then the dedicated flags)."""
    from model.training.config import load_config

    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.pretrained:
        overrides.append(f"pretrained={json.dumps(args.pretrained)}")
    if args.preset:
        overrides.append(f"preset={args.preset}")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from cli.main import fail
    from model.training.outcome import run_with_exit_codes

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers is None and (args.gpu or args.max_failures is not None):
        return fail(args, "--gpu and --max-failures go with --workers N (Ray Train)")

    def train() -> None:
        if args.workers is None:
            from model.training.trainer import Trainer

            Trainer(train_config(args), args.data, args.out, resume=args.resume).setup().train()
            return
        from cluster.train import LaunchConfig, launch

        launch(train_config(args), args.data, args.out,
               LaunchConfig(workers=args.workers, use_gpu=args.gpu, max_failures=args.max_failures), args.resume)

    return run_with_exit_codes(train, args.out, args.prog, args.argv)
