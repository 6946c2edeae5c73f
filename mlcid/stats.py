"""Summaries of shard `*_stats.json` files: kept / dropped by reason, layer-count histogram, incomplete shards."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from mlcid.shards import STATS_SUFFIX

OUTCOMES_SUFFIX = ".parquet"  # per-input-sample outcomes (key, kept, reason, detail, …) written by the pipeline


def stats_url_for(shard_url: str) -> str:
    """'dir/mlcid-000003.tar' → 'dir/mlcid-000003_stats.json' (the writer's naming, also img2dataset's)."""
    if not shard_url.endswith(".tar"):
        raise ValueError(f"cannot name a stats file for {shard_url!r}: shard URLs must end in '.tar'")
    return shard_url[: -len(".tar")] + STATS_SUFFIX


def outcomes_url_for(shard_url: str) -> str:
    """'dir/mlcid-000003.tar' → 'dir/mlcid-000003.parquet' (one row per input sample, kept or dropped)."""
    if not shard_url.endswith(".tar"):
        raise ValueError(f"cannot name an outcomes file for {shard_url!r}: shard URLs must end in '.tar'")
    return shard_url[: -len(".tar")] + OUTCOMES_SUFFIX


def check_stats(stats: Any) -> dict[str, Any]:
    """Return `stats` if it has the required fields (`read`, `written`, `dropped`); else raise ValueError."""
    if not isinstance(stats, dict):
        raise ValueError(f"stats must be a JSON object, got {type(stats).__name__}")
    for name in ("read", "written"):
        if not isinstance(stats.get(name), int) or stats[name] < 0:
            raise ValueError(f"stats field {name!r} must be a non-negative integer, got {stats.get(name)!r:.80}")
    dropped = stats.get("dropped")
    if not isinstance(dropped, dict) or not all(isinstance(v, int) and v >= 0 for v in dropped.values()):
        raise ValueError(f"stats field 'dropped' must map reasons to non-negative integers, got {dropped!r:.120}")
    layer_counts = stats.get("layer_counts", {})
    if not isinstance(layer_counts, dict) or not all(
        str(k).isdigit() and isinstance(v, int) and v >= 0 for k, v in layer_counts.items()
    ):
        raise ValueError(f"stats field 'layer_counts' must map layer counts to integers, got {layer_counts!r:.120}")
    return stats


@dataclass
class ShardStats:
    """One shard and what its stats file says. `stats is None` → incomplete (no file) or unreadable (`error`)."""

    url: str
    stats: dict[str, Any] | None = None
    error: str | None = None  # set when the stats file exists but cannot be read or is malformed

    @property
    def complete(self) -> bool:
        return self.stats is not None

    @property
    def status(self) -> str:
        """'complete', 'incomplete' (no stats file: not finished) or 'bad-stats' (file unreadable/malformed)."""
        if self.stats is not None:
            return "complete"
        return "bad-stats" if self.error else "incomplete"

    @property
    def consistent(self) -> bool:
        """read == written + sum(dropped) (True for shards without stats: nothing to contradict)."""
        if self.stats is None:
            return True
        return self.stats["read"] == self.stats["written"] + sum(self.stats["dropped"].values())


def load_shard_stats(shard_url: str) -> ShardStats:
    """Read the stats file next to a shard (local path or fsspec URL). Never raises for a missing/bad file."""
    try:
        stats_url = stats_url_for(shard_url)
    except ValueError as e:
        return ShardStats(shard_url, error=str(e))
    try:
        with fsspec.open(stats_url, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return ShardStats(shard_url)
    except (OSError, ValueError) as e:
        return ShardStats(shard_url, error=f"{stats_url}: {type(e).__name__}: {e}")
    try:
        return ShardStats(shard_url, stats=check_stats(json.loads(raw.decode("utf-8"))))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        return ShardStats(shard_url, error=f"{stats_url}: {e}")


@dataclass
class StatsSummary:
    """Totals over shards. Counts come only from complete shards (those with a valid stats file)."""

    shards: int = 0
    complete: int = 0
    incomplete: list[str] = field(default_factory=list)  # shard URLs without a stats file
    bad_stats: list[str] = field(default_factory=list)  # shard URLs whose stats file is unreadable/malformed
    inconsistent: list[str] = field(default_factory=list)  # read != written + sum(dropped)
    truncated: list[str] = field(default_factory=list)  # complete shards whose INPUT tar was cut short
    read: int = 0
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason → count, most frequent first
    layer_counts: dict[int, int] = field(default_factory=dict)  # number of layers → samples, ascending
    without_layer_counts: int = 0  # complete shards whose stats lack `layer_counts`
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds, summed over shards
    prompt_sources: dict[str, int] = field(default_factory=dict)  # e.g. global_caption / layer_label → count
    wall_seconds: float = 0.0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def keep_rate(self) -> float | None:
        """written / read over complete shards; None when nothing was read."""
        return self.written / self.read if self.read else None

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "complete": self.complete,
            "incomplete": list(self.incomplete),
            "bad_stats": list(self.bad_stats),
            "inconsistent": list(self.inconsistent),
            "input_truncated": list(self.truncated),
            "read": self.read,
            "written": self.written,
            "dropped": dict(self.dropped),
            "dropped_total": self.dropped_total,
            "keep_rate": self.keep_rate,
            "layer_counts": {str(k): v for k, v in self.layer_counts.items()},
            "timings": dict(self.timings),
            "prompt_sources": dict(self.prompt_sources),
            "wall_seconds": self.wall_seconds,
        }


def summarize(shards: Iterable[ShardStats]) -> StatsSummary:
    """Sum the stats of complete shards and list the incomplete, unreadable and inconsistent ones."""
    out = StatsSummary()
    dropped: Counter[str] = Counter()
    layers: Counter[int] = Counter()
    timings: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for shard in shards:
        out.shards += 1
        if shard.stats is None:
            (out.bad_stats if shard.error else out.incomplete).append(shard.url)
            continue
        s = shard.stats
        out.complete += 1
        out.read += s["read"]
        out.written += s["written"]
        dropped.update(s["dropped"])
        if "layer_counts" in s:
            layers.update({int(k): v for k, v in s["layer_counts"].items()})
        else:
            out.without_layer_counts += 1
        for name, sec in (s.get("timings") or {}).items():
            if isinstance(sec, (int, float)):
                timings[name] += float(sec)
        sources.update({k: v for k, v in (s.get("prompt_sources") or {}).items() if isinstance(v, int)})
        if isinstance(s.get("wall_seconds"), (int, float)):
            out.wall_seconds += float(s["wall_seconds"])
        if not shard.consistent:
            out.inconsistent.append(shard.url)
        if s.get("input_truncated"):
            out.truncated.append(shard.url)
    out.dropped = dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])))
    out.layer_counts = dict(sorted(layers.items()))
    out.timings = {k: round(v, 4) for k, v in sorted(timings.items())}
    out.prompt_sources = dict(sorted(sources.items(), key=lambda kv: (-kv[1], kv[0])))
    out.wall_seconds = round(out.wall_seconds, 4)
    return out


def summarize_dicts(stats: Sequence[Mapping[str, Any]]) -> StatsSummary:
    """Summarise stats dicts already in memory (e.g. what `ShardWriter.close()` returned for each shard)."""
    return summarize(ShardStats(str(s.get("shard", i)), stats=check_stats(dict(s))) for i, s in enumerate(stats))


def format_summary(summary: StatsSummary) -> str:
    """A few readable lines for logs and the end of a pipeline run."""
    rate = f"{summary.keep_rate:.1%}" if summary.keep_rate is not None else "n/a"
    lines = [
        (
            f"shards: {summary.shards} ({summary.complete} complete, {len(summary.incomplete)} incomplete, "
            f"{len(summary.bad_stats)} with bad stats)"
        ),
        f"samples: read {summary.read}, written {summary.written} ({rate}), dropped {summary.dropped_total}",
    ]
    if summary.dropped:
        lines.append("dropped by reason: " + ", ".join(f"{k}={v}" for k, v in summary.dropped.items()))
    if summary.prompt_sources:
        lines.append("prompt sources: " + ", ".join(f"{k}={v}" for k, v in summary.prompt_sources.items()))
    if summary.layer_counts:
        lines.append("layers per sample: " + ", ".join(f"{k}: {v}" for k, v in summary.layer_counts.items()))
    for url in summary.incomplete:
        lines.append(f"incomplete (no stats file): {url}")
    for url in summary.bad_stats:
        lines.append(f"unreadable stats: {url}")
    for url in summary.truncated:
        lines.append(f"input truncated (its complete keys were kept): {url}")
    for url in summary.inconsistent:
        lines.append(f"inconsistent stats (read != written + dropped): {url}")
    return "\n".join(lines)
