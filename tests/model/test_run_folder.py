"""A run folder on object storage (a real S3-compatible server on 127.0.0.1): train, resume, sample from the URL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.training import checkpoint as ckpt
from model.training.run_folder import RunFolder
from cli.main import layerdiff_main
from tests.builders import write_shards
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread on shared cores

TINY = str(Path(__file__).resolve().parents[2] / "model" / "configs" / "tiny.yaml")


def run(shards: str, out: str, steps: int, *extra: str) -> int:
    return layerdiff_main(["train", "--data", shards, "--out", out, "--config", TINY, "--preset", "tiny",
                           "--max-steps", str(steps), "--set", "checkpoint_every=2", "--set", "record_keys=true",
                           *extra])


def remote_lines(fs, path: str) -> list[dict]:
    return [json.loads(x) for x in fs.cat_file(path).decode().splitlines()]


def test_s3_run_folder_trains_resumes_exactly_and_loads_as_a_pipeline(tiny_models, s3_server, tmp_path):
    shards = write_shards(tmp_path / "mlcid", shards=2, per_shard=6, size=40, fg_counts=(1, 2, 3))
    url = s3_bucket("layerdiff") + "/runs/a"
    assert run(shards, str(tmp_path / "local"), 4) == 0  # the same run in a local folder
    assert run(shards, url, 2) == 0
    assert run(shards, url, 4) == 2  # checkpoints there: never silently restarted
    assert run(shards, url, 4, "--resume") == 0

    # 1. Rank 0 wrote metrics (every step once), TensorBoard, checkpoints (marker last) and the pipeline there.
    run_folder = RunFolder.open(url)
    fs, root = run_folder.fs, run_folder.root
    remote = remote_lines(fs, f"{root}/metrics.jsonl")
    local = [json.loads(x) for x in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in remote] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(remote, local)) <= 1e-6, (remote, local)
    assert fs.cat_file(f"{root}/keys-rank0.txt") == (tmp_path / "local" / "keys-rank0.txt").read_bytes()
    assert fs.glob(f"{root}/tb/events.out.tfevents.*")
    assert run_folder.checkpoints() == ["checkpoint-000002", "checkpoint-000004"]
    for member in (*ckpt.REQUIRED, ckpt.COMPLETE):
        assert fs.exists(f"{root}/checkpoint-000004/{member}"), member
    assert fs.exists(f"{root}/model_index.json") and fs.exists(f"{root}/config.yaml")

    # 2. A checkpoint whose upload stopped before complete.json is never taken for one.
    for f in fs.find(f"{root}/checkpoint-000004"):
        if not f.endswith(ckpt.COMPLETE):
            fs.copy(f, f.replace("checkpoint-000004", "checkpoint-000006"))
    assert run_folder.latest() == f"{url}/checkpoint-000004"
    run_folder.close()

    # 3. The sampler loads the URL (downloaded to the cache first): the same weights as the local run's.
    from model.sampling.pipeline import LayerDiffPipeline

    pipe = LayerDiffPipeline.from_pretrained(url)
    local_pipe = LayerDiffPipeline.from_pretrained(tmp_path / "local")
    for (name, a), b in zip(pipe.unet.state_dict().items(), local_pipe.unet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    out = pipe("a box", ["the background", "a red box"], num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.composites.shape == (1, 32, 32, 3) and out.masks.shape == (1, 2, 32, 32)
