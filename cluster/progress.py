"""The live progress line of a pool run (tqdm) and its final summary (per-reason counts, throughput, failures)."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from cluster.pool import PoolReport, ShardOutcome, ShardTask

log = logging.getLogger("cluster.progress")

# Per-shard timing keys that are I/O or waiting rather than stage compute.
IO_TIMINGS = ("decode", "decode_wait", "write")


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _top(counter: Counter[str], n: int = 3) -> str:
    return ",".join(f"{k}:{v}" for k, v in counter.most_common(n))


class RunProgress:
    """A `PoolListener`: one tqdm line — shards done/total, ETA, samples/s, written, drops by reason, failures.

    When the output is not a terminal (cluster job logs) it logs one line per finished shard instead.
    """

    def __init__(self, total: int, skipped: int = 0, file: TextIO | None = None, enabled: bool = True) -> None:
        file = file or sys.stderr
        self.tty = enabled and file.isatty()
        self.log_lines = enabled and not self.tty
        self.total = total
        self.bar = tqdm(total=total, unit="shard", desc="shards", file=file, dynamic_ncols=True,
                        disable=not self.tty, smoothing=0.1)
        self.t0 = time.perf_counter()
        self.live_samples = 0
        self.done = 0
        self.written = 0
        self.read = 0
        self.dropped: Counter[str] = Counter()
        self.failed = 0
        self.retries = 0
        self.skipped = skipped

    def on_samples(self, count: int) -> None:
        self.live_samples += count
        self._refresh()

    def on_retry(self, task: ShardTask, error: str) -> None:
        self.retries += 1
        if self.tty:
            self.bar.write(f"retrying {task.url}: {error}")
        self._refresh()

    def on_shard(self, outcome: ShardOutcome) -> None:
        if outcome.ok and outcome.stats is not None:
            self.read += outcome.stats.get("read", 0)
            self.written += outcome.stats.get("written", 0)
            self.dropped.update(outcome.stats.get("dropped", {}))
            self.live_samples = max(self.live_samples, self.read)
        else:
            self.failed += 1
            if self.tty:
                self.bar.write(f"FAILED {outcome.task.url} after {outcome.attempts} attempts: "
                               f"{outcome.errors[-1] if outcome.errors else '?'}")
        self.done += 1
        self.bar.update(1)
        self._refresh()
        if self.log_lines:
            done, elapsed = self.done, time.perf_counter() - self.t0
            eta = elapsed / done * (self.total - done) if done else 0.0
            log.info("shards %d/%d (%s), ETA %s: %s", done, self.total, outcome.task.key, _hms(eta),
                     ", ".join(f"{k} {v}" for k, v in self._postfix().items()))

    def _postfix(self) -> dict[str, Any]:
        rate = self.live_samples / max(1e-9, time.perf_counter() - self.t0)
        post: dict[str, Any] = {"samples/s": f"{rate:.2f}", "written": self.written}
        if self.dropped:
            post["dropped"] = _top(self.dropped)
        if self.failed or self.retries:
            post["failed"], post["retries"] = self.failed, self.retries
        return post

    def _refresh(self) -> None:
        if self.tty:
            self.bar.set_postfix(self._postfix(), refresh=True)

    def close(self) -> None:
        self.bar.close()


@dataclass
class RunSummary:
    """Totals of one build run (also written as JSON with `--summary-json`)."""

    shards_total: int
    shards_processed: int  # finished in this run
    shards_skipped: int  # already complete before the run (or finished by another worker meanwhile)
    shards_failed: int
    read: int
    written: int
    dropped: dict[str, int]
    wall_seconds: float
    startup_seconds: float
    samples_per_second: float  # read / wall time (start-up included)
    steady_samples_per_second: float  # read / (pool time after the first actor was ready)
    stage_seconds: dict[str, float]  # summed over this run's shards, from the stats files' timings
    process_seconds: float  # summed time inside processor.process on the actors
    workers: int
    actors_started: int
    actors_recycled: int
    actors_died: int
    actors_faulted: int = 0  # replaced after a device fault
    failed: list[dict[str, Any]] = field(default_factory=list)  # url, attempts, errors
    truncated: list[str] = field(default_factory=list)  # inputs cut short (complete keys kept; `input_truncated`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(report: PoolReport, skipped_up_front: int, workers: int, wall_seconds: float) -> RunSummary:
    """Fold a `PoolReport` into totals; `skipped_up_front` shards were complete before the pool started."""
    done = [o for o in report.outcomes if o.ok and o.stats is not None]
    fresh = [o for o in done if not o.stats.get("skipped")]
    dropped: Counter[str] = Counter()
    stage: Counter[str] = Counter()
    for o in fresh:
        dropped.update(o.stats.get("dropped", {}))
        stage.update(o.stats.get("timings", {}))
    read = sum(o.stats.get("read", 0) for o in fresh)
    steady = report.wall_seconds - report.startup_seconds
    return RunSummary(
        shards_total=len(report.outcomes) + skipped_up_front,
        shards_processed=len(fresh),
        shards_skipped=skipped_up_front + len(done) - len(fresh),
        shards_failed=len(report.failed),
        read=read,
        written=sum(o.stats.get("written", 0) for o in fresh),
        dropped=dict(sorted(dropped.items())),
        wall_seconds=round(wall_seconds, 3),
        startup_seconds=round(report.startup_seconds, 3),
        samples_per_second=round(read / wall_seconds, 3) if wall_seconds > 0 else 0.0,
        steady_samples_per_second=round(read / steady, 3) if steady > 0 else 0.0,
        stage_seconds={k: round(v, 3) for k, v in sorted(stage.items())},
        process_seconds=round(sum(o.process_seconds for o in fresh), 3),
        workers=workers,
        actors_started=report.actors_started,
        actors_recycled=report.actors_recycled,
        actors_died=report.actors_died,
        actors_faulted=report.actors_faulted,
        failed=[{"url": o.task.url, "attempts": o.attempts, "errors": o.errors} for o in report.failed],
        truncated=[o.task.url for o in fresh if o.stats.get("input_truncated")],
    )


def format_summary(s: RunSummary) -> str:
    """A markdown table of the run, then one line per drop reason and per failed shard."""
    rows = [
        ("shards", f"{s.shards_total} total: {s.shards_processed} processed, {s.shards_skipped} skipped "
                   f"(complete), {s.shards_failed} failed"),
        ("samples", f"{s.read} read, {s.written} written, {sum(s.dropped.values())} dropped"),
        ("wall time", f"{s.wall_seconds:.1f} s (actor start-up {s.startup_seconds:.1f} s)"),
        ("throughput", f"{s.samples_per_second:.2f} samples/s read with {s.workers} worker(s) "
                       f"({s.steady_samples_per_second:.2f} after start-up)"),
        ("actors", f"{s.actors_started} started, {s.actors_recycled} recycled, {s.actors_died} died, "
                   f"{s.actors_faulted} replaced after a device fault"),
    ]
    stage = {k: v for k, v in s.stage_seconds.items() if k not in IO_TIMINGS}
    if stage:
        rows.append(("stage time", ", ".join(f"{k} {v:.1f}s" for k, v in sorted(stage.items(), key=lambda kv: -kv[1]))))
    lines = ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    if s.dropped:
        lines += ["", "| drop reason | samples |", "|---|---:|",
                  *[f"| {k} | {v} |" for k, v in sorted(s.dropped.items(), key=lambda kv: -kv[1])]]
    if s.truncated:
        lines += ["", "| truncated input (complete keys kept) |", "|---|", *[f"| {url} |" for url in s.truncated]]
    if s.failed:
        lines += ["", "| failed shard | attempts | last error |", "|---|---:|---|",
                  *[f"| {f['url']} | {f['attempts']} | {(f['errors'] or ['?'])[-1].replace('|', '/')} |"
                    for f in s.failed]]
    return "\n".join(lines)
