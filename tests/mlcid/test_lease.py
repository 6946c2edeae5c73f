"""Shard leases on a local folder and on a real S3 server: exclusive, renewed while alive, freed when the holder dies."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import pytest

from mlcid.lease import Lease, LeaseConfig, LeaseLost, LeaseTimeout
from mlcid.storage import ShardStore
from tests.s3_server import s3_server  # noqa: F401 — fixture

FAST = LeaseConfig(ttl_s=1.0, renew_every_s=0.2, wait_s=0.0, poll_s=0.05)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ShardStore:
    if request.param == "local":
        return ShardStore(tmp_path / "out")
    request.getfixturevalue("s3_server")
    import s3fs

    bucket = f"lease-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return ShardStore(f"s3://{bucket}/mlcid")


def test_only_one_of_many_contenders_gets_the_lease(store):
    # a TTL far beyond any stall of a loaded machine: this test is about exclusive creation, not expiry
    steady = LeaseConfig(ttl_s=60.0, renew_every_s=5.0, wait_s=0.0, poll_s=0.05)
    leases = [Lease(store, "mlcid-000001", steady) for _ in range(6)]
    won, start, race = [], threading.Barrier(len(leases)), threading.Barrier(len(leases))
    def first_create_waits(real):
        """Every contender has listed "no lease yet" before any of them creates one; a later create (a loser
        taking over a lease that looked stale on a loaded machine) must not wait for the others again."""
        calls = []

        def create(gen):
            if not calls:
                calls.append(gen)
                race.wait(timeout=60)
            return real(gen)
        return create

    for lease in leases:
        lease._create = first_create_waits(lease._create)

    def contend(lease: Lease) -> None:
        start.wait(timeout=60)
        try:
            lease.acquire()
            won.append(lease)
        except LeaseTimeout:
            pass

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].check()
    won[0].release()
    nxt = Lease(store, "mlcid-000001", FAST)
    assert nxt.acquire() < 0.5  # a released lease is free at once


def test_a_renewed_lease_outlives_its_ttl_and_a_stalled_one_is_taken_over(store):
    cfg = LeaseConfig(ttl_s=1.0, renew_every_s=0.2, wait_s=2.5, poll_s=0.05)
    holder = Lease(store, "mlcid-000002", cfg)
    with holder:
        with pytest.raises(LeaseTimeout):  # 2.5 s of waiting > 1 s ttl: the renewal thread kept it alive
            Lease(store, "mlcid-000002", cfg).acquire()
        holder.check()
    # A holder that stops renewing (no thread: a stalled process) loses the lease after ttl; it must not publish.
    stalled = Lease(store, "mlcid-000003", cfg)
    stalled.acquire()
    taker = Lease(store, "mlcid-000003", cfg)
    assert taker.acquire() >= 0.5
    with pytest.raises(LeaseLost):
        stalled.check()
    taker.check()


def test_a_killed_holder_frees_the_lease_before_its_ttl(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from mlcid.lease import Lease, LeaseConfig; from mlcid.storage import ShardStore;"
            f"Lease(ShardStore({str(out)!r}), 'mlcid-000004', LeaseConfig(ttl_s=600)).acquire();"
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseTimeout):
            Lease(ShardStore(out), "mlcid-000004", LeaseConfig(ttl_s=600, wait_s=0.3, poll_s=0.05)).acquire()
        proc.kill()
        proc.wait()
        t0 = time.perf_counter()
        Lease(ShardStore(out), "mlcid-000004", LeaseConfig(ttl_s=600, wait_s=5, poll_s=0.05)).acquire()
        assert time.perf_counter() - t0 < 2  # not the 600 s ttl: the holder's pid is gone on this host
    finally:
        proc.kill()


def test_lease_config_rejects_bad_values():
    with pytest.raises(ValueError):
        LeaseConfig(ttl_s=0)
    with pytest.raises(ValueError):
        LeaseConfig(ttl_s=10, renew_every_s=10)


def test_a_local_lease_appears_with_its_record_never_empty(tmp_path, monkeypatch):
    """A contender that lists the lease while its creator is still writing must read a live record: an empty file
    reads as torn (not live) and would be taken over (seen in CI as three holders of one lease)."""
    import builtins
    import json

    import mlcid.lease as lease_mod

    class SlowFile:  # the creator's write stalls halfway, as on a loaded machine
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:5])
            self.f.flush()
            time.sleep(0.3)
            return self.f.write(data[5:]) + 5

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(lease_mod, "open", lambda *a, **k: SlowFile(builtins.open(*a, **k)), raising=False)
    store = ShardStore(tmp_path / "out")
    holder = Lease(store, "mlcid-000002", LeaseConfig(ttl_s=60.0, renew_every_s=5.0, wait_s=0.0, poll_s=0.05))
    seen, done = [], threading.Event()

    def watch() -> None:
        path = tmp_path / "out" / lease_mod.LEASE_DIR / "mlcid-000002" / "00000001.json"
        while not done.is_set():
            if path.exists():
                seen.append(path.read_bytes())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    holder.acquire()
    time.sleep(0.05)  # the watcher sees the published lease too
    done.set()
    watcher.join()
    assert seen, "the watcher never saw the lease"
    assert all(lease_mod.is_live(json.loads(b)) for b in seen), [b[:20] for b in seen]
    holder.release()
