"""Shard writer: samples contiguous, `.tmp` then rename, `_stats.json` written last (it marks completion)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mlcid.codec import encode_sample
from mlcid.errors import SampleError
from mlcid.schema import MLCIDSample
from mlcid.validate import ValidationConfig, validate_sample

DEFAULT_PREFIX = "mlcid"


def shard_name(shard_id: int, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}-{shard_id:06d}.tar"


def stats_name(shard_id: int, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}-{shard_id:06d}_stats.json"


def is_complete(out_dir: str | os.PathLike, shard_id: int, prefix: str = DEFAULT_PREFIX) -> bool:
    """A shard is complete iff its stats file exists."""
    return (Path(out_dir) / stats_name(shard_id, prefix)).exists()


def read_stats(out_dir: str | os.PathLike, shard_id: int, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    return json.loads((Path(out_dir) / stats_name(shard_id, prefix)).read_text())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Write one MLCID shard. Use as a context manager; an exception inside leaves no visible output.

    Every sample offered is counted once: `write()` (validated; an invalid one is counted as dropped with its
    reason) or `drop(reason)`. So `read == written + sum(dropped)` holds by construction.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_id: int,
        prefix: str = DEFAULT_PREFIX,
        config: ValidationConfig = ValidationConfig(),
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_id = shard_id
        self.prefix = prefix
        self.config = config
        self.path = self.out_dir / shard_name(shard_id, prefix)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.stats_path = self.out_dir / stats_name(shard_id, prefix)
        self.written = 0
        self.dropped: Counter[str] = Counter()
        self.layer_counts: Counter[int] = Counter()
        self.timings: Counter[str] = Counter()
        self.keys: set[str] = set()
        self._start = time.perf_counter()
        self._tar: tarfile.TarFile | None = None
        self._closed = False

    # -- context manager ------------------------------------------------------------------------------------
    def __enter__(self) -> "ShardWriter":
        self.stats_path.unlink(missing_ok=True)  # an old stats file must never vouch for new content
        self._tar = tarfile.open(self.tmp_path, "w", format=tarfile.GNU_FORMAT)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing --------------------------------------------------------------------------------------------
    def write(self, sample: MLCIDSample) -> bool:
        """Validate and append a sample; an invalid one is counted as dropped. Returns True if written."""
        if self._tar is None:
            raise RuntimeError("ShardWriter.write outside its `with` block")
        try:
            validate_sample(sample, self.config)
            if sample.key in self.keys:
                raise SampleError("duplicate_key", sample.key)
        except SampleError as e:
            self.dropped[e.reason] += 1
            return False
        members = encode_sample(sample)
        mtime = time.time()
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{sample.key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.add(sample.key)
        self.written += 1
        self.layer_counts[sample.num_layers] += 1
        return True

    def drop(self, reason: str, count: int = 1) -> None:
        """Count `count` input samples dropped for `reason`."""
        self.dropped[reason] += count

    def add_timing(self, name: str, seconds: float) -> None:
        self.timings[name] += seconds

    # -- finishing ------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "shard": self.path.name,
            "shard_id": self.shard_id,
            "read": self.written + sum(self.dropped.values()),
            "written": self.written,
            "dropped": dict(sorted(self.dropped.items())),
            "layer_counts": {str(k): v for k, v in sorted(self.layer_counts.items())},
            "timings": {k: round(v, 4) for k, v in sorted(self.timings.items())},
            "wall_seconds": round(time.perf_counter() - self._start, 4),
        }

    def close(self, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the tar, rename it into place, then write the stats file (last). Returns the stats."""
        if self._closed:
            raise RuntimeError("ShardWriter closed twice")
        assert self._tar is not None
        self._tar.close()
        with open(self.tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp_path, self.path)
        stats = self.stats() | (extra_stats or {})
        _atomic_write_bytes(self.stats_path, json.dumps(stats, indent=1, sort_keys=True).encode())
        self._closed = True
        return stats

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._tar is not None:
            self._tar.close()
        self.tmp_path.unlink(missing_ok=True)
        self._closed = True
