"""`mlcid validate SHARDS…`: check shards against the mlcid/1 invariants; exit 1 when any shard fails."""

from __future__ import annotations

import argparse
import json

HELP = ("Check MLCID shards against the mlcid/1 invariants. Exit 1 if any shard holds an invalid sample, is "
        "truncated, or has no samples (unless its stats file records that every input was dropped).")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    from mlcid.schema import DEFAULT_MAX_AREA_FRAC, DEFAULT_MAX_LAYERS, DEFAULT_MIN_AREA_FRAC

    p.add_argument("shards", nargs="+", help="shard paths, brace patterns, folders or fsspec URLs")
    p.add_argument("--max-layers", type=int, default=DEFAULT_MAX_LAYERS)
    p.add_argument("--min-area", type=float, default=DEFAULT_MIN_AREA_FRAC, help="smallest foreground mask share")
    p.add_argument("--max-area", type=float, default=DEFAULT_MAX_AREA_FRAC, help="largest foreground mask share")
    p.add_argument("--json", action="store_true", help="print one JSON line per shard")


def run(args: argparse.Namespace) -> int:
    from mlcid.shard_check import check_shard
    from mlcid.shards import expand_urls
    from mlcid.validate import ValidationConfig

    config = ValidationConfig(args.max_layers, args.min_area, args.max_area)
    failed = 0
    for url in expand_urls(args.shards):
        check = check_shard(url, config)
        failed += not check.ok
        if args.json:
            print(json.dumps({"shard": url, "ok": check.ok, "valid": check.valid, "invalid": check.invalid}))
        else:
            print(check.describe())
    return 1 if failed else 0
