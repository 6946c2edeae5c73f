"""Download LAION-style URL lists into img2dataset webdataset shards, running img2dataset from its own venv.

img2dataset pins old webdataset/pandas/opencv, so it lives in `.venv-img2dataset` (`make img2dataset-env`) and is
run as a subprocess with an argument list — never through a shell. Output: `NNNNN.tar` (jpg/txt/json) +
`NNNNN.parquet` + `NNNNN_stats.json`, the input of `mlcid build`.

    mlcid laion --url-list laion-part-00000.parquet --out raw/ --processes 8 --threads 64
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
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
