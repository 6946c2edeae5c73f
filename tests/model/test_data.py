"""MLCID → training tensors: shared crops, fills, masks, padding, bad input, determinism and resume positions."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcid.codec import encode_sample
from mlcid.schema import BACKGROUND_PROMPT, LayerInfo, MLCIDSample
from mlcid.writer import ShardWriter
from model.training.config import DataConfig
from model.training.data import (
    TOO_MANY_LAYERS,
    MLCIDTrainDataset,
    OrderedBatches,
    SlotPosition,
    build_loader,
    collate,
    sample_to_tensors,
)
from tests.builders import COLOURS, make_sample, write_raw_shard, write_shards

def take(dataset, n: int) -> list[dict]:
    out = []
    for item in dataset:
        out.append(item)
        if len(out) == n:
            break
    return out


def test_sample_tensors_share_one_crop_and_follow_the_schema():
    cfg = DataConfig(resolution=32, max_layers=4, random_scale=(1.0, 1.5), fill_value=0.0)
    sample = make_sample("a", size=64, n_fg=2, width=96)
    out = sample_to_tensors(sample, cfg, np.random.default_rng(3))
    images, masks, valid = out["images"], out["masks"], out["layer_valid"]
    assert images.shape == masks.shape == (4, 3, 32, 32)
    assert valid.tolist() == [True, True, True, False]
    assert out["layer_prompts"] == [BACKGROUND_PROMPT, "a red box", "a green box", ""]
    assert images.min() >= -1 and images.max() <= 1
    assert set(masks.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(masks[:, 0], masks[:, 1]) and torch.equal(masks[:, 0], masks[:, 2])
    m = masks[:, 0] > 0  # (L, H, W)
    # background mask is the complement of the foregrounds' union; masks are disjoint; padding mask is empty
    assert torch.equal(m[0], ~(m[1] | m[2]))
    assert not (m[1] & m[2]).any() and not m[3].any()
    # shared crop: every foreground pixel in its mask has the foreground colour, and the composite of the layers
    # equals the crop of the source composite wherever the masks are set
    red = torch.tensor(COLOURS["red"]) / 127.5 - 1
    assert m[1].any()
    assert torch.allclose(images[1][:, m[1]].mean(1), red, atol=0.05)
    # outside the dilated alpha the foreground input is the constant fill; padding layers are fill too
    assert (images[1].abs().sum(0) == 0).float().mean() > 0.3
    assert torch.all(images[3] == 0)


def test_fill_value_is_configurable():
    sample = make_sample("a", size=32, n_fg=1)
    out = sample_to_tensors(sample, DataConfig(resolution=32, fill_value=-1.0), np.random.default_rng(0))
    alpha_off = sample.foregrounds[0][..., 3] == 0
    assert torch.all(out["images"][1][:, torch.from_numpy(alpha_off)] == -1.0)


def test_hflip_mirrors_every_layer_together():
    sample = make_sample("a", size=32, n_fg=2)
    plain = sample_to_tensors(sample, DataConfig(resolution=32), np.random.default_rng(0))
    outs = [sample_to_tensors(sample, DataConfig(resolution=32, hflip=True), np.random.default_rng(s)) for s in range(8)]
    flipped = [o for o in outs if not torch.equal(o["images"], plain["images"])]
    assert 0 < len(flipped) < 8
    for o in flipped:
        assert torch.equal(o["images"], plain["images"].flip(-1)) and torch.equal(o["masks"], plain["masks"].flip(-1))


def test_too_many_layers_skip_is_counted_and_truncate_keeps_backmost(tmp_path):
    write_raw_shard(tmp_path / "mlcid-000000.tar", [make_sample("big", 32, n_fg=4), make_sample("ok", 32, n_fg=1)])
    cfg = DataConfig(resolution=32, max_layers=4, resample=False, shuffle_shards=False)
    (item,) = take(MLCIDTrainDataset(str(tmp_path / "mlcid-000000.tar"), cfg), 1)
    assert item["key"] == "ok" and item["dropped"] == {TOO_MANY_LAYERS: 1}

    cfg = DataConfig(resolution=32, max_layers=3, too_many_layers="truncate", resample=False)
    out = sample_to_tensors(make_sample("big", 32, n_fg=4), cfg, np.random.default_rng(0))
    assert out["layer_valid"].tolist() == [True, True, True]
    assert out["layer_prompts"] == [BACKGROUND_PROMPT, "a red box", "a green box"]


def test_zero_foregrounds_and_mismatched_sizes_are_dropped_with_reasons(tmp_path):
    empty = make_sample("empty", 32, n_fg=1)
    empty = empty.replace(foregrounds=[], masks=[], layers=empty.layers[:1])
    odd = make_sample("odd", 32, n_fg=2)
    odd.foregrounds[1] = np.zeros((16, 16, 4), np.uint8)
    odd.masks[1] = np.zeros((16, 16), np.uint8)
    write_raw_shard(tmp_path / "mlcid-000000.tar", [empty, odd, make_sample("good", 32, n_fg=2)])
    cfg = DataConfig(resolution=32, resample=False)
    (item,) = take(MLCIDTrainDataset(str(tmp_path / "mlcid-000000.tar"), cfg), 1)
    assert item["key"] == "good"
    assert item["dropped"] == {"layer_count": 1, "size_mismatch": 1}


def test_corrupt_shard_mid_stream_is_counted_and_the_stream_goes_on(tmp_path):
    write_raw_shard(tmp_path / "mlcid-000000.tar", [make_sample(f"a{i}", 32, 1, seed=i) for i in range(3)])
    write_raw_shard(tmp_path / "mlcid-000001.tar", [make_sample(f"b{i}", 32, 1, seed=i) for i in range(3)], 0.7)
    write_raw_shard(tmp_path / "mlcid-000002.tar", [make_sample(f"c{i}", 32, 1, seed=i) for i in range(3)])
    cfg = DataConfig(resolution=32, resample=False, shuffle_shards=False)
    items = take(MLCIDTrainDataset(str(tmp_path / "mlcid-{000000..000002}.tar"), cfg), 8)
    keys = [it["key"] for it in items]
    assert keys[:3] == ["a0", "a1", "a2"] and keys[-3:] == ["c0", "c1", "c2"]
    assert 0 < sum(k.startswith("b") for k in keys) < 3
    dropped = sum((Counter(it["dropped"]) for it in items), Counter())
    assert dropped["truncated_shard"] == 1 and sum(dropped.values()) >= 1, dropped


def test_stream_is_deterministic_and_resumes_exactly(tmp_path):
    pattern = write_shards(tmp_path, shards=2, per_shard=5, size=40)
    cfg = DataConfig(resolution=32, random_scale=(1.0, 1.3), shuffle_buffer=4, block_size=7)
    full = take(MLCIDTrainDataset(pattern, cfg, seed=5), 12)
    again = take(MLCIDTrainDataset(pattern, cfg, seed=5), 12)
    assert [it["key"] for it in full] == [it["key"] for it in again]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(full, again))
    # resume after 9 samples: the tail is identical, crops included (block boundary crossed at 7)
    resumed = take(MLCIDTrainDataset(pattern, cfg, seed=5, start={0: full[8]["position"]}), 3)
    assert [it["key"] for it in resumed] == [it["key"] for it in full[9:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(resumed, full[9:]))
    assert full[8]["position"] == SlotPosition(1, 2)
    other = take(MLCIDTrainDataset(pattern, cfg, seed=6), 12)
    assert [it["key"] for it in other] != [it["key"] for it in full]


def test_ranks_read_disjoint_shards_in_one_epoch(tmp_path):
    pattern = write_shards(tmp_path, shards=4, per_shard=3, size=32)
    cfg = DataConfig(resolution=32, resample=False, shuffle_shards=True)
    seen = []
    for rank in range(2):
        items = take(MLCIDTrainDataset(pattern, cfg, rank=rank, world_size=2), 6)
        assert {it["position"].epoch for it in items} == {0}
        seen.append({it["key"] for it in items})
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def test_collate_trims_padding_and_loader_workers_resume_in_order(tmp_path):
    pattern = write_shards(tmp_path, shards=4, per_shard=4, size=32, fg_counts=(1,))
    items = take(MLCIDTrainDataset(pattern, DataConfig(resolution=32)), 2)
    batch = collate(items)
    assert batch.images.shape == (2, 2, 3, 32, 32) and batch.layer_valid.all()
    assert collate(items, trim_padding=False).images.shape[1] == 4

    cfg = DataConfig(resolution=32, num_workers=2, block_size=3, shuffle_buffer=2)
    loader = OrderedBatches(build_loader(pattern, cfg, batch_size=2, seed=1), 2)
    batches = [next(loader) for _ in range(6)]
    assert [b.slot for b in batches] == [0, 1, 0, 1, 0, 1]
    # resume after 3 batches: slot 1 is next; every slot restarts from its last consumed position
    start = {b.slot: b.position for b in batches[:3]}
    resumed = OrderedBatches(build_loader(pattern, cfg, batch_size=2, seed=1, start=start), 2, first=3)
    tail = [next(resumed) for _ in range(3)]
    assert [b.keys for b in tail] == [b.keys for b in batches[3:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(tail, batches[3:]))


def test_shard_json_member_layout_is_what_the_dataset_reads(tmp_path):
    pattern = write_shards(tmp_path, shards=1, per_shard=2, size=32)
    with tarfile.open(pattern.replace("{000000..000000}", "000000")) as tar:
        meta = json.load(tar.extractfile("s00k000.json"))
    assert meta["layers"][0]["prompt"] == BACKGROUND_PROMPT
    with pytest.raises(ValueError, match="cannot be split"):
        take(MLCIDTrainDataset(pattern, DataConfig(resolution=32, resample=False), rank=0, world_size=2), 1)
