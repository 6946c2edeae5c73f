"""CLI: build MLCID shards from img2dataset shards on this machine, one shard after another (no Ray; for debugging).

    python -m pipelines.build --shards 'raw/{00000..00009}.tar' --out mlcid/ --preset tiny
Complete output shards (stats file present) are skipped, so an interrupted run can simply be restarted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tqdm import tqdm

from mlcid.shards import expand_urls
from mlcid.wids_index import index_folder
from pipelines.config import PRESETS, STAGE_ORDER, PipelineConfig
from pipelines.runner import ShardProcessor


def _pairs(values: list[str], what: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for v in values:
        if "=" not in v:
            raise SystemExit(f"--{what} expects NAME=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        out[k] = None if val.lower() in ("", "none", "off") else val
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.build",
        description="Build MLCID shards from img2dataset output shards, sequentially and without Ray. "
        "Output shard id = input shard id; finished shards are skipped (resume).",
    )
    p.add_argument("--shards", required=True, nargs="+",
                   help="input shards: paths, brace patterns ('raw/{00000..00009}.tar'), folders or fsspec URLs")
    p.add_argument("--out", required=True, help="local output folder for the MLCID shards, their .parquet outcomes and _stats.json files")
    p.add_argument("--preset", default="real", choices=sorted(PRESETS), help="pipeline profile (default: real)")
    p.add_argument("--backend", action="append", default=[], metavar="KIND=NAME",
                   help=f"override a stage backend (kinds: {', '.join(STAGE_ORDER)}; NAME 'none' disables an "
                   "optional stage)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="override a registry model location (e.g. depth-saliency=/models/depth)")
    p.add_argument("--device", help="torch device (default: the preset's; 'auto' = cuda if available)")
    p.add_argument("--max-side", type=int, help="shorter output side cap in pixels (multiple of 8)")
    p.add_argument("--max-layers", type=int, help="background + at most this many minus one foregrounds")
    p.add_argument("--chunk-size", type=int, help="items pushed through the stages together")
    p.add_argument("--prefix", help="output shard name prefix (default mlcid)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING…)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides: dict = {}
    if args.backend:
        overrides["backends"] = _pairs(args.backend, "backend")
    if args.model:
        overrides["models"] = _pairs(args.model, "model")
    for name in ("device", "max_side", "max_layers", "chunk_size", "prefix"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return PipelineConfig.from_preset(args.preset, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1, default=str))
        return 0
    urls = expand_urls(args.shards)
    processor = ShardProcessor(config).setup()
    totals = {"read": 0, "written": 0, "skipped": 0}
    with tqdm(total=len(urls), unit="shard", desc="shards") as shard_bar, \
            tqdm(unit="img", desc="images", position=1, leave=False) as item_bar:
        for url in urls:
            stats = processor.process(url, args.out, on_progress=item_bar.update)
            totals["read"] += stats["read"]
            totals["written"] += stats["written"]
            totals["skipped"] += bool(stats.get("skipped"))
            shard_bar.update(1)
            shard_bar.set_postfix(written=totals["written"], read=totals["read"])
            tqdm.write(f"{url}: {'skipped (complete)' if stats.get('skipped') else 'done'} — read {stats['read']}, "
                       f"written {stats['written']}, dropped {stats['dropped']}")
    index_folder(args.out, config.prefix)  # index.json for wids.ShardListDataset
    print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
