"""`layerdiff showcase --model DIR --out DIR`: layered samples and every editing application in one HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("sample a few layered images from a trained model with prompts it can draw (CFG + self-mask guidance), "
        "then layer inpainting, style transfer and iterative layer adding on them; PNG/PSD/ORA per result and "
        "one HTML page (OUT/index.html) with the composite, each layer in its mask and every edit before/after")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="LayerDiff pipeline folder (default: the shipped model, model/pretrained/shapes64)")
    p.add_argument("--out", required=True, type=Path, help="folder to write (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=3, help="layered images to sample (default: 3)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, … (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from cli.main import fail
    from model.sampling.showcase import ShowcaseConfig, showcase

    try:
        page = showcase(ShowcaseConfig(model=args.model, out=args.out, seed=args.seed, examples=args.examples,
                                       steps=args.steps, device=args.device))
    except (ValueError, FileNotFoundError) as err:
        return fail(args, err)
    print(f"showcase page: {page}")
    return 0
