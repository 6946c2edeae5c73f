"""Training fails fast on unusable data (exit 2, reasons counted, likely fix) and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlcid.synthetic import SceneConfig, write_dataset
from model.training import checkpoint as ckpt
from model.training.config import DataConfig
from model.training.data_check import DataCheckError, check_training_data
from cli.main import layerdiff_main
from model.training.trainer import EXIT_BAD_INPUT
from tests.builders import make_sample, write_raw_shard, write_shards

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "model" / "configs" / "tiny.yaml")


def run(data: str, out: Path, steps: int, *extra: str) -> int:
    return layerdiff_main(["train", "--data", data, "--out", str(out), "--config", TINY, "--preset", "tiny",
                           "--max-steps", str(steps), *extra])


def test_missing_path_exits_2_naming_it(tmp_path, caplog):
    start = time.perf_counter()
    with caplog.at_level(logging.ERROR):
        assert run(str(tmp_path / "nowhere" / "mlcid-{000000..000003}.tar"), tmp_path / "run", 3) == EXIT_BAD_INPUT
    assert "4 of 4 shard path(s) do not exist" in caplog.text and "nowhere/mlcid-000000.tar" in caplog.text
    assert time.perf_counter() - start < 5  # before any model is loaded
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_raw_img2dataset_shards_exit_2_with_reasons_and_the_fix(tmp_path, caplog):
    write_dataset(tmp_path / "raw", tmp_path / "gt", 6, seed=0, shards=2, config=SceneConfig(size=32), progress=False)
    with caplog.at_level(logging.ERROR):
        assert run(str(tmp_path / "raw"), tmp_path / "run", 3) == EXIT_BAD_INPUT
    assert "no usable training sample in the first 6 item(s) of 2 of 2 shard(s)" in caplog.text
    assert "bad_schema: 6" in caplog.text  # the reasons, counted
    assert "raw img2dataset shards" in caplog.text and "build MLCID" in caplog.text
    check_training_data(str(tmp_path / "gt"), DataConfig())  # the MLCID built from them passes


def test_check_counts_layer_policy_and_stops_at_the_first_usable_sample(tmp_path):
    data = tmp_path / "mlcid"
    data.mkdir()
    write_raw_shard(data / "mlcid-000000.tar", [make_sample(f"big{i}", 40, 4, seed=i) for i in range(3)])
    with pytest.raises(DataCheckError, match=r"too_many_layers: 3.*raise it or set data.too_many_layers=truncate"):
        check_training_data(str(data), DataConfig(max_layers=4))
    write_raw_shard(data / "mlcid-000001.tar", [make_sample("ok", 40, 1)])
    found = check_training_data(str(data), DataConfig(max_layers=4))
    assert found.usable_key == "ok" and found.dropped == {"too_many_layers": 3} and found.items == 4
    with pytest.raises(DataCheckError, match=r"first 2 item\(s\).*look further with --set data.check_samples"):
        check_training_data(str(data), DataConfig(max_layers=4, check_samples=2))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("mlcid"), shards=2, per_shard=6, size=40, fg_counts=(1, 2, 3))


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(tiny_models, shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli", "layerdiff", "train", "--data", shards, "--out", str(out), "--config", TINY,
           "--preset", "tiny", "--max-steps", "100000", "--set", "checkpoint_every=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text
    assert "Traceback" not in text, text
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    last = ckpt.latest_checkpoint(out)
    assert last is not None and last.name == f"checkpoint-{steps[-1]:06d}"  # the step it stopped after
    assert f"checkpoint {last}" in text and "Resume with:" in text and "--resume" in text
    assert not (out / "model_index.json").exists()
    # the printed command continues the run
    resume = text.split("Resume with:")[1].strip().splitlines()[0]
    assert "--max-steps 100000" in resume
    assert layerdiff_main(["train", "--data", shards, "--out", str(out), "--config", TINY, "--preset", "tiny",
                           "--resume", "--max-steps", str(steps[-1] + 1)]) == 0
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [*steps, steps[-1] + 1]
