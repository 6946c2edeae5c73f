"""ShardPool mechanics with the real ShardProcessor (tiny preset): in-flight limit, retries, recycling, actor death."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import deque
from pathlib import Path

import psutil
import pytest
import ray

from mlcid.synthetic import SceneConfig, write_dataset
from mlcid.writer import read_stats, shard_name, stats_name
from pipelines.config import PipelineConfig
from pipelines.runner import ShardProcessor

from cluster.pool import PoolConfig, PoolError, ShardOutcome, ShardPool, ShardTask, _RunState, _Slot, PoolReport



class Recorder:
    """A PoolListener that keeps every event."""

    def __init__(self) -> None:
        self.shards: list[ShardOutcome] = []
        self.samples = 0
        self.retries: list[tuple[str, str]] = []

    def on_shard(self, outcome: ShardOutcome) -> None:
        self.shards.append(outcome)

    def on_samples(self, count: int) -> None:
        self.samples += count

    def on_retry(self, task: ShardTask, error: str) -> None:
        self.retries.append((task.key, error))


def tasks_for(urls: list[str]) -> list[ShardTask]:
    return [ShardTask(f"mlcid-{int(Path(u).stem):06d}", u) for u in urls]


def tar_keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers()}


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory) -> list[str]:
    """Three img2dataset-style shards × 4 synthetic scenes at 64 px."""
    root = tmp_path_factory.mktemp("raw")
    write_dataset(root / "raw", root / "gt", samples=12, seed=3, shards=3, config=SceneConfig(size=64),
                  progress=False)
    return [str(root / "raw" / f"{i:05d}.tar") for i in range(3)]


@pytest.fixture(scope="module")
def make_processor(tiny_models):
    return functools.partial(ShardProcessor, PipelineConfig.from_preset("tiny", max_side=64))


@pytest.fixture(scope="module")
def ray_cpus(tiny_models):
    """An in-process Ray with 2 logical CPUs, started after the tiny-model root is in the environment."""
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.environ["RAY_TMPDIR"], log_to_driver=False)
    yield 2
    ray.shutdown()


# -- no Ray needed ------------------------------------------------------------------------------------------
def test_pool_config_rejects_bad_values():
    with pytest.raises(ValueError, match="workers"):
        PoolConfig(workers=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        PoolConfig(max_in_flight=0)
    with pytest.raises(ValueError, match="CPUs or GPUs"):
        PoolConfig(num_cpus=0, num_gpus=0)
    assert PoolConfig(num_cpus=0.5).threads == 1 and PoolConfig(num_cpus=4).threads == 4


def test_duplicate_task_keys_are_refused(make_processor, tmp_path):
    pool = ShardPool(make_processor, tmp_path, PoolConfig())
    with pytest.raises(ValueError, match="unique"):
        pool.run([ShardTask("mlcid-000001", "a/00001.tar"), ShardTask("mlcid-000001", "b/00001.tar")])


def test_in_flight_limit_retries_and_failure_report(ray_cpus, raw_shards, make_processor, tmp_path):
    """One actor, ≤2 queued; an unreadable shard is retried max_retries times then reported; the rest finish."""
    bad = str(tmp_path / "missing" / "00007.tar")
    out = tmp_path / "out"
    rec = Recorder()
    pool = ShardPool(make_processor, out, PoolConfig(workers=1, max_in_flight=2, max_retries=1, poll_seconds=0.2),
                     rec)
    report = pool.run(tasks_for([raw_shards[0], bad, raw_shards[1]]))

    assert report.max_in_flight_seen == 2
    ok, failed, ok2 = report.outcomes
    assert ok.ok and ok2.ok and not failed.ok
    assert failed.attempts == 2 and len(failed.errors) == 2
    assert all("unreadable_shard" in e or "No such file" in e for e in failed.errors), failed.errors
    assert [k for k, _ in rec.retries] == ["mlcid-000007"]
    assert sorted(o.task.key for o in rec.shards) == ["mlcid-000000", "mlcid-000001", "mlcid-000007"]
    assert report.actors_started == 1 and report.actors_died == 0
    for o in (ok, ok2):
        sid = int(o.task.key.split("-")[1])
        stats = read_stats(out, sid)
        assert o.stats["read"] == stats["read"] == 4 and o.attempts == 1
        assert len(tar_keys(out / shard_name(sid))) == stats["written"]
    assert not (out / stats_name(7)).exists() and not (out / shard_name(7)).exists()
    assert not list(out.glob("*.tmp"))
    assert rec.samples == 8  # live counts from the actor reached the listener


def test_recycling_restarts_actors(ray_cpus, raw_shards, make_processor, tmp_path):
    pool = ShardPool(make_processor, tmp_path, PoolConfig(workers=1, recycle_every=1, max_in_flight=2))
    report = pool.run(tasks_for(raw_shards[:2]))
    assert all(o.ok for o in report.outcomes)
    assert report.actors_started == 2 and report.actors_recycled == 1
    assert report.max_in_flight_seen == 1  # a retiring actor takes no second shard
    assert len({o.pid for o in report.outcomes}) == 2


def test_killed_actor_mid_shard_is_replaced_and_its_shard_retried(ray_cpus, raw_shards, make_processor, tmp_path):
    """SIGKILL the actor process while it writes a shard: the shard is re-run on a new actor, nothing is lost."""
    out = tmp_path / "out"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if list(out.glob("*.tar.tmp")):
                for p in psutil.Process().children(recursive=True):
                    try:
                        if p.name().startswith("ray::ShardActor.process"):
                            p.send_signal(signal.SIGKILL)
                            killed.append(p.pid)
                            return
                    except psutil.Error:
                        continue
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    pool = ShardPool(make_processor, out, PoolConfig(workers=1, max_retries=1))
    report = pool.run(tasks_for(raw_shards[:2]))
    thread.join(timeout=5)

    assert killed, "the actor was never seen processing"
    assert all(o.ok for o in report.outcomes), [o.errors for o in report.outcomes]
    assert report.actors_died == 1 and report.actors_started == 2
    hit = [o for o in report.outcomes if o.attempts == 2]
    assert len(hit) == 1 and "died" in hit[0].errors[0]
    assert killed[0] not in {o.pid for o in report.outcomes}
    for o in report.outcomes:
        sid = int(o.task.key.split("-")[1])
        assert read_stats(out, sid)["read"] == 4
        assert len(tar_keys(out / shard_name(sid))) == read_stats(out, sid)["written"]


def test_actors_that_cannot_load_models_stop_the_pool(ray_cpus, raw_shards, tmp_path):
    broken = functools.partial(ShardProcessor, PipelineConfig.from_preset(
        "tiny", models={"owlv2": str(tmp_path / "no-such-model")}))
    pool = ShardPool(broken, tmp_path / "out", PoolConfig(workers=1, max_startup_failures=1))
    with pytest.raises(PoolError, match="loading their models") as e:
        pool.run(tasks_for(raw_shards[:1]))
    assert "no-such-model" in str(e.value)  # the exception that killed the actor is in the message
    assert not list((tmp_path / "out").glob("*.tar"))


class BadGpuProcessor(ShardProcessor):
    """The real tiny-preset processor; the FIRST actor to set up plays a broken GPU: its segment stage raises
    the CUDA error a faulty card gives. Its pid is written to `flag` so the test can tell the actors apart."""

    def __init__(self, config: PipelineConfig, flag: str) -> None:
        super().__init__(config)
        self.flag = flag

    def setup(self) -> "BadGpuProcessor":
        super().setup()
        try:
            fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        i = next(i for i, (k, _) in enumerate(self.stages) if k == "segment")

        def broken(batch):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        self.stages[i] = ("segment", broken)
        return self


def test_device_fault_replaces_the_actor_and_retries_the_shard_elsewhere(ray_cpus, raw_shards, tmp_path):
    flag = tmp_path / "bad-gpu.pid"
    make = functools.partial(BadGpuProcessor, PipelineConfig.from_preset("tiny", max_side=64), str(flag))
    out = tmp_path / "out"
    pool = ShardPool(make, out, PoolConfig(workers=1, max_in_flight=2, max_retries=1))
    report = pool.run(tasks_for(raw_shards[:2]))

    bad_pid = int(flag.read_text())
    first, second = report.outcomes
    assert first.ok and second.ok, [o.errors for o in report.outcomes]
    assert first.attempts == 2 and "illegal memory access" in first.errors[0]
    assert second.attempts == 1  # it was only queued behind the fault: put back without using a retry
    assert report.actors_faulted == 1 and report.actors_started == 2
    assert bad_pid not in {first.pid, second.pid}
    for o in report.outcomes:
        sid = int(o.task.key.split("-")[1])
        assert read_stats(out, sid)["read"] == 4 and "stage_error:segment" not in read_stats(out, sid)["dropped"]


def test_a_retried_shard_goes_to_an_actor_it_has_not_failed_on():
    a, b, c = (ShardTask(f"mlcid-00000{i}", f"{i:05d}.tar") for i in range(3))
    run = _RunState(deque([a, b, c]), PoolReport(outcomes=[]))
    run.failed_on[a] = {1}
    slot1, slot2 = _Slot(1, None, None), _Slot(2, None, None)
    assert ShardPool._next_task(run, slot1, {1, 2}) is b  # a failed on actor 1: skip it there
    assert ShardPool._next_task(run, slot2, {1, 2}) is a
    run.queue.appendleft(a)
    run.failed_on[a] = {1, 2}
    assert ShardPool._next_task(run, slot1, {1, 2}) is a  # failed everywhere alive: any actor may retry it
