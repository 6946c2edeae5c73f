"""Whole-shard checks: every sample of a shard read strictly and validated, and whether an empty shard is by design."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlcid.errors import SampleError
from mlcid.reader import iter_shard_samples
from mlcid.stats import load_shard_stats
from mlcid.validate import ValidationConfig


def validate_shard(path: str, config: ValidationConfig = ValidationConfig()) -> tuple[int, dict[str, int]]:
    """Read every sample of one shard strictly; return (valid count, {reason: count})."""
    valid, bad = 0, {}
    for item in iter_shard_samples(path, config=config):
        if isinstance(item, SampleError):
            bad[item.reason] = bad.get(item.reason, 0) + 1
        else:
            valid += 1
    return valid, bad


@dataclass
class ShardCheck:
    """The verdict on one shard: `ok` when no sample is invalid and it holds samples (or its stats say why not)."""

    url: str
    valid: int
    invalid: dict[str, int] = field(default_factory=dict)
    empty_by_design: bool = False  # no samples, and its stats file records that every input was dropped

    @property
    def ok(self) -> bool:
        return not self.invalid and (self.valid > 0 or self.empty_by_design)

    def describe(self) -> str:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(self.invalid.items()))
        if not detail and not self.valid:
            detail = "empty: its stats record every input dropped" if self.empty_by_design else "no samples"
        return f"{'OK  ' if self.ok else 'FAIL'} {self.url}: {self.valid} valid" + (f"; {detail}" if detail else "")


def check_shard(url: str, config: ValidationConfig = ValidationConfig()) -> ShardCheck:
    """Validate every sample of `url`; an empty shard passes only when its stats record `written == 0`."""
    valid, bad = validate_shard(url, config)
    empty_by_design = False
    if not valid:
        record = load_shard_stats(url)
        empty_by_design = record.stats is not None and record.stats.get("written") == 0
    return ShardCheck(url, valid, bad, empty_by_design)
