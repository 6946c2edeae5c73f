"""`layerdiff learn-bench --out DIR`: does LayerDiff learn? The staged benchmark of `benchmarks.learn_bench`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = ("does LayerDiff learn? synthetic data → small VAE → LayerDiff from scratch → sampling → layer-fidelity "
        "metrics, in resumable stages (~45 min on 2 CPU cores; --smoke: seconds)")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.description = HELP[0].upper() + HELP[1:] + "."
    p.epilog = ("Stages: data, vae, text, sd, train, sample-*, report. Delete OUT/<stage>.done.json (and its outputs) "
                "to redo a stage.")
    p.add_argument("--out", type=Path, required=True, help="work folder (data, vae, sd, run, samples, results)")
    p.add_argument("--smoke", action="store_true", help="seconds-long sizes (tests)")
    p.add_argument("--ship", action="store_true", help="the shipped model's variant (BenchConfig.ship: flat shapes, "
                   "plain backgrounds, 64/64-channel UNet, no sweep); its results JSON stays in OUT")
    p.add_argument("--train-steps", type=int, help="trainer steps (default: the YAML's max_steps)")
    p.add_argument("--per-group", type=int, help="test prompts per group")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--sweep-per-group", type=int, help="prompts per group of the SMG scale sweep")
    p.add_argument("--sweep-variants", type=lambda v: tuple(v.split(",")),
                   help="comma-separated SMG variants to sweep, names of benchmarks/learn_bench_config.py's "
                   "SMG_VARIANTS (empty: none)")
    p.add_argument("--sweep-scales", type=lambda v: tuple(float(x) for x in v.split(",")),
                   help="comma-separated SMG scales of the sweep (0 = CFG alone is always included)")
    p.add_argument("--until", choices=("vae", "train"), help="stop after this stage (e.g. train now, sample later)")
    p.add_argument("--vae-from", type=Path, help="another work folder whose finished VAE stage this one reuses "
                   "(how the shipped model was made: its VAE is the default benchmark's)")
    p.add_argument("--results-json", type=Path, default=Path("docs/learn_bench_results.json"),
                   help="where the machine-readable results go besides OUT (default: %(default)s)")


def bench_config(args: argparse.Namespace):
    """The parsed arguments → `BenchConfig` (ValueError naming unknown SMG variants)."""
    from benchmarks.learn_bench_config import SMG_VARIANTS, BenchConfig

    cfg = BenchConfig.smoke() if args.smoke else BenchConfig.ship() if args.ship else BenchConfig()
    for name in ("train_steps", "per_group", "threads", "sweep_per_group", "sweep_variants", "sweep_scales"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.sweep_variants = tuple(v for v in cfg.sweep_variants if v)
    unknown = [v for v in cfg.sweep_variants if v not in SMG_VARIANTS]
    if unknown:
        raise ValueError(f"unknown SMG variants {unknown}; known: {', '.join(SMG_VARIANTS)}")
    cfg.results_json = None if args.smoke or args.ship else str(args.results_json)
    return cfg


def run(args: argparse.Namespace) -> int:
    from cli.main import fail

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = bench_config(args)
    except ValueError as e:
        return fail(args, e)
    from benchmarks.learn_bench import reuse_vae, run_bench

    if args.vae_from is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            reuse_vae(args.vae_from, args.out)
        except ValueError as e:
            return fail(args, e)
    run_bench(cfg, args.out, args.until)
    if not args.until:
        print((args.out / "results.md").read_text())
    return 0
