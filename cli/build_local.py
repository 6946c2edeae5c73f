"""`mlcid build-local`: build MLCID shards on this machine, one shard after another (`pipelines.build.build_local`)."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

HELP = "build MLCID shards on this machine, one shard after another, without Ray (debugging, small runs)"


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    from cli.pipeline_args import add_pipeline_arguments

    p.description = ("Build MLCID shards from img2dataset output shards, sequentially and without Ray. Output shard "
                     "id = input shard id; finished shards are skipped (resume). Exit status: 0 every shard "
                     "complete, 1 some failed (reported, the others go on), 2 bad arguments or inputs.")
    p.add_argument("--shards", required=True, nargs="+",
                   help="input shards: paths, brace patterns ('raw/{00000..00009}.tar'), folders or fsspec URLs")
    p.add_argument("--out", required=True, help="output folder or fsspec URL (s3://bucket/prefix) for the MLCID "
                   "shards, their .parquet outcomes and _stats.json files")
    add_pipeline_arguments(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING…)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cli.main import fail
    from cli.pipeline_args import fault_policy, pipeline_options
    from pipelines.build import LocalBuildConfig, build_local

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = LocalBuildConfig(args.shards, args.out, pipeline_options(args).to_config(), fault_policy(args))
    except (ValueError, TypeError) as e:
        return fail(args, e)
    if args.print_config:
        print(json.dumps(config.pipeline.to_dict(), indent=1, default=str))
        return 0
    with tqdm(unit="shard", desc="shards") as shard_bar, \
            tqdm(unit="img", desc="images", position=1, leave=False) as item_bar:
        def on_shard(url: str, stats: dict[str, Any] | None) -> None:
            shard_bar.update(1)
            if stats is not None:
                tqdm.write(f"{url}: {'skipped (complete)' if stats.get('skipped') else 'done'} — read "
                           f"{stats['read']}, written {stats['written']}, dropped {stats['dropped']}")
        try:
            report = build_local(config, on_shard, item_bar.update)
        except (ValueError, FileNotFoundError) as e:  # bad input names, duplicate ids, a folder that isn't there
            return fail(args, e)
    print(report.format())
    print(json.dumps(report.totals()))
    return 1 if report.failed else 0
