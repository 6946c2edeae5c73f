"""`mlcid view SHARDS… --out DIR`: a static HTML gallery of MLCID shards (`mlcid.view.build_view`)."""

from __future__ import annotations

import argparse
import logging

HELP = ("Write a static HTML gallery of MLCID shards: per sample the composite, background, each foreground over a "
        "checkerboard, masks, prompts and metadata; invalid samples are shown with their error; index.html "
        "summarises the shards' *_stats.json files and lists dropped samples. No network, no scripts.")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    from mlcid.schema import DEFAULT_MAX_AREA_FRAC, DEFAULT_MAX_LAYERS, DEFAULT_MIN_AREA_FRAC

    p.add_argument("shards", nargs="+",
                   help="shard paths, brace patterns ('dir/mlcid-{000000..000009}.tar'), folders (their *.tar) or "
                   "fsspec URLs")
    p.add_argument("--out", required=True, help="output folder (created; an earlier gallery there is replaced)")
    p.add_argument("--per-page", type=int, default=50, help="sample cards per gallery page (default 50)")
    p.add_argument("--max-samples", type=int, default=None, help="show at most N samples (default: all)")
    p.add_argument("--thumb-size", type=int, default=256, help="longest side of written images, px (default 256)")
    p.add_argument("--title", default="MLCID shards", help="page title")
    p.add_argument("--max-layers", type=int, default=DEFAULT_MAX_LAYERS, help="validation: most layers allowed")
    p.add_argument("--min-area", type=float, default=DEFAULT_MIN_AREA_FRAC, help="validation: min mask area")
    p.add_argument("--max-area", type=float, default=DEFAULT_MAX_AREA_FRAC, help="validation: max mask area")


def run(args: argparse.Namespace) -> int:
    from cli.main import fail
    from mlcid.validate import ValidationConfig
    from mlcid.view import ViewConfig, build_view

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = ViewConfig(per_page=args.per_page, max_samples=args.max_samples, thumb_size=args.thumb_size,
                            title=args.title, validation=ValidationConfig(args.max_layers, args.min_area,
                                                                          args.max_area))
        result = build_view(args.shards, args.out, config)
    except (ValueError, FileNotFoundError) as e:
        return fail(args, e)
    counts = ", ".join(f"{k}={v}" for k, v in sorted(result.status_counts.items())) or "no samples"
    print(f"{result.cards} samples ({counts}) on {len(result.pages)} page(s); open {result.index}")
    return 0
