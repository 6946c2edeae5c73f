"""`layerdiff ship-model --bench OUT --out DIR`: a learn-bench model as a small shippable pipeline folder."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("write a learn-bench work folder's trained LayerDiff (OUT/run) as a pipeline folder to keep in the "
        "repository: float16 safetensors, a model card (how it was trained, what it can draw, metrics, sha256 of "
        "every file); refused over 10 MB; the same work folder gives byte-identical files")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--bench", required=True, type=Path, help="learn-bench work folder (`layerdiff learn-bench --out`)")
    p.add_argument("--out", required=True, type=Path, help="folder to write, e.g. model/pretrained/shapes64")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--command", dest="bench_command", default=None,
                   help="the learn-bench command that trained it, for the card (default: "
                        "'layerdiff learn-bench --out OUT --train-steps N')")
    p.add_argument("--max-mb", type=float, default=10.0, help="refuse a folder larger than this (default: 10 MB)")


def run(args: argparse.Namespace) -> int:
    from cli.main import fail
    from model.ship import ship_learn_bench, verify_checksums

    try:
        out = ship_learn_bench(args.bench, args.out, overwrite=args.overwrite, max_bytes=int(args.max_mb * 1e6),
                               command=args.bench_command)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        return fail(args, err)
    problems = verify_checksums(out)
    if problems:
        return fail(args, "written folder does not match its card: " + "; ".join(problems))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB); load it with LayerDiffPipeline.from_pretrained({str(out)!r})")
    return 0
