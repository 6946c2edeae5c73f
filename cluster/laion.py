"""Download LAION-style URL lists into img2dataset webdataset shards, running img2dataset from its own venv.

img2dataset pins old webdataset/pandas/opencv, so it lives in `.venv-img2dataset` (`make img2dataset-env`) and is
run as a subprocess with an argument list — never through a shell. Output: `NNNNN.tar` (jpg/txt/json) +
`NNNNN.parquet` + `NNNNN_stats.json`, the input of `python -m cluster.build_mlcid`.

    python -m cluster.laion --url-list laion-part-00000.parquet --out raw/ --processes 8 --threads 64
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("cluster.laion")

DEFAULT_VENV = ".venv-img2dataset"
INPUT_FORMATS = ("parquet", "csv", "tsv", "txt", "json", "jsonl", "csv.gz", "tsv.gz", "json.gz", "jsonl.gz")
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
# img2dataset must stay offline-quiet: no wandb login, no albumentations version check.
SUBPROCESS_ENV = {"WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}


@dataclass
class LaionConfig:
    """img2dataset settings for MLCID inputs (LAION parquet: URL + TEXT columns; webdataset output)."""

    url_list: str  # a parquet/csv/… file or folder of them (LAION metadata)
    out: str  # output folder for NNNNN.tar shards
    input_format: str = "parquet"
    url_col: str = "URL"
    caption_col: str = "TEXT"
    image_size: int = 512  # the shorter side after resizing (keep_ratio); MLCID's real preset uses 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    min_image_size: int = 64  # drop images whose shorter side is smaller (MLCID's min_side)
    processes: int = 4
    threads: int = 32
    samples_per_shard: int = 10_000
    retries: int = 1
    timeout_s: int = 10
    encode_format: str = "jpg"
    save_columns: list[str] = field(default_factory=list)  # extra parquet columns kept in KEY.json
    extra: list[str] = field(default_factory=list)  # further raw img2dataset arguments, passed as given
    venv: str = DEFAULT_VENV

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        for name in ("image_size", "processes", "threads", "samples_per_shard", "timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.samples_per_shard > 10_000:
            # img2dataset keys are SSSSSIIII (4-digit in-shard index); more would collide across shards.
            raise ValueError("samples_per_shard must be ≤ 10000 (img2dataset keys hold a 4-digit index)")

    @property
    def executable(self) -> Path:
        return Path(self.venv) / "bin" / "img2dataset"


def img2dataset_args(cfg: LaionConfig) -> list[str]:
    """The img2dataset argument list (`--name=value`, one element each; values are never shell-parsed)."""
    args = {
        "url_list": cfg.url_list,
        "output_folder": cfg.out,
        "input_format": cfg.input_format,
        "url_col": cfg.url_col,
        "caption_col": cfg.caption_col,
        "output_format": "webdataset",
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
        "resize_only_if_bigger": cfg.resize_only_if_bigger,
        "min_image_size": cfg.min_image_size,
        "processes_count": cfg.processes,
        "thread_count": cfg.threads,
        "number_sample_per_shard": cfg.samples_per_shard,
        "retries": cfg.retries,
        "timeout": cfg.timeout_s,
        "encode_format": cfg.encode_format,
        "enable_wandb": False,
        "incremental_mode": "incremental",  # re-running resumes: finished shards are kept
    }
    if cfg.save_columns:
        args["save_additional_columns"] = "[" + ",".join(cfg.save_columns) + "]"
    return [f"--{k}={v}" for k, v in args.items()] + list(cfg.extra)


def command(cfg: LaionConfig) -> list[str]:
    return [str(cfg.executable), *img2dataset_args(cfg)]


def run(cfg: LaionConfig) -> int:
    """Run img2dataset; returns its exit status. Raises if its venv is missing."""
    exe = cfg.executable
    if not exe.exists():
        raise FileNotFoundError(f"{exe} not found: create img2dataset's own environment with `make img2dataset-env`")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    cmd = command(cfg)
    log.info("running %s", shlex.join(cmd))
    env = {**os.environ, **SUBPROCESS_ENV}
    return subprocess.run(cmd, env=env, check=False).returncode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cluster.laion",
        description="Download a LAION-style URL list into img2dataset webdataset shards (NNNNN.tar) using "
        f"img2dataset from its own environment ({DEFAULT_VENV}; create it with `make img2dataset-env`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
        return run(cfg)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
