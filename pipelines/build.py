"""Build MLCID shards on this machine, one shard after another (no Ray; for debugging and small runs).

    mlcid build-local --shards 'raw/{00000..00009}.tar' --out mlcid/ --preset tiny      (cli/build_local.py)
    mlcid build-local --shards raw/ --out s3://bucket/mlcid --preset real
Complete output shards (stats file present) are skipped, so an interrupted run can simply be restarted. A shard
that fails (unreadable input, a stage fault) is reported and the others go on; the exit status is then 1.
Library part: `PipelineOptions` → `PipelineConfig`, `LocalBuildConfig` → `build_local()` → `LocalBuildReport`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlcid.shards import expand_urls
from mlcid.wids_index import index_folder
from pipelines.config import PipelineConfig
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
