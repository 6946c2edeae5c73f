"""`mlcid takedown --keys FILE [--urls FILE] --out DIR SHARDS…`: rewrite shards without the listed samples."""

from __future__ import annotations

import argparse
import logging

HELP = ("Rewrite MLCID shards without the samples listed by key and/or source URL. Kept samples are copied byte "
        "for byte; stats are updated (dropped['takedown']); each shard gets a removal manifest NAME_takedown.json. "
        "Exit 1 if any shard was refused.")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("shards", nargs="+", help="shard paths, brace patterns, folders or fsspec URLs")
    p.add_argument("--keys", help="file with one sample key per line ('#' comments allowed)")
    p.add_argument("--urls", help="file with one source image URL per line ('#' comments allowed)")
    p.add_argument("--out", required=True, help="output folder or fsspec URL (may be the shards' own folder)")


def run(args: argparse.Namespace) -> int:
    from cli.main import fail
    from mlcid.takedown import TakedownConfig, read_list, takedown

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = TakedownConfig(
            out=args.out,
            keys=frozenset(read_list(args.keys)) if args.keys else frozenset(),
            urls=frozenset(read_list(args.urls)) if args.urls else frozenset(),
        )
        result = takedown(args.shards, config)
    except (ValueError, FileNotFoundError) as e:
        return fail(args, e)
    for s in result.shards:
        print(f"{'FAIL' if s.error else 'OK  '} {s.shard}: " + (s.error or f"{s.kept} kept, {len(s.removed)} removed"))
    print(f"removed {result.removed} sample(s) from {len(result.shards)} shard(s)")
    for what, missing in (("keys", result.unmatched_keys), ("urls", result.unmatched_urls)):
        if missing:
            print(f"not found ({len(missing)} {what}): " + ", ".join(missing[:20]) + (" …" if len(missing) > 20 else ""))
    return 1 if result.failed else 0
