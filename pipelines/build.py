"""Build MLCID shards on this machine, one shard after another (no Ray; for debugging and small runs).

    python -m pipelines.build --shards 'raw/{00000..00009}.tar' --out mlcid/ --preset tiny
    python -m pipelines.build --shards raw/ --out s3://bucket/mlcid --preset real
Complete output shards (stats file present) are skipped, so an interrupted run can simply be restarted. A shard
that fails (unreadable input, a stage fault) is reported and the others go on; the exit status is then 1.
Library part: `PipelineOptions` → `PipelineConfig`, `LocalBuildConfig` → `build_local()` → `LocalBuildReport`.
The argparse part at the end only turns command-line values into these dataclasses.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlcid.shards import expand_urls
from mlcid.wids_index import index_folder
from pipelines.config import PRESETS, STAGE_ORDER, PipelineConfig
from pipelines.faults import FaultPolicy, describe
from pipelines.inputs import plan_shard_ids
from pipelines.runner import ShardProcessor

log = logging.getLogger("pipelines.build")


@dataclass
class PipelineOptions:
    """The pipeline choices a user makes on a command line; `None` keeps the preset's value."""

    preset: str = "real"
    backends: dict[str, str | None] = field(default_factory=dict)  # kind → backend (None disables an optional kind)
    models: dict[str, str | None] = field(default_factory=dict)  # registry name → hub id or local folder
    device: str | None = None
    max_side: int | None = None
    max_layers: int | None = None
    chunk_size: int | None = None
    prefix: str | None = None

    def to_config(self) -> PipelineConfig:
        overrides: dict[str, Any] = {}
        if self.backends:
            overrides["backends"] = dict(self.backends)
        if self.models:
            overrides["models"] = dict(self.models)
        for name in ("device", "max_side", "max_layers", "chunk_size", "prefix"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        return PipelineConfig.from_preset(self.preset, **overrides)


@dataclass
class LocalBuildConfig:
    """One sequential build: inputs, output folder or fsspec URL, the pipeline and its fault policy."""

    shards: list[str]
    out: str
    pipeline: PipelineConfig
    faults: FaultPolicy = field(default_factory=FaultPolicy)


@dataclass
class LocalBuildReport:
    """What a sequential build did: totals over the shards built now, and every failed or truncated input."""

    shards: int = 0
    processed: int = 0
    skipped: int = 0
    read: int = 0
    written: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input url, one-line error)
    truncated: list[str] = field(default_factory=list)  # inputs cut short: complete keys kept, flagged in stats

    def add(self, url: str, stats: dict[str, Any]) -> None:
        if stats.get("skipped"):
            self.skipped += 1
        else:
            self.processed += 1
            self.read += stats["read"]
            self.written += stats["written"]
            self.dropped.update(stats["dropped"])
        if stats.get("input_truncated"):
            self.truncated.append(url)

    def totals(self) -> dict[str, Any]:
        return {"shards": self.shards, "processed": self.processed, "skipped": self.skipped,
                "failed": len(self.failed), "read": self.read, "written": self.written,
                "dropped": dict(sorted(self.dropped.items())), "truncated": list(self.truncated)}

    def format(self) -> str:
        lines = [f"shards: {self.shards} ({self.processed} built, {self.skipped} skipped as complete, "
                 f"{len(self.failed)} failed)",
                 f"samples: read {self.read}, written {self.written}, dropped {sum(self.dropped.values())}"]
        lines += [f"input truncated (complete keys kept): {url}" for url in self.truncated]
        lines += [f"FAILED {url}: {error}" for url, error in self.failed]
        return "\n".join(lines)


def build_local(config: LocalBuildConfig, on_shard: Callable[[str, dict[str, Any] | None], None] | None = None,
                on_samples: Callable[[int], None] | None = None) -> LocalBuildReport:
    """Build every input shard in turn; a shard that raises is reported and the run goes on.

    Raises only before any work: unknown/duplicate shard ids, or inputs that do not exist (`FileNotFoundError`).
    """
    # 1. Inputs: every URL gets its shard id up front; two inputs with one id are refused.
    urls = expand_urls(config.shards)
    plan_shard_ids(urls)
    # 2. Models, once.
    processor = ShardProcessor(config.pipeline, config.faults).setup()
    # 3. Shards, one after another.
    report = LocalBuildReport(shards=len(urls))
    for url in urls:
        try:
            stats = processor.process(url, config.out, on_progress=on_samples)
        except Exception as e:  # noqa: BLE001 — one bad shard must not stop the run; it is reported
            report.failed.append((url, describe(e, 700)))
            log.error("shard %s failed: %s", url, describe(e, 700))
            stats = None
        else:
            report.add(url, stats)
        if on_shard is not None:
            on_shard(url, stats)
    # 4. The wids index (index.json) over every complete shard in the output.
    index_folder(config.out, config.pipeline.prefix)
    return report


# -- command line (argparse values → the dataclasses above; nothing below is library code) ---------------------
def _pairs(values: list[str], what: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for v in values:
        if "=" not in v:
            raise SystemExit(f"--{what} expects NAME=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        out[k] = None if val.lower() in ("", "none", "off") else val
    return out


def add_pipeline_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The pipeline flags shared by this CLI and `python -m cluster.build_mlcid`."""
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
    p.add_argument("--max-stage-error-frac", type=float, default=FaultPolicy.max_stage_error_frac,
                   help="fail a shard when more than this share of its items hit stage errors")


def pipeline_options_from_args(args: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(args.preset, _pairs(args.backend, "backend"), _pairs(args.model, "model"), args.device,
                           args.max_side, args.max_layers, args.chunk_size, args.prefix)


def fault_policy_from_args(args: argparse.Namespace) -> FaultPolicy:
    return FaultPolicy(max_stage_error_frac=args.max_stage_error_frac)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.build",
        description="Build MLCID shards from img2dataset output shards, sequentially and without Ray. "
        "Output shard id = input shard id; finished shards are skipped (resume); a failed shard is reported "
        "and the exit status is 1.",
    )
    p.add_argument("--shards", required=True, nargs="+",
                   help="input shards: paths, brace patterns ('raw/{00000..00009}.tar'), folders or fsspec URLs")
    p.add_argument("--out", required=True, help="output folder or fsspec URL (s3://bucket/prefix) for the MLCID "
                   "shards, their .parquet outcomes and _stats.json files")
    add_pipeline_arguments(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING…)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when every shard is complete, 1 when some failed, 2 for bad arguments or inputs."""
    from tqdm import tqdm

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = LocalBuildConfig(args.shards, args.out, pipeline_options_from_args(args).to_config(),
                                  fault_policy_from_args(args))
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(report.format())
    print(json.dumps(report.totals()))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
