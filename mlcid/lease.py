"""Shard leases on any `ShardStore` (local folder or object store) — no `flock`, so s3fs/gcsfuse/Mountpoint work.

Within one build the driver owns the assignment (one shard, one actor at a time). A lease guards against what the
driver cannot see: a worker left over from a killed driver, a second driver on the same output, a node cut off
from the cluster. A lease is a sequence of generation objects `OUT/.leases/KEY/NNNNNNNN.json`, each
`{owner, host, pid, start, expires}`:

- acquire: if the newest generation is live (not expired, not released, its process not known dead), wait;
  otherwise CREATE the next generation with create-exclusive semantics (`O_EXCL` locally; S3's
  `If-None-Match: *` through fsspec `mode="create"`). Of two contenders exactly one creates it.
- renew: a background thread rewrites the holder's own generation with a later expiry every `renew_every_s`,
  for as long as the process lives — a shard that runs for hours never loses its lease while alive.
- lost: when a newer generation exists the holder has lost the lease (it stalled past `ttl_s`); `check()` raises
  `LeaseLost`, and the runner calls it right before publishing, so a stale holder never publishes.
- a holder that died is recognised at once on its own host (pid gone or reused), elsewhere after `ttl_s`.
Clocks of the hosts are assumed to agree to well within `ttl_s`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mlcid.storage import ShardStore

log = logging.getLogger(__name__)

LEASE_DIR = ".leases"


class LeaseLost(RuntimeError):
    """Another owner took the lease (this holder stalled past its expiry); do not publish."""


class LeaseTimeout(TimeoutError):
    """A live owner held the lease for longer than this contender may wait."""


@dataclass
class LeaseConfig:
    ttl_s: float = 300.0  # a lease not renewed for this long may be taken over
    renew_every_s: float | None = None  # default ttl_s / 5
    wait_s: float = 7200.0  # how long to wait for a live owner before giving up (the pool then retries)
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.wait_s < 0 or self.poll_s <= 0:
            raise ValueError(f"bad lease timing: ttl {self.ttl_s}, wait {self.wait_s}, poll {self.poll_s}")
        if self.renew_every_s is not None and not 0 < self.renew_every_s < self.ttl_s:
            raise ValueError(f"renew_every_s must be in (0, ttl_s), got {self.renew_every_s}")

    @property
    def renew_interval(self) -> float:
        return self.renew_every_s or self.ttl_s / 5


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), to tell a live holder from a reused pid; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _holder_dead(record: dict[str, Any]) -> bool:
    """True only when the holder is on THIS host and its process is gone (or its pid now names another one)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    if not os.path.exists("/proc/self/stat"):
        return False
    start = _process_start(record["pid"])
    return start is None or (record.get("start") is not None and start != record["start"])


def is_live(record: dict[str, Any], now: float | None = None) -> bool:
    now = time.time() if now is None else now
    return not record.get("released") and now < float(record.get("expires", 0)) and not _holder_dead(record)


class Lease:
    """Exclusive, renewed ownership of `key` in `store`. `with Lease(...) as waited:` acquires and renews."""

    def __init__(self, store: ShardStore, key: str, config: LeaseConfig | None = None) -> None:
        self.store, self.key = store, key
        self.config = config or LeaseConfig()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation: int | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- storage ----------------------------------------------------------------------------------------------
    def _name(self, gen: int) -> str:
        return f"{LEASE_DIR}/{self.key}/{gen:08d}.json"

    def _generations(self) -> list[int]:
        folder = self.store.path(f"{LEASE_DIR}/{self.key}")
        self.store.fs.invalidate_cache(folder)
        try:
            names = self.store.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        gens = [str(n).rstrip("/").rsplit("/", 1)[-1].removesuffix(".json") for n in names]
        return sorted(int(g) for g in gens if g.isdigit())

    def _read(self, gen: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(self._name(gen)))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as not live
            return {}

    def _record(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": pid,
                           "start": _process_start(pid), "expires": time.time() + self.config.ttl_s}).encode()

    def _create(self, gen: int) -> bool:
        """Create generation `gen` if nobody has; True when this call created it."""
        name, data = self._name(gen), self._record()
        if self.store.local:
            # The record is written to a private file first and then hard-linked into place: link() fails when the
            # name exists and publishes the name with its content in one step. (open "xb" then write would show
            # the others an empty file, which reads as a torn, not-live lease they may take over.)
            path = self.store.path(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "xb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            self.store.fs.pipe_file(self.store.path(name), data, mode="create")
        except FileExistsError:
            return False
        return True

    # -- protocol ---------------------------------------------------------------------------------------------
    def acquire(self) -> float:
        """Wait until the lease is free, take it; returns the seconds waited. Raises `LeaseTimeout`."""
        t0 = time.perf_counter()
        while True:
            gens = self._generations()
            latest = self._read(gens[-1]) if gens else None
            if gens and latest is None:
                continue  # removed while we listed: list again
            if latest is None or not is_live(latest) or latest.get("owner") == self.owner:
                gen = gens[-1] + 1 if gens else 1
                if self._create(gen):
                    self.generation = gen
                    self._prune(gens)
                    return time.perf_counter() - t0
                continue  # another contender created it first
            if time.perf_counter() - t0 > self.config.wait_s:
                raise LeaseTimeout(f"lease {self.store.uri(self._name(gens[-1]))} held by {latest.get('owner')} "
                                   f"for more than {self.config.wait_s:.0f}s")
            time.sleep(self.config.poll_s)

    def _prune(self, older: list[int]) -> None:
        for gen in older:
            try:
                self.store.remove(self._name(gen))
            except OSError as e:
                log.debug("could not prune %s: %s", self._name(gen), e)

    def check(self) -> None:
        """Raise `LeaseLost` unless this holder's generation is still the newest."""
        if self.generation is None:
            raise LeaseLost(f"lease of {self.key} was never acquired")
        if self.lost.is_set() or self._generations()[-1:] != [self.generation]:
            self.lost.set()
            raise LeaseLost(f"lease of {self.key} was taken over (this holder stalled past {self.config.ttl_s:.0f}s)")

    def renew(self) -> None:
        """Push the expiry `ttl_s` into the future; raises `LeaseLost` when someone took it over."""
        self.check()
        self.store.write_bytes(self._name(self.generation), self._record())

    def release(self) -> None:
        if self.generation is None or self.lost.is_set():
            return
        try:
            if self._generations()[-1:] == [self.generation]:
                self.store.write_bytes(self._name(self.generation), json.dumps(
                    {"owner": self.owner, "released": True, "expires": 0}).encode())
        except Exception as e:  # noqa: BLE001 — an unreleased lease simply expires
            log.warning("could not release lease of %s: %s", self.key, e)

    # -- renewal thread ---------------------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.config.renew_interval):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except Exception as e:  # noqa: BLE001 — storage hiccup: try again next tick
                log.warning("renewing lease of %s failed (%s); retrying", self.key, e)

    def __enter__(self) -> float:
        waited = self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return waited

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()
