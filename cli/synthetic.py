"""`mlcid synthetic`: synthetic layered scenes with exact ground truth (raw input shards + true MLCID shards)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "synthetic layered scenes with exact ground truth: raw img2dataset-style shards + their true MLCID shards"

Pair = tuple[str, str]


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _pairs(text: str) -> tuple[Pair, ...]:
    pairs = []
    for item in _names(text):
        colour, sep, shape = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"pair {item!r} must read COLOUR:SHAPE, e.g. red:circle")
        pairs.append((colour, shape))
    return tuple(pairs)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from mlcid.synthetic import SceneConfig

    d = SceneConfig()
    parser.description = ("Generate synthetic layered scenes (patterned background + 1-3 coloured shapes with real "
        "occlusions) with exact ground truth. Writes raw shards in img2dataset's layout (DIR/NNNNN.tar with "
        "KEY.jpg/.txt/.json, NNNNN.parquet, NNNNN_stats.json), the input of the MLCID pipeline, and the true MLCID "
        "shards of the same keys (MLCID_OUT/mlcid-NNNNNN.tar). Scene i depends only on (seed, i), not on the shard "
        "count, so any shard can be regenerated alone (--only-shards).")
    parser.epilog = ("Ground truth: B = the full background; m_i = the visible part of object i (front wins); F_i = RGBA "
        "with alpha = 5x5-dilated m_i, RGB = the object's own pixels inside its shape and the composite in the "
        "dilated ring, black outside the alpha. Raw JPEGs use quality 95 without chroma subsampling. Each sample's "
        "KEY.json holds the labels (source.objects: colour, shape, geometry, occluded_by) and the SceneConfig "
        "(pipeline.config). Example: mlcid synthetic --out data/synth --samples 1000 --shards 4 --seed 0")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the raw img2dataset-style shards")
    parser.add_argument("--mlcid-out", metavar="DIR2", help="folder for the ground-truth MLCID shards "
                        "(default: DIR/../<basename of DIR>-mlcid)")
    parser.add_argument("--samples", type=int, required=True, metavar="N", help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed, ≥ 0 (default: 0)")
    parser.add_argument("--shards", type=int, default=1, metavar="K", help="number of shards, ≤ 10000 scenes each "
                        "(default: 1)")
    parser.add_argument("--only-shards", type=int, nargs="+", metavar="ID", help="write only these shard ids")
    parser.add_argument("--size", type=int, default=d.size, help=f"image side in pixels (default: {d.size})")
    parser.add_argument("--min-foregrounds", type=int, default=d.min_foregrounds, metavar="N",
                        help=f"(default: {d.min_foregrounds})")
    parser.add_argument("--max-foregrounds", type=int, default=d.max_foregrounds, metavar="N",
                        help=f"at most 3 with the default 4-layer limit (default: {d.max_foregrounds})")
    parser.add_argument("--count-weights", type=lambda t: tuple(float(v) for v in _names(t)), metavar="W,W,..",
                        help="weights of the min..max foreground counts, e.g. 5,3,2 (default: uniform)")
    for flag, default, what in (
        ("--colours", d.colours, "object colours"),
        ("--shapes", d.shapes, "object shapes"),
        ("--patterns", d.background_patterns, "background patterns"),
    ):
        parser.add_argument(flag, type=_names, default=default, metavar="A,B,..",
                            help=f"{what} (default: {','.join(default)})")
    parser.add_argument("--allow", type=_pairs, metavar="COLOUR:SHAPE,..", help="draw only these pairs")
    parser.add_argument("--holdout", type=_pairs, default=(), metavar="COLOUR:SHAPE,..", help="never draw these pairs")
    parser.add_argument("--occlusion-prob", type=float, default=d.occlusion_prob, metavar="P",
                        help=f"chance an object is placed over an earlier one (default: {d.occlusion_prob})")
    parser.add_argument("--processes", type=int, default=1, help="worker processes, one shard each (default: 1)")
    parser.add_argument("--jpeg-quality", type=int, default=95, metavar="Q", help="raw JPEG quality (default: 95)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cli.main import fail
    from mlcid.synthetic import SceneConfig, default_mlcid_out, shard_ranges, write_dataset

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # bad settings end here with a usage message, before anything is written
        config = SceneConfig(
            size=args.size, min_foregrounds=args.min_foregrounds, max_foregrounds=args.max_foregrounds,
            count_weights=args.count_weights, colours=args.colours, shapes=args.shapes,
            background_patterns=args.patterns, allowed_pairs=args.allow, holdout_pairs=args.holdout,
            occlusion_prob=args.occlusion_prob,
        )
        shard_ranges(args.samples, args.shards)
        if args.seed < 0:
            raise ValueError(f"--seed must be ≥ 0, got {args.seed}")
    except ValueError as e:
        return fail(args, e)
    mlcid_out = Path(args.mlcid_out) if args.mlcid_out else default_mlcid_out(args.out)
    summary = write_dataset(
        args.out, mlcid_out, args.samples, args.seed, args.shards, config, shard_ids=args.only_shards,
        processes=args.processes, jpeg_quality=args.jpeg_quality, progress=not args.quiet,
    )
    print(
        f"wrote {summary['written']} scenes in {len(summary['shard_ids'])} shard(s) "
        f"({summary['samples_per_s']} scenes/s); layers {summary['layer_counts']}; "
        f"raw: {summary['raw_dir']}  mlcid: {summary['mlcid_dir']}"
    )
    return 0
