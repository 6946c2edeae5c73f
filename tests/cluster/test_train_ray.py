"""Ray Train launcher: 2 CPU DDP workers (gloo) train the tiny model; ranks never share a sample within an epoch."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.training import checkpoint as ckpt
from model.training.trainer import main
from tests.builders import write_shards

TINY = str(Path(__file__).resolve().parents[2] / "model" / "configs" / "tiny.yaml")


def test_two_gloo_workers_train_on_disjoint_data(tiny_models, tmp_path):
    # 4 shards × 4 samples, no resampling: one epoch = 8 samples per rank; 3 steps × 2 samples per rank stay inside it
    shards = write_shards(tmp_path / "mlcid", shards=4, per_shard=4, size=40, fg_counts=(1, 2))
    out = tmp_path / "run"
    rc = main(["--data", shards, "--out", str(out), "--config", TINY, "--preset", "tiny", "--max-steps", "3",
               "--workers", "2", "--set", "batch_size=4", "--set", "data.resample=false",
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
