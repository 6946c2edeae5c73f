"""`mlcid photos`: a raw input shard of the real photographs bundled with scikit-image and scikit-learn (offline)."""

from __future__ import annotations

import argparse

HELP = "a raw img2dataset-style shard of real photographs that ship inside scikit-image/scikit-learn (offline)"


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--out", required=True, help="folder for the raw shard")
    p.add_argument("--shard-id", type=int, default=90, help="shard number, file name {id:05d}.tar (default: 90)")


def run(args: argparse.Namespace) -> int:
    from mlcid.photos import load_photos, write_photo_shard

    path = write_photo_shard(args.out, args.shard_id)
    print(f"wrote {len(load_photos())} bundled photos to {path}")
    return 0
