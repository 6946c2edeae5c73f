"""`mlcid laion`: LAION-style URL lists → img2dataset input shards, img2dataset run from its own venv."""

from __future__ import annotations

import argparse
import logging
import shlex

HELP = "download a LAION-style URL list into img2dataset shards (NNNNN.tar), the input of `mlcid build`"


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    from cluster.laion import DEFAULT_VENV, INPUT_FORMATS, RESIZE_MODES

    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.description = ("Download a LAION-style URL list into img2dataset webdataset shards (NNNNN.tar) using "
        f"img2dataset from its own environment ({DEFAULT_VENV}; create it with `make img2dataset-env`).")
    p.add_argument("--url-list", required=True, help="parquet/csv/… file or folder with the URLs and captions")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--input-format", default="parquet", choices=INPUT_FORMATS)
    p.add_argument("--url-col", default="URL")
    p.add_argument("--caption-col", default="TEXT")
    p.add_argument("--image-size", type=int, default=512, help="shorter side after resizing")
    p.add_argument("--resize-mode", default="keep_ratio", choices=RESIZE_MODES)
    p.add_argument("--min-image-size", type=int, default=64)
    p.add_argument("--processes", type=int, default=4, help="download processes")
    p.add_argument("--threads", type=int, default=32, help="download threads per process")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--save-column", action="append", default=[], help="extra input column to keep (repeatable)")
    p.add_argument("--venv", default=DEFAULT_VENV, help="img2dataset's own virtual environment")
    p.add_argument("--dry-run", action="store_true", help="print the img2dataset command and exit")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after `--`: raw img2dataset arguments")


def run(args: argparse.Namespace) -> int:
    from cluster.laion import LaionConfig, command, run as run_img2dataset

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    try:
        cfg = LaionConfig(args.url_list, args.out, args.input_format, args.url_col, args.caption_col,
                          args.image_size, args.resize_mode, min_image_size=args.min_image_size,
                          processes=args.processes, threads=args.threads, samples_per_shard=args.samples_per_shard,
                          save_columns=args.save_column, extra=extra, venv=args.venv)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    if args.dry_run:
        print(shlex.join(command(cfg)))
        return 0
    try:
        return run_img2dataset(cfg)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from e
