"""Validation samples while training: a grid per `validation_every` steps (TensorBoard + PNG), hparams, EMA swap."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.training.ema import EMA
from cli.main import layerdiff_main
from model.training.validation import ema_weights, grid, loss_curve
from tests.builders import write_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread on shared cores

TINY = str(Path(__file__).resolve().parents[2] / "model" / "configs" / "tiny.yaml")


def event_tags(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = set()
    for path in run.glob("tb/events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_validation_grid_every_n_steps_to_png_and_tensorboard(tiny_models, tmp_path, caplog):
    shards = write_shards(tmp_path / "mlcid", shards=2, per_shard=4, size=40, fg_counts=(1, 2))
    common = ["--data", shards, "--config", TINY, "--preset", "tiny", "--max-steps", "4", "--set", "use_ema=true"]
    with caplog.at_level(logging.INFO, logger="model.training.trainer"):
        assert layerdiff_main(["train", *common, "--out", str(tmp_path / "val"), "--set", "validation_every=2"]) == 0
    assert layerdiff_main(["train", *common, "--out", str(tmp_path / "plain"), "--set", "validation_every=0"]) == 0
    run = tmp_path / "val"
    pngs = sorted(p.name for p in (run / "validation").glob("*.png"))
    assert pngs == ["step-000002.png", "step-000004.png"]
    image = np.asarray(Image.open(run / "validation" / "step-000004.png"))
    # 2 prompts (the first samples: 1 and 2 foregrounds) → rows of composite + 3 layers + 3 masks at 32 px
    assert image.shape == (2 * 32, (1 + 2 * 3) * 32, 3)
    assert image[:32, :32].std() > 0  # a sampled composite, not a blank tile
    assert not (tmp_path / "plain" / "validation").exists()
    tags = event_tags(run)
    assert "validation/samples" in tags and "train/loss" in tags
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= tags
    # sampling leaves training untouched: same losses with and without it
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("val", "plain")]
    assert losses[0] == losses[1]
    seconds = [float(s) for s in re.findall(r"validation samples at step \d+: .* \(([\d.]+) s\)", caplog.text)]
    assert len(seconds) == 2 and max(seconds) < 10, seconds  # ~1-2 s on an idle core
    print(f"validation grid seconds: {seconds}")
    curve = Image.open(run / "loss.png")  # the loss curve for the model card
    assert curve.size == (640, 320)


def test_loss_curve_follows_the_losses():
    steps = list(range(1, 201))
    curve = np.asarray(loss_curve(steps, [2.0 - s / 100 for s in steps]))  # falls linearly from 2 to 0
    dark = (curve[..., 2] > 100) & (curve[..., 0] < 60)  # the running-mean line's colour
    rows, cols = np.nonzero(dark[:, 60:630])
    assert rows.size > 0
    left, right = rows[cols < 50].mean(), rows[cols > 520].mean()
    assert left < 80 and right > 240  # high on the left, low on the right (image rows grow downwards)


def test_ema_weights_are_swapped_in_and_restored():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    trained = model.weight.detach().clone()
    with ema_weights(model, ema):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, trained)


def test_grid_pads_rows_with_fewer_layers():
    comp = np.full((4, 4, 3), 9, np.uint8)
    rows = grid([comp, comp], [np.ones((2, 4, 4, 3), np.uint8), np.ones((3, 4, 4, 3), np.uint8)],
                [np.full((2, 4, 4), 255, np.uint8), np.full((3, 4, 4), 255, np.uint8)])
    assert rows.shape == (8, 4 * 7, 3)
    assert (rows[:4, 12:16] == 0).all() and (rows[:4, 16:20] == 255).all()  # padded layer tile, then masks
