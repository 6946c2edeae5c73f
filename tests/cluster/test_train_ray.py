"""Ray Train launcher: 2 CPU DDP workers (gloo) on disjoint data; a killed worker is restarted; NaN is not retried."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from cluster.ray_env import RayEnvConfig, ray_session
from cli.main import layerdiff_main
from cluster.train import LaunchConfig, launch
from model.training import checkpoint as ckpt
from model.training.config import load_config
from model.training.outcome import EXIT_DIVERGED
from model.training.run_folder import RunFolder
from tests.builders import write_shards
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 (fixture)

TINY = str(Path(__file__).resolve().parents[2] / "model" / "configs" / "tiny.yaml")


def test_two_gloo_workers_train_on_disjoint_data(tiny_models, tmp_path):
    # 4 shards × 4 samples, no resampling: one epoch = 8 samples per rank; 3 steps × 2 samples per rank stay inside it
    shards = write_shards(tmp_path / "mlcid", shards=4, per_shard=4, size=40, fg_counts=(1, 2))
    out = tmp_path / "run"
    rc = layerdiff_main(["train", "--data", shards, "--out", str(out), "--config", TINY, "--preset", "tiny",
                         "--max-steps", "3", "--workers", "2", "--set", "batch_size=4", "--set", "data.resample=false",
                         "--set", "record_keys=true", "--set", "checkpoint_every=3", "--set", "data.shuffle_buffer=0"])
    assert rc == 0
    keys = {r: [ln.split("\t")[1] for ln in (out / f"keys-rank{r}.txt").read_text().splitlines()] for r in (0, 1)}
    assert len(keys[0]) == len(keys[1]) == 6
    assert len(set(keys[0])) == 6 and len(set(keys[1])) == 6  # no repeat inside a rank's epoch
    assert not set(keys[0]) & set(keys[1])  # ranks read disjoint shards
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    cp = out / "checkpoint-000003"
    state = ckpt.read_state(cp)
    assert state.world_size == 2 and len(state.data) == 2 and state.samples_seen == 12
    rng = torch.load(cp / "rng.pt", weights_only=True)
    assert len(rng) == 2 and not torch.equal(rng[0]["generators"]["cpu"], rng[1]["generators"]["cpu"])
    assert (out / "model_index.json").is_file() and (out / "unet" / ckpt.WEIGHTS).is_file()


# -- a lost worker is not a lost run ---------------------------------------------------------------------------------


def _ray_train_workers() -> list[psutil.Process]:
    """Ray Train worker processes started by this test process's Ray (descendants only: other Ray sessions may run)."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "ray::RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and me in {p.pid for p in proc.parents()}:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _kill_one_worker_after(url: str, checkpoint: str, final: str, report: dict) -> None:
    """Wait for `checkpoint` to be complete in the run folder, then SIGKILL one Ray Train worker."""
    run = RunFolder.open(url)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            names = run.checkpoints()
            if checkpoint in names:
                workers = _ray_train_workers()
                if workers:
                    report["final_existed"] = final in names
                    victim = max(workers, key=lambda p: p.pid)
                    report["killed"] = victim.pid
                    os.kill(victim.pid, signal.SIGKILL)
                    return
            time.sleep(0.1)
    finally:
        run.close()


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_and_losses_match_an_uninterrupted_run(tiny_models, s3_server, tmp_path):
    """2 gloo workers, run folder on a local S3 server; SIGKILL one worker after checkpoint 4 of 16 steps."""
    shards = write_shards(tmp_path / "mlcid", shards=4, per_shard=6, size=40, fg_counts=(1, 2, 3))
    bucket = s3_bucket("layerdiff-ray")
    config = load_config(TINY, ["max_steps=16", "batch_size=4", "checkpoint_every=2", "keep_checkpoints=0"])
    start = time.perf_counter()
    with ray_session(RayEnvConfig(num_cpus=4)):
        launch(config, shards, f"{bucket}/plain", LaunchConfig(workers=2, max_failures=0))
        report: dict = {}
        killer = threading.Thread(target=_kill_one_worker_after,
                                  args=(f"{bucket}/killed", "checkpoint-000004", "checkpoint-000016", report))
        killer.start()
        launch(config, shards, f"{bucket}/killed", LaunchConfig(workers=2, max_failures=2))
        killer.join()
    seconds = time.perf_counter() - start
    assert report.get("killed") and report["final_existed"] is False, report  # killed mid-run
    run = RunFolder.open(f"{bucket}/killed")
    fs = run.fs
    plain = [json.loads(x) for x in fs.cat_file(f"layerdiff-ray/plain/metrics.jsonl").decode().splitlines()]
    killed = [json.loads(x) for x in fs.cat_file(f"layerdiff-ray/killed/metrics.jsonl").decode().splitlines()]
    assert [m["step"] for m in killed] == list(range(1, 17))  # every step once
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(plain, killed)) <= 1e-5, (plain, killed)
    assert len(fs.glob("layerdiff-ray/killed/tb/events.out.tfevents.*")) == 2  # rank 0 was restarted once
    assert fs.exists("layerdiff-ray/killed/model_index.json")
    run.close()
    from model.sampling.pipeline import LayerDiffPipeline  # the two-worker run samples from its URL

    pipe = LayerDiffPipeline.from_pretrained(f"{bucket}/killed")
    out = pipe("a box", ["the background", "a red box"], num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.composites.shape == (1, 32, 32, 3)
    print(f"kill-a-worker test: two 2-worker fits in {seconds:.1f} s")


@pytest.mark.slow
def test_nan_divergence_exits_3_and_is_not_retried(tiny_models, tmp_path, monkeypatch):
    """A worker whose loss turns NaN: the driver exits 3 although Ray may restart workers (max_failures=2)."""
    shards = write_shards(tmp_path / "mlcid", shards=2, per_shard=4, size=40, fg_counts=(1, 2))
    out = tmp_path / "run"
    rc = layerdiff_main(["train", "--data", shards, "--out", str(out), "--config", TINY, "--preset", "tiny",
                         "--max-steps", "6", "--workers", "2", "--max-failures", "2", "--set", "batch_size=4",
                         "--set", "checkpoint_every=1", "--set", "lr=1e30", "--set", "max_grad_norm=0", "--set", "warmup_steps=0"])
    assert rc == EXIT_DIVERGED
    message = json.loads((out / "diverged.json").read_text())["message"]
    assert "training diverged at step" in message
    assert not (out / "model_index.json").exists()
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # one attempt: Ray did not restart it
