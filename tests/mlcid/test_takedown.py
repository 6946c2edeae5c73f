"""Takedown: samples removed by key or source URL, stats/outcomes/manifest updated, the result validates."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.builders import make_sample, write_shard
from tests.s3_server import s3_server  # noqa: F401 (fixture)

from cli.main import mlcid_main
from mlcid.shard_check import check_shard
from mlcid.shards import expand_urls, iter_tar_groups
from mlcid.stats import load_shard_stats
from mlcid.takedown import TakedownConfig, takedown
from mlcid.writer import shard_name, stats_name


def _sample(key: str, n_fg: int = 1):
    return make_sample(key, n_fg=n_fg, seed=len(key), source={"url": f"http://img.example/{key}.jpg"})


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """Two complete shards (a0..a3 with 1–2 foregrounds; b0..b2) with outcomes parquets; shard 1 dropped 2 inputs."""
    d = tmp_path / "data"
    write_shard(d, [_sample(f"a{i}", n_fg=1 + i % 2) for i in range(4)], 0)
    write_shard(d, [_sample(f"b{i}") for i in range(3)], 1, {"no_foreground": 2})
    for sid, keys in ((0, [f"a{i}" for i in range(4)]), (1, ["b0", "b1", "b2", "x0", "x1"])):
        kept = [not k.startswith("x") for k in keys]
        pq.write_table(pa.table({"key": keys, "kept": kept,
                                 "reason": [None if k else "no_foreground" for k in kept],
                                 "detail": [None] * len(keys)}), d / f"mlcid-{sid:06d}.parquet")
    return d


def all_valid(folder_or_shard: Path) -> bool:
    """What `mlcid validate` says (exit 0): every shard valid, empty ones only when their stats say why."""
    return all(check_shard(u).ok for u in expand_urls(str(folder_or_shard)))


def _members(url: Path) -> dict[str, dict[str, bytes]]:
    return {key: members for key, members in iter_tar_groups(str(url))}


def test_removes_by_key_and_url_and_validates(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "clean"
    cfg = TakedownConfig(out=str(out), keys=frozenset({"a1", "nope"}), urls=frozenset({"http://img.example/b2.jpg"}))
    result = takedown(str(data), cfg)
    assert result.removed == 2 and not result.failed
    assert result.unmatched_keys == ["nope"] and result.unmatched_urls == []
    # the samples are gone; the kept ones are byte-identical copies
    before, after = _members(data / shard_name(0)), _members(out / shard_name(0))
    assert sorted(after) == ["a0", "a2", "a3"] and all(after[k] == before[k] for k in after)
    assert sorted(_members(out / shard_name(1))) == ["b0", "b1"]
    # stats: written lowered, dropped["takedown"] raised, layer counts fixed, read unchanged and consistent
    s0, s1 = (load_shard_stats(str(out / shard_name(i))) for i in (0, 1))
    assert s0.stats["written"] == 3 and s0.stats["dropped"] == {"takedown": 1} and s0.stats["read"] == 4
    assert s0.stats["layer_counts"] == {"2": 2, "3": 1}  # a1 had 2 foregrounds (3 layers)
    assert s1.stats["dropped"] == {"no_foreground": 2, "takedown": 1} and s0.consistent and s1.consistent
    assert s1.stats["takedown"]["removed"] == 1 and s1.stats["takedown"]["manifest"] == "mlcid-000001_takedown.json"
    # manifest: what was removed and why
    manifest = json.loads((out / "mlcid-000001_takedown.json").read_text())
    assert [(e["key"], e["url"], e["matched"]) for e in manifest["removed"]] == [
        ("b2", "http://img.example/b2.jpg", "url")]
    # outcomes: the removed row is marked, the others untouched
    rows = {r["key"]: r for r in pq.read_table(out / "mlcid-000000.parquet").to_pylist()}
    assert (rows["a1"]["kept"], rows["a1"]["reason"]) == (False, "takedown") and rows["a0"]["kept"] is True
    # nothing half-written left, the source untouched, and the result passes the validator
    assert not list(out.glob("*.tmp"))
    assert sorted(_members(data / shard_name(0))) == ["a0", "a1", "a2", "a3"]
    assert all_valid(out)


def test_in_place_repeat_accumulates(data: Path) -> None:
    untouched = (data / shard_name(1)).stat().st_mtime_ns
    takedown(str(data), TakedownConfig(out=str(data), keys=frozenset({"a0"})))
    takedown(str(data), TakedownConfig(out=str(data), urls=frozenset({"http://img.example/a3.jpg"})))
    assert (data / shard_name(1)).stat().st_mtime_ns == untouched  # nothing to remove there: not rewritten
    assert not (data / "mlcid-000001_takedown.json").exists()
    stats = load_shard_stats(str(data / shard_name(0))).stats
    assert stats["written"] == 2 and stats["dropped"] == {"takedown": 2} and stats["takedown"]["removed"] == 2
    manifest = json.loads((data / "mlcid-000000_takedown.json").read_text())
    assert [e["key"] for e in manifest["removed"]] == ["a0", "a3"]
    assert all_valid(data)


def test_removing_every_sample_leaves_a_valid_empty_shard(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "clean"
    takedown(str(data / shard_name(1)), TakedownConfig(out=str(out), keys=frozenset({"b0", "b1", "b2"})))
    stats = load_shard_stats(str(out / shard_name(1))).stats
    assert stats["written"] == 0 and stats["layer_counts"] == {}
    assert all_valid(out / shard_name(1))  # empty, and its stats say why


def test_refuses_unfinished_and_cut_shards_but_goes_on(data: Path, tmp_path: Path) -> None:
    (data / stats_name(1)).unlink()
    cut = tmp_path / "cut"
    cut.mkdir()
    raw = (data / shard_name(0)).read_bytes()
    (cut / "mlcid-000007.tar").write_bytes(raw[: len(raw) // 2])
    (cut / stats_name(7)).write_bytes((data / stats_name(0)).read_bytes())
    out = tmp_path / "clean"
    shards = [str(data / shard_name(0)), str(data / shard_name(1)), str(cut / "mlcid-000007.tar")]
    result = takedown(shards, TakedownConfig(out=str(out), keys=frozenset({"a2"})))
    assert [s.error is None for s in result.shards] == [True, False, False]
    assert "no stats file" in result.shards[1].error and "readable shard" in result.shards[2].error
    assert sorted(p.name for p in out.iterdir()) == ["mlcid-000000.parquet", "mlcid-000000.tar",
                                                     "mlcid-000000_stats.json", "mlcid-000000_takedown.json"]
    with pytest.raises(ValueError, match="same name"):
        takedown([str(data / shard_name(0)), str(tmp_path / "other" / shard_name(0))],
                 TakedownConfig(out=str(out), keys=frozenset({"a2"})))
    with pytest.raises(ValueError, match="at least one"):
        TakedownConfig(out=str(out))


def test_fsspec_urls(data: Path) -> None:
    """Shards read from and written to an fsspec filesystem (memory://, as s3:// in production)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in (shard_name(0), stats_name(0)):
        fs.pipe(f"/td/in/{name}", (data / name).read_bytes())
    try:
        result = takedown(f"memory://td/in/{shard_name(0)}", TakedownConfig(out="memory://td/out",
                                                                            keys=frozenset({"a3"})))
        assert result.removed == 1 and not result.failed
        keys = [k for k, _ in iter_tar_groups(f"memory://td/out/{shard_name(0)}")]
        assert keys == ["a0", "a1", "a2"]
        assert json.loads(fs.cat(f"/td/out/{stats_name(0)}"))["written"] == 3
        assert not [p for p in fs.ls("/td/out", detail=False) if p.endswith(".tmp")]
    finally:
        fs.rm("/td", recursive=True)


def test_cli(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# removal request 2026-12-01\na2\n\nb0\n")
    urls = tmp_path / "urls.txt"
    urls.write_text("http://img.example/missing.jpg\n")
    out = tmp_path / "clean"
    argv = ["takedown", "--keys", str(keys), "--urls", str(urls), "--out", str(out), str(data / "mlcid-{000000..000001}.tar")]
    assert mlcid_main(argv) == 0
    text = capsys.readouterr().out
    assert "removed 2 sample(s) from 2 shard(s)" in text and "not found (1 urls): http://img.example/missing.jpg" in text
    (out / stats_name(0)).unlink()
    assert mlcid_main(["takedown", "--keys", str(keys), "--out", str(tmp_path / "again"), str(out)]) == 1
    assert mlcid_main(["takedown", "--out", str(out), str(data)]) == 2  # neither --keys nor --urls
    assert "at least one key or source URL" in capsys.readouterr().err


def test_takedown_on_s3(data: Path, s3_server) -> None:
    """In place on a real S3-compatible server (moto on 127.0.0.1): shards, sidecars and stats rewritten there."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("takedown")  # a bucket on the local server
    bucket = "s3://takedown"
    for name in (shard_name(0), stats_name(0), "mlcid-000000.parquet"):
        fs.put_file(str(data / name), f"takedown/data/{name}")
    result = takedown(f"{bucket}/data/{shard_name(0)}", TakedownConfig(out=f"{bucket}/data", keys=frozenset({"a0"})))
    assert result.removed == 1 and not result.failed
    fs.invalidate_cache()
    assert [k for k, _ in iter_tar_groups(f"{bucket}/data/{shard_name(0)}")] == ["a1", "a2", "a3"]
    assert json.loads(fs.cat(f"takedown/data/{stats_name(0)}"))["dropped"] == {"takedown": 1}
    assert json.loads(fs.cat("takedown/data/mlcid-000000_takedown.json"))["removed"][0]["key"] == "a0"
    assert not [p for p in fs.ls("takedown/data", detail=False) if p.endswith(".tmp")]
    assert check_shard(f"{bucket}/data/{shard_name(0)}").ok
