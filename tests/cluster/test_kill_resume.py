"""SIGKILL the build (driver or a worker) mid-run, re-run, and get exactly the keys of an uninterrupted run.

The driver runs as a real subprocess (`mlcid build`, tiny preset, in-process Ray). The reference
is the same `ShardProcessor` run sequentially, uninterrupted, into another folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from mlcid.synthetic import SceneConfig, write_dataset
from mlcid.writer import read_stats
from pipelines.config import PipelineConfig
from pipelines.runner import ShardProcessor
from tests.s3_server import s3_server  # noqa: F401 — fixture

REPO = Path(__file__).resolve().parents[2]
SHARDS = 3
PER_SHARD = 6
MAX_SIDE = 64


def shard_keys(folder: Path) -> dict[int, set[str]]:
    """{shard id: keys} of every complete shard (tar + stats) in `folder`."""
    out = {}
    for stats in sorted(folder.glob("mlcid-*_stats.json")):
        sid = int(stats.name.split("-")[1].split("_")[0])
        with tarfile.open(folder / f"mlcid-{sid:06d}.tar") as tar:
            out[sid] = {m.name.split(".", 1)[0] for m in tar.getmembers()}
    return out


def assert_clean_and_equal(out: Path, ref: Path) -> None:
    """Every shard complete, no `.tmp` left, no tar without stats, and (shard, key) sets equal the reference."""
    assert not list(out.glob("*.tmp")), list(out.glob("*.tmp"))
    tars = {p.name[: -len(".tar")] for p in out.glob("mlcid-*.tar")}
    stats = {p.name[: -len("_stats.json")] for p in out.glob("mlcid-*_stats.json")}
    assert tars == stats == {f"mlcid-{i:06d}" for i in range(SHARDS)}
    got, want = shard_keys(out), shard_keys(ref)
    assert got == want
    for sid in range(SHARDS):
        s = read_stats(out, sid)
        assert s["read"] == PER_SHARD == s["written"] + sum(s["dropped"].values())
        assert s["written"] == read_stats(ref, sid)["written"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Raw shards (3 × 6 scenes at 64 px) and the uninterrupted sequential reference output."""
    root = tmp_path_factory.mktemp("kill")
    write_dataset(root / "raw", root / "gt", samples=SHARDS * PER_SHARD, seed=11, shards=SHARDS,
                  config=SceneConfig(size=64), progress=False)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as inside a 1-CPU actor
    try:
        proc = ShardProcessor(PipelineConfig.from_preset("tiny", max_side=MAX_SIDE)).setup()
        for i in range(SHARDS):
            proc.process(str(root / "raw" / f"{i:05d}.tar"), str(root / "ref"))
    finally:
        torch.set_num_threads(threads)
    assert sum(len(k) for k in shard_keys(root / "ref").values()) > 0, "reference run wrote nothing"
    return {"raw": root / "raw", "ref": root / "ref", "root": root}


def driver_cmd(raw: Path, out: Path | str, summary: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "mlcid", "build", "--shards", str(raw / f"{{00000..{SHARDS - 1:05d}}}.tar"),
            "--out", str(out), "--preset", "tiny", "--max-side", str(MAX_SIDE), "--workers", "1",
            "--num-cpus", "2", "--no-progress", "--log-level", "WARNING", "--summary-json", str(summary), *extra]


def driver_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # always an in-process Ray of its own
    return env


