"""Shard writer/reader/validator round trips and every bad-input case of the foundation issue."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from mlcid import errors
from mlcid.composite import alpha_over, composite, sample_composite, to_rgba_stack
from mlcid.errors import SampleError
from mlcid.imageio import decode_rgb, encode_png
from mlcid.reader import MLCIDReader, iter_shard_samples
from mlcid.schema import BACKGROUND_PROMPT, LayerInfo, MLCIDSample
from mlcid.shards import expand_braces, expand_urls, iter_tar_groups, split_for
from cli.main import mlcid_main
from mlcid.shard_check import validate_shard
from mlcid.validate import ValidationConfig, validate_sample
from mlcid.writer import ShardWriter, is_complete, read_stats
from tests.builders import make_sample, sample_members, write_shard, write_tar


# -- round trips --------------------------------------------------------------------------------------------
def test_write_read_round_trip_exact(tmp_path):
    samples = [make_sample(f"k{i}") for i in range(5)]
    path = write_shard(tmp_path, samples)
    got = list(iter_shard_samples(str(path)))
    assert [s.key for s in got] == [s.key for s in samples]
    for a, b in zip(samples, got):
        assert isinstance(b, MLCIDSample)
        np.testing.assert_array_equal(a.background, b.background)
        for fa, fb in zip(a.foregrounds, b.foregrounds):
            np.testing.assert_array_equal(fa, fb)
        for ma, mb in zip(a.masks, b.masks):
            np.testing.assert_array_equal(ma, mb)
        assert b.layer_prompts == a.layer_prompts and b.global_prompt == a.global_prompt
        assert np.abs(b.composite.astype(int) - a.composite.astype(int)).mean() < 8  # JPEG


def test_members_contiguous_and_stats_last(tmp_path):
    path = write_shard(tmp_path, [make_sample("a"), make_sample("b")])
    with tarfile.open(path) as tar:
        keys = [m.name.split(".")[0] for m in tar.getmembers()]
    assert keys == sorted(keys) and keys.count("a") == 7
    stats = read_stats(tmp_path, 0)
    assert stats["read"] == stats["written"] + sum(stats["dropped"].values()) == 2
    assert stats["layer_counts"] == {"3": 2}
    assert not list(tmp_path.glob("*.tmp"))


def test_stats_file_appears_only_after_the_finished_tar(tmp_path, monkeypatch):
    """Readers take the stats file as the completion mark: it must become visible after the tar is in place."""
    real_replace, visible = os.replace, []

    def recording_replace(src, dst):
        real_replace(src, dst)
        visible.append(sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")))

    monkeypatch.setattr(os, "replace", recording_replace)
    write_shard(tmp_path, [make_sample("a"), make_sample("b")])
    with_stats = [i for i, names in enumerate(visible) if "mlcid-000000_stats.json" in names]
    with_tar = [i for i, names in enumerate(visible) if "mlcid-000000.tar" in names]
    assert with_stats and with_tar, visible
    assert with_tar[0] < with_stats[0]  # the tar was renamed into place in an earlier step than the stats


def test_writer_counts_invalid_as_dropped(tmp_path):
    good, overlapping = make_sample("good"), make_sample("bad", boxes=((2, 2, 20, 20), (10, 10, 30, 30)))
    overlapping.masks[1][10:20, 10:20] = 255  # force overlap with mask 1
    with ShardWriter(tmp_path, 3) as w:
        assert w.write(good) and not w.write(overlapping) and not w.write(good)  # duplicate key
        w.drop("no_detection", 2)
    stats = read_stats(tmp_path, 3)
    assert stats == stats | {"read": 5, "written": 1, "dropped": {"duplicate_key": 1, "mask_overlap": 1, "no_detection": 2}}


def test_exception_inside_writer_leaves_nothing_visible(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, 7) as w:
            w.write(make_sample())
            raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == [] and not is_complete(tmp_path, 7)


def test_rewriting_a_shard_removes_old_stats_first(tmp_path):
    write_shard(tmp_path, [make_sample()], shard_id=1)
    w = ShardWriter(tmp_path, 1).__enter__()
    assert not is_complete(tmp_path, 1)  # stale stats must not vouch for a shard being rewritten
    w.abort()


def test_eq4_rgba_stack_alpha_over_matches_composite():
    s = make_sample()
    np.testing.assert_array_equal(alpha_over(to_rgba_stack(s)), sample_composite(s))


# -- addressing -----------------------------------------------------------------------------------------------
def test_brace_expansion_and_splits(tmp_path):
    assert expand_braces("d/x-{000..002}.tar") == ["d/x-000.tar", "d/x-001.tar", "d/x-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    urls = [f"s{i}" for i in range(10)]
    parts = [split_for(urls, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(sum(parts, [])) == sorted(urls) and all(parts)
    for p in (tmp_path / "b.tar", tmp_path / "a.tar"):
        p.write_bytes(b"")
    assert expand_urls(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


def test_reader_reads_fsspec_urls_and_splits_workers(tmp_path):
    for i in range(4):
        write_shard(tmp_path, [make_sample(f"s{i}k{j}") for j in range(2)], shard_id=i)
    pattern = f"file://{tmp_path}/mlcid-{{000000..000003}}.tar"
    keys = [s.key for s in MLCIDReader(pattern)]
    assert len(keys) == 8
    halves = [[s.key for s in MLCIDReader(pattern, rank=r, world_size=2)] for r in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(keys) and not set(halves[0]) & set(halves[1])
    with pytest.raises(ValueError, match="cannot be split"):
        list(MLCIDReader(pattern, rank=0, world_size=8))


def test_a_folder_stands_for_its_finished_shards_only(tmp_path):
    write_shard(tmp_path, [make_sample("done")], shard_id=0)
    write_shard(tmp_path, [make_sample("busy")], shard_id=1)
    (tmp_path / "mlcid-000001_stats.json").unlink()  # published tar, stats not yet written (still uploading)
    for folder in (str(tmp_path), f"file://{tmp_path}"):
        assert [s.key for s in MLCIDReader(folder)] == ["done"]
    assert [s.key for s in MLCIDReader(str(tmp_path / "mlcid-000001.tar"))] == ["busy"]  # named: always read
    (tmp_path / "mlcid-000000_stats.json").unlink()  # no stats file at all: shards made by another tool
    assert sorted(s.key for s in MLCIDReader(str(tmp_path))) == ["busy", "done"]


def test_resampled_reader_streams_forever(tmp_path):
    write_shard(tmp_path, [make_sample("only")])
    it = iter(MLCIDReader(str(tmp_path / "mlcid-000000.tar"), resample=True, seed=1))
    assert [next(it).key for _ in range(5)] == ["only"] * 5


# -- bad input: each gets a clear error or a counted drop --------------------------------------------------------
def test_truncated_tar_keeps_earlier_samples_and_counts_truncation(tmp_path):
    path = write_shard(tmp_path, [make_sample(f"k{i}", size=64) for i in range(4)])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    reader = MLCIDReader(str(path))
    keys = [s.key for s in reader]
    assert 1 <= len(keys) < 4
    assert reader.dropped[errors.TRUNCATED_SHARD] == 1


def _cut_at_first_member_of(path: str, key: str, into_data: bool) -> None:
    with tarfile.open(path) as tar:
        first = next(m for m in tar.getmembers() if m.name.startswith(f"{key}."))
    cut = first.offset_data + first.size // 2 if into_data else first.offset  # mid-data, or before its header
    Path(path).write_bytes(Path(path).read_bytes()[:cut])


def test_a_cut_in_a_keys_first_member_keeps_the_complete_key_before_it(tmp_path):
    path = write_tar(tmp_path / "t.tar", sample_members(make_sample("a")) + sample_members(make_sample("b")))
    _cut_at_first_member_of(path, "b", into_data=True)
    *groups, last = iter_tar_groups(path)
    assert [k for k, _ in groups] == ["a"] and isinstance(last, SampleError) and last.reason == errors.TRUNCATED_SHARD


def test_a_tar_cut_between_members_reports_its_last_key_as_truncated(tmp_path):
    path = write_tar(tmp_path / "t.tar", sample_members(make_sample("a")) + sample_members(make_sample("b")))
    _cut_at_first_member_of(path, "b", into_data=False)  # no member is broken, but the end-of-archive block is gone
    (item,) = iter_tar_groups(path)
    assert isinstance(item, SampleError) and item.reason == errors.TRUNCATED_SHARD and "end-of-archive" in item.detail


def test_sample_missing_a_member_is_dropped(tmp_path):
    members = [m for m in sample_members(make_sample("a")) if not m[0].endswith("mask02.png")]
    members += sample_members(make_sample("b"))
    reader = MLCIDReader(str(write_tar(tmp_path / "t.tar", members)))
    assert [s.key for s in reader] == ["b"] and reader.dropped == {errors.MISSING_MEMBER: 1}


def test_mask_of_wrong_size_is_dropped(tmp_path):
    members = [
        (n, encode_png(np.full((16, 16), 255, np.uint8)) if n.endswith("mask01.png") else d)
        for n, d in sample_members(make_sample("a"))
    ]
    reader = MLCIDReader(str(write_tar(tmp_path / "t.tar", members)))
    assert list(reader) == [] and reader.dropped == {errors.SIZE_MISMATCH: 1}


def test_overlapping_masks_are_rejected():
    s = make_sample()
    s.masks[1][2:14, 2:14] = 255
    with pytest.raises(SampleError) as e:
        validate_sample(s)
    assert e.value.reason == errors.MASK_OVERLAP


def test_non_image_bytes_named_png_are_dropped(tmp_path):
    members = [(n, b"<html>not a png</html>" if n.endswith("layer01.png") else d) for n, d in sample_members(make_sample("a"))]
    reader = MLCIDReader(str(write_tar(tmp_path / "t.tar", members)))
    assert list(reader) == [] and reader.dropped == {errors.UNDECODABLE_IMAGE: 1}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height with a tiny IDAT: a decompression bomb's signature, cheaply."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    with pytest.raises(SampleError) as e:
        decode_rgb(_png_header_only(30000, 30000))
    assert e.value.reason == errors.IMAGE_TOO_LARGE
    members = [(n, _png_header_only(30000, 30000) if n.endswith("layer00.png") else d) for n, d in sample_members(make_sample("a"))]
    reader = MLCIDReader(str(write_tar(tmp_path / "t.tar", members)))
    assert list(reader) == [] and reader.dropped == {errors.IMAGE_TOO_LARGE: 1}


def test_script_prompt_is_kept_verbatim_as_data(tmp_path):
    evil = "<script>alert(1)</script>"
    path = write_shard(tmp_path, [make_sample("a", prompt=evil)])
    (s,) = list(MLCIDReader(str(path)))
    assert s.global_prompt == evil  # text is data; the viewer escapes it (tests/mlcid/test_view.py)


def test_interleaved_members_are_reported(tmp_path):
    a, b = sample_members(make_sample("a")), sample_members(make_sample("b"))
    reader = MLCIDReader(str(write_tar(tmp_path / "t.tar", a[:3] + b + a[3:])))
    kept = [s.key for s in reader]
    assert kept == ["b"] and sum(reader.dropped.values()) == 2  # a's first run incomplete, its second run interleaved


def test_bad_json_and_schema(tmp_path):
    members = [(n, b"{not json" if n.endswith(".json") else d) for n, d in sample_members(make_sample("a"))]
    reader = MLCIDReader(str(write_tar(tmp_path / "t.tar", members)))
    assert list(reader) == [] and reader.dropped == {errors.BAD_JSON: 1}
    meta = make_sample("b").metadata() | {"schema": "mlcid/0"}
    members = [(n, json.dumps(meta).encode() if n.endswith(".json") else d) for n, d in sample_members(make_sample("b"))]
    reader = MLCIDReader(str(write_tar(tmp_path / "u.tar", members)))
    assert list(reader) == [] and reader.dropped == {errors.BAD_SCHEMA: 1}


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda s: s.masks[0].__setitem__((0, 0), 7), errors.MASK_VALUES),
        (lambda s: s.masks[0].fill(0), errors.MASK_AREA),
        (lambda s: s.layers.__setitem__(0, LayerInfo("sky")), errors.BAD_SCHEMA),
        (lambda s: setattr(s, "global_prompt", "  "), errors.BAD_TEXT),
        (lambda s: setattr(s, "foregrounds", s.foregrounds[:1]), errors.BAD_SCHEMA),
    ],
)
def test_validator_names_each_broken_invariant(mutate, reason):
    s = make_sample()
    mutate(s)
    with pytest.raises(SampleError) as e:
        validate_sample(s)
    assert e.value.reason == reason


def test_layer_count_limit_is_a_config_value():
    s = make_sample(boxes=((0, 0, 8, 8), (8, 0, 16, 8), (16, 0, 24, 8), (24, 0, 32, 8)))
    with pytest.raises(SampleError) as e:
        validate_sample(s)
    assert e.value.reason == errors.LAYER_COUNT
    validate_sample(s, ValidationConfig(max_layers=5))


def test_validate_cli_exit_codes(tmp_path, capsys):
    good = write_shard(tmp_path, [make_sample("a")], shard_id=0)
    assert mlcid_main(["validate", str(good)]) == 0
    members = [m for m in sample_members(make_sample("x")) if not m[0].endswith("layer01.png")]
    bad = write_tar(tmp_path / "mlcid-000001.tar", members)
    assert mlcid_main(["validate", str(bad)]) == 1
    assert validate_shard(str(bad)) == (0, {errors.MISSING_MEMBER: 1})
    out = capsys.readouterr().out
    assert "OK" in out and "FAIL" in out


def test_validate_cli_accepts_an_empty_shard_only_when_its_stats_say_so(tmp_path):
    with ShardWriter(tmp_path, 4) as w:
        w.drop("no_detection", 3)
    assert mlcid_main(["validate", str(w.path)]) == 0  # every input dropped, recorded: a legitimate empty shard
    write_tar(tmp_path / "mlcid-000005.tar", [])
    assert mlcid_main(["validate", str(tmp_path / "mlcid-000005.tar")]) == 1  # empty and unexplained
