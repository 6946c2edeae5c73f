"""`mlcid wids-index SHARDS… [--out FILE]`: write the wids shard index (index.json) for MLCID shards."""

from __future__ import annotations

import argparse

HELP = ("Write a wids shard index (index.json, read by wids.ShardListDataset) for MLCID shards; sample counts come "
        "from the stats files, unfinished or empty shards are left out.")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("shards", nargs="+", help="shard paths, brace patterns, folders or fsspec URLs")
    p.add_argument("--out", default=None, help="index file (default: index.json beside the first shard)")
    p.add_argument("--name", default=None, help="dataset name stored in the index (default: the folder name)")


def run(args: argparse.Namespace) -> int:
    from cli.main import fail
    from mlcid.wids_index import write_wids_index

    try:
        index = write_wids_index(args.shards, args.out, args.name)
    except ValueError as e:
        return fail(args, e)
    for url, why in index.left_out.items():
        print(f"left out {url}: {why}")
    print(f"wrote {index.url}: {len(index.shards)} shard(s), {index.nsamples} samples")
    return 0
