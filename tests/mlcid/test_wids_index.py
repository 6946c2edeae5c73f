"""Outside readers: the wids index beside the shards, and plain webdataset with decode("pilrgba")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.builders import make_sample, write_shard

from mlcid.takedown import TakedownConfig, takedown
from cli.main import mlcid_main
from mlcid.wids_index import INDEX_NAME, index_folder, write_wids_index
from mlcid.writer import shard_name, stats_name


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Shards 0 (3 samples), 1 (2 samples), 2 (unfinished: no stats), 3 (empty: every input dropped)."""
    d = tmp_path / "data"
    write_shard(d, [make_sample(f"a{i}", n_fg=1 + i % 3, seed=i) for i in range(3)], 0)
    write_shard(d, [make_sample(f"b{i}", n_fg=2, seed=5 + i) for i in range(2)], 1)
    write_shard(d, [make_sample("c0")], 2)
    (d / stats_name(2)).unlink()
    write_shard(d, [], 3, {"no_foreground": 4})
    return d


def test_wids_reads_the_index(folder: Path, tmp_path: Path) -> None:
    wids = pytest.importorskip("wids")
    index = index_folder(str(folder))
    assert index.nsamples == 5 and set(index.left_out) == {f"file://{folder / shard_name(i)}" for i in (2, 3)}
    doc = json.loads((folder / INDEX_NAME).read_text())
    assert doc["__kind__"] == "wids-shard-index-v1" and [s["url"] for s in doc["shardlist"]] == [
        shard_name(0), shard_name(1)]  # relative: the folder moves as a whole
    ds = wids.ShardListDataset(str(folder / INDEX_NAME), cache_dir=str(tmp_path / "cache"), transformations=[])
    assert len(ds) == 5
    samples = [ds[i] for i in range(len(ds))]
    assert [s["__key__"] for s in samples] == ["a0", "a1", "a2", "b0", "b1"]
    # members group per sample: a2 has 3 foregrounds → composite, 4 layers, 3 masks, json
    assert sorted(samples[2]) == sorted(["__key__", "__index__", "__shard__", "__shardindex__", "__dataset__",
                                         ".json", ".composite.jpg", ".layer00.png", *(f".layer0{i}.png" for i in
                                         (1, 2, 3)), *(f".mask0{i}.png" for i in (1, 2, 3))])
    meta = json.loads(samples[3][".json"].read())
    assert meta["key"] == "b0" and len(meta["layers"]) == 3


def test_index_moves_with_the_folder_and_after_takedown(folder: Path, tmp_path: Path) -> None:
    wids = pytest.importorskip("wids")
    index_folder(str(folder))
    clean = tmp_path / "clean"
    takedown([str(folder / shard_name(0)), str(folder / shard_name(1))],
             TakedownConfig(out=str(clean), keys=frozenset({"a1"})))
    ds = wids.ShardListDataset(str(clean / INDEX_NAME), cache_dir=str(tmp_path / "cache"), transformations=[])
    assert [ds[i]["__key__"] for i in range(len(ds))] == ["a0", "a2", "b0", "b1"]  # counts refreshed


def test_errors_and_cli(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="nothing to index"):
        write_wids_index([str(folder / shard_name(2))])
    out = tmp_path / "elsewhere.json"
    assert mlcid_main(["wids-index", str(folder / "mlcid-{000000..000001}.tar"), "--out", str(out), "--name", "demo"]) == 0
    doc = json.loads(out.read_text())
    assert doc["name"] == "demo" and doc["shardlist"][0]["url"] == f"file://{folder / shard_name(0)}"  # not beside
    assert "2 shard(s), 5 samples" in capsys.readouterr().out


def test_plain_webdataset_pilrgba(folder: Path) -> None:
    """The README's recipe: decode("pilrgba") keeps the foreground alpha; masks stay single-channel PNGs."""
    import numpy as np
    import webdataset as wds

    ds = wds.WebDataset(str(folder / shard_name(0)), shardshuffle=False).decode("pilrgba")
    sample = next(iter(ds))
    fg, mask = sample["layer01.png"], sample["mask01.png"]
    expected = make_sample("a0", n_fg=1, seed=0)  # the shard's first sample, as written
    assert fg.mode == "RGBA" and np.array_equal(np.asarray(fg), expected.foregrounds[0])  # alpha kept
    assert np.array_equal(np.asarray(mask)[..., 0], expected.masks[0])  # the mask, in every channel
    assert sample["json"]["key"] == "a0"
    # the README's numpy route: raw members (no .decode) through mlcid's own decoder
    from mlcid.codec import decode_sample
    from mlcid.validate import validate_sample

    raw = next(iter(wds.WebDataset(str(folder / shard_name(0)), shardshuffle=False)))
    decoded = decode_sample(raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")})
    validate_sample(decoded)
    assert np.array_equal(decoded.foregrounds[0], np.asarray(fg)) and decoded.masks[0].ndim == 2