@contextmanager
def driver(cmd: list[str]) -> Iterator[subprocess.Popen]:
    """Start the driver; on exit SIGKILL it if alive and reap every process it ever started (Ray's included).

    Descendants are recorded while the driver lives (a thread polls them), because once it is SIGKILLed its
    children are re-parented and can no longer be found from its pid.
    """
    proc = subprocess.Popen(cmd, cwd=REPO, env=driver_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen: dict[int, psutil.Process] = {}
    stop = threading.Event()

    def record() -> None:
        while not stop.is_set() and proc.poll() is None:
            try:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(p.pid, p)
            except psutil.Error:
                pass
            stop.wait(0.1)

    watcher = threading.Thread(target=record, daemon=True)
    watcher.start()
    try:
        yield proc
    finally:
        stop.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate(timeout=30)
        _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
        for p in alive:  # Ray's agents outlive a SIGKILLed driver for a while
            try:
                p.kill()
            except psutil.Error:
                pass


def actor_processes(pid: int, prefix: str = "ray::ShardActor") -> list[psutil.Process]:
    """Descendants of `pid` whose process title starts with `prefix` (Ray names workers `ray::Class.method`)."""
    found = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    for p in children:
        try:
            if p.name().startswith(prefix):
                found.append(p)
        except psutil.Error:
            continue
    return found


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"driver exited (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def run_to_end(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    with driver(cmd) as proc:
        out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def test_sigkill_driver_mid_shard_then_rerun_gives_the_uninterrupted_keys(data, tmp_path):
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    cmd = driver_cmd(data["raw"], out, summary)
    # 1. Kill the driver (-9) while a shard is half written, after at least one shard is complete.
    with driver(cmd) as proc:
        wait_for(lambda: bool(list(out.glob("*_stats.json"))) and bool(list(out.glob("*.tar.tmp"))), 300,
                 "a complete shard and one being written", proc)
        actors = actor_processes(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        for p in actors:  # an orphaned actor would otherwise finish its shard after the driver died
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait()
    # Every process of the run is gone now: what is published is what the re-run finds.
    complete = len(list(out.glob("*_stats.json")))  # a shard is complete once its stats are published
    assert 1 <= complete < SHARDS, "the run finished before it could be killed"
    assert len(shard_keys(out)) < SHARDS
    # 2. Re-run: complete shards are skipped, the rest rebuilt; the result equals the uninterrupted run.
    run_to_end(cmd)
    assert_clean_and_equal(out, data["ref"])
    s = json.loads(summary.read_text())
    assert s["shards_failed"] == 0
    assert (s["shards_skipped"], s["shards_processed"]) == (complete, SHARDS - complete)  # finished ones not redone


@pytest.mark.slow
def test_sigkill_worker_mid_shard_the_driver_retries_it(data, tmp_path):
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    killed: list[int] = []
    with driver(driver_cmd(data["raw"], out, summary, "--max-retries", "1")) as proc:
        def kill_worker() -> bool:
            if not list(out.glob("*.tar.tmp")):
                return False
            for p in actor_processes(proc.pid, "ray::ShardActor.process"):
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    continue
                killed.append(p.pid)
                return True
            return False

        wait_for(kill_worker, 300, "a worker processing a shard", proc)
        text, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, text[-3000:]
    s = json.loads(summary.read_text())
    assert s["actors_died"] == 1 and s["shards_failed"] == 0 and s["shards_processed"] == SHARDS
    assert_clean_and_equal(out, data["ref"])


@pytest.mark.slow
@pytest.mark.parametrize("delays", [(0.0, 1.0), (2.5, 0.3)])
def test_repeated_driver_kills_at_various_moments(data, tmp_path, delays):
    """Kill twice at different moments after work starts (incl. during actor start-up), then finish."""
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    cmd = driver_cmd(data["raw"], out, summary)
    for delay in delays:
        with driver(cmd) as proc:
            wait_for(lambda: bool(actor_processes(proc.pid)), 300, "an actor", proc)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    run_to_end(cmd)
    assert_clean_and_equal(out, data["ref"])


@pytest.mark.slow  # ~2 min on a loaded 2-core machine: two driver starts with Ray
def test_sigkill_driver_writing_to_s3_then_resume_validates(data, tmp_path, s3_server):
    """--out s3://…: SIGKILL the driver while a shard holds its lease, re-run, and `mlcid.validate s3://…` passes."""
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = f"kill-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    out = f"s3://{bucket}/run/mlcid"
    summary = tmp_path / "summary.json"
    cmd = driver_cmd(data["raw"], out, summary)  # type: ignore[arg-type]

    def leased() -> bool:  # a worker holds a shard's lease: it is building that shard right now
        fs.invalidate_cache()
        return bool(fs.find(f"{bucket}/run/mlcid/.leases"))

    # 1. Kill the driver (-9) while a shard is being built (its lease object exists).
    with driver(cmd) as proc:
        wait_for(leased, 300, "a shard lease on S3", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    fs.invalidate_cache()
    done_before = len(fs.glob(f"{bucket}/run/mlcid/*_stats.json"))
    assert done_before < SHARDS, "the run finished before it could be killed"
    # 2. Re-run to the end: it resumes from the remote listing and writes the same keys.
    run_to_end(cmd)
    s = json.loads(summary.read_text())
    assert s["shards_failed"] == 0 and s["shards_skipped"] >= done_before
    local = tmp_path / "downloaded"
    local.mkdir()
    fs.invalidate_cache()  # this process listed the prefix before the re-run wrote to it
    for name in fs.ls(f"{bucket}/run/mlcid", detail=False):
        if not name.endswith("/.leases") and fs.isfile(name):
            fs.get_file(name, str(local / name.rsplit("/", 1)[-1]))
    assert_clean_and_equal(local, data["ref"])
    # 3. The validator reads the prefix straight from S3.
    check = subprocess.run([sys.executable, "-m", "mlcid.validate", out], cwd=REPO, env=driver_env(),
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("OK   s3://") == SHARDS
