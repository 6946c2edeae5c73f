"""`mlcid stats SHARDS…`: sum the stats files beside MLCID shards; exit 1 if any shard is incomplete or unreadable."""

from __future__ import annotations

import argparse
import json

HELP = ("Summarise the *_stats.json files next to MLCID shards: kept/dropped by reason, prompt sources, layer "
        "counts, incomplete shards. Exit 1 if any shard is incomplete or has unreadable stats.")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("shards", nargs="+", help="shard paths, brace patterns, folders or fsspec URLs")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    from mlcid.shards import expand_urls
    from mlcid.stats import format_summary, load_shard_stats, summarize

    summary = summarize(load_shard_stats(url) for url in expand_urls(args.shards))
    print(json.dumps(summary.to_json(), indent=1) if args.json else format_summary(summary))
    return 1 if summary.incomplete or summary.bad_stats else 0
