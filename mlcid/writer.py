"""Shard writer on webdataset's `TarWriter`: samples contiguous, `.tmp` then rename, `_stats.json` last (it marks
completion). On top of webdataset: MLCID validation of each sample, duplicate keys refused, the counts.

The writer works in a local folder. Attached files (the runner's outcomes parquet) are published together with
the tar: both are renamed into place only after the tar is closed, then the stats file. A failure at any point
(a full disk included) removes everything of the shard, and `abort()` never raises over the first error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mlcid.codec import encode_sample
from mlcid.errors import SampleError
from mlcid.schema import MLCIDSample
from mlcid.storage import ShardStore
from mlcid.validate import ValidationConfig, validate_sample

DEFAULT_PREFIX = "mlcid"
log = logging.getLogger(__name__)


def shard_name(shard_id: int, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}-{shard_id:06d}.tar"


def stats_name(shard_id: int, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}-{shard_id:06d}_stats.json"


def is_complete(out_dir: str | os.PathLike, shard_id: int, prefix: str = DEFAULT_PREFIX) -> bool:
    """A shard is complete iff its stats file exists (`out_dir`: a local folder or an fsspec URL)."""
    return ShardStore(out_dir).exists(stats_name(shard_id, prefix))


def read_stats(out_dir: str | os.PathLike, shard_id: int, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    return json.loads(ShardStore(out_dir).read_bytes(stats_name(shard_id, prefix)))


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, data)
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
        self._tar: Any = None  # webdataset.TarWriter
        self._file: Any = None
        self._attached: list[str] = []  # names of files published with the tar (e.g. the outcomes parquet)
        self._closed = False

    # -- context manager ------------------------------------------------------------------------------------
    def _open_tmp(self) -> Any:
        """The binary file the tar is written to (a test replaces it with one that fills up)."""
        return open(self.tmp_path, "wb")

    def __enter__(self) -> "ShardWriter":
        from webdataset.writer import TarWriter  # imports torch: only when a shard is written

        self.stats_path.unlink(missing_ok=True)  # an old stats file must never vouch for new content
        self._file = self._open_tmp()
        # Bytes in, bytes out (encoder=False); an integer mtime keeps the ustar headers free of pax records.
        self._tar = TarWriter(self._file, user="", group="", mode=0o644, encoder=False, mtime=int(time.time()))
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
        self._tar.write({"__key__": sample.key, **encode_sample(sample)})  # members in suffix order
        self.keys.add(sample.key)
        self.written += 1
        self.layer_counts[sample.num_layers] += 1
        return True

    def drop(self, reason: str, count: int = 1) -> None:
        """Count `count` input samples dropped for `reason`."""
        self.dropped[reason] += count

    def add_timing(self, name: str, seconds: float) -> None:
        self.timings[name] += seconds

    def attach(self, name: str, data: bytes) -> None:
        """Write `name` beside the shard as `.tmp` now; `close` renames it into place after the tar, before stats."""
        if name in (self.path.name, self.stats_path.name) or "/" in name:
            raise ValueError(f"cannot attach {name!r} to shard {self.path.name}")
        _write_synced(self.out_dir / f"{name}.tmp", data)
        self._attached.append(name)

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

    @property
    def names(self) -> list[str]:
        """The files a complete shard consists of, in publication order (the stats file last)."""
        return [self.path.name, *self._attached, self.stats_path.name]

    def close(self, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the tar, rename it and the attachments into place, then write the stats file (last).

        Returns the stats. On any failure (e.g. ENOSPC) every file of the shard is removed and the error raised.
        """
        if self._closed:
            raise RuntimeError("ShardWriter closed twice")
        assert self._tar is not None and self._file is not None
        try:
            self._tar.close()  # end-of-archive blocks (our file stays open: TarWriter did not open it)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp_path, self.path)
            for name in self._attached:
                os.replace(self.out_dir / f"{name}.tmp", self.out_dir / name)
            stats = self.stats() | (extra_stats or {})
            _atomic_write_bytes(self.stats_path, json.dumps(stats, indent=1, sort_keys=True).encode())
        except BaseException:
            self.abort(published=True)
            raise
        self._closed = True
        return stats

    def abort(self, published: bool = False) -> None:
        """Discard everything written so far (with `published`, also files already renamed). Never raises."""
        if self._tar is not None:  # write no end-of-archive blocks, nor (at garbage collection) buffered bytes
            self._tar.tarstream.closed = True
            self._tar.tarstream.fileobj.closed = True
        if self._file is not None:
            try:
                self._file.close()  # flushing may fail again (disk full): the first error is the one raised
            except OSError as e:
                log.debug("closing %s while aborting: %s", self.tmp_path, e)
        tmps = [self.tmp_path, *(self.out_dir / f"{n}.tmp" for n in self._attached),
                self.stats_path.with_name(self.stats_path.name + ".tmp")]
        finals = [self.path, *(self.out_dir / n for n in self._attached), self.stats_path] if published else []
        for path in tmps + finals:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not remove %s while aborting: %s", path, e)
        self._closed = True
