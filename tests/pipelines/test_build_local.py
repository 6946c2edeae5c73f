"""`mlcid build-local` with bad inputs and full disks; provenance in samples and outcomes."""

from __future__ import annotations

import errno
import json
import os

import pyarrow.parquet as pq
import pytest

from mlcid.reader import iter_shard_samples
from mlcid.schema import MLCIDSample, sample_uid
from mlcid.writer import ShardWriter, is_complete, shard_name
from cli.main import mlcid_main
from pipelines.build import LocalBuildConfig, PipelineOptions, build_local
from pipelines.runner import ShardProcessor, outcomes_name
from tests.builders import CLASSICAL, classical_config, input_records, write_input_shard
import tests.stages  # noqa: F401 — registers the test-* stage backends CLASSICAL names
from tests.full_disk import filling, full_at_close


def test_unreadable_inputs_fail_only_their_shard_and_the_run_exits_1_without_traceback(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = [write_input_shard(raw / f"{i:05d}.tar", input_records(2, seed=i, shard=i)) for i in (0, 4)]
    (raw / "00002.tar").write_bytes(b"this is not a tar archive " * 40)
    (raw / "00003.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x13garbage" * 50)
    missing = str(raw / "00001.tar")
    out = tmp_path / "out"
    code = mlcid_main(["build-local", "--shards", good[0], missing, str(raw / "00002.tar"), str(raw / "00003.tar.gz"),
                       good[1], "--out", str(out), *CLASSICAL])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.out + captured.err
    summary = captured.out
    for name in ("00001.tar", "00002.tar", "00003.tar.gz"):
        assert f"FAILED {raw / name}: SampleError: unreadable_shard" in summary, summary
    totals = json.loads(summary.strip().splitlines()[-1])
    assert totals["failed"] == 3 and totals["processed"] == 2
    assert is_complete(out, 0) and is_complete(out, 4)
    assert not any(is_complete(out, i) for i in (1, 2, 3))
    assert sorted(os.listdir(out)) == sorted([f"mlcid-00000{i}{s}" for i in (0, 4)
                                              for s in (".tar", ".parquet", "_stats.json")] + ["index.json"])  # wids


def test_a_wrong_folder_says_not_found(tmp_path, capsys):
    assert mlcid_main(["build-local", "--shards", str(tmp_path / "raw-typo"), "--out", str(tmp_path / "out"),
                       *CLASSICAL]) == 2
    err = capsys.readouterr().err
    assert "raw-typo" in err and "not found" in err and "shard id" not in err


def test_two_inputs_with_one_shard_id_are_refused_before_any_work(tmp_path, capsys):
    a = write_input_shard(tmp_path / "00001.tar", input_records(1))
    (tmp_path / "b").mkdir()
    b = write_input_shard(tmp_path / "b" / "00001.tar", input_records(1))
    assert mlcid_main(["build-local", "--shards", a, b, "--out", str(tmp_path / "out"), *CLASSICAL]) == 2
    assert "both have shard id 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_truncated_input_is_shown_in_the_run_summary_and_in_mlcid_stats(tmp_path, capsys):
    full = write_input_shard(tmp_path / "full.tar", input_records(4, seed=9, shard=6))
    data = open(full, "rb").read()
    (tmp_path / "00006.tar").write_bytes(data[: int(len(data) * 0.7)])  # cut inside the last records
    out = tmp_path / "out"
    report = build_local(LocalBuildConfig([str(tmp_path / "00006.tar")], str(out), classical_config()))
    assert report.truncated == [str(tmp_path / "00006.tar")] and not report.failed
    assert "input truncated (complete keys kept)" in report.format()
    assert mlcid_main(["stats", str(out / shard_name(6))]) == 0
    assert f"input truncated (its complete keys were kept): {out / shard_name(6)}" in capsys.readouterr().out
    assert mlcid_main(["stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_truncated"] == [str(out / shard_name(6))]


def test_disk_full_while_writing_leaves_no_outcomes_and_no_shard(tmp_path, monkeypatch):
    url = write_input_shard(tmp_path / "00008.tar", input_records(6, seed=8, shard=8))
    proc = ShardProcessor(classical_config()).setup()
    monkeypatch.setattr(ShardWriter, "_open_tmp", filling(30_000))
    with pytest.raises(OSError) as info:
        proc.process(url, str(tmp_path / "out"))
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "out") == []  # the outcomes parquet is never published before the tar
    # Full exactly when the tar is closed (every sample fit): the outcomes must not be left behind either.
    monkeypatch.setattr(ShardWriter, "_open_tmp", full_at_close)
    with pytest.raises(OSError) as info:
        proc.process(url, str(tmp_path / "out"))
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "out") == []


def test_every_sample_and_outcome_row_carries_its_provenance(tmp_path):
    recs = input_records(3, seed=11, shard=2)
    key, members = recs[1]
    meta = json.loads(members["json"]) | {"LICENSE": "cc-by-4.0", "license_url": "https://cc.org/by/4.0"}
    recs[1] = (key, members | {"json": json.dumps(meta).encode()})
    recs.append(("000029999", {"jpg": b"", "txt": b"broken image", "json": b'{"url": "http://x/broken.jpg"}'}))
    url = write_input_shard(tmp_path / "00002.tar", recs)
    out = tmp_path / "out"
    config = PipelineOptions("tiny", backends=dict(classical_config().backends)).to_config()
    ShardProcessor(config).setup().process(url, str(out))
    samples = {s.key: s for s in iter_shard_samples(str(out / shard_name(2))) if isinstance(s, MLCIDSample)}
    rows = {r["key"]: r for r in pq.read_table(out / outcomes_name(2, "mlcid")).to_pylist()}
    assert set(rows) == {k for k, _ in recs}
    for k, s in samples.items():
        src = s.source
        assert src["uid"] == sample_uid(2, k, f"http://example.com/{k}.jpg") == rows[k]["uid"]
        assert src["url"] == rows[k]["url"] == f"http://example.com/{k}.jpg"
        assert src["caption"] == rows[k]["caption"] == "two boxes on blue"
        assert (src["input_shard"], src["input_key"]) == (2, k)
    assert samples[key].source["license"] == {"LICENSE": "cc-by-4.0", "license_url": "https://cc.org/by/4.0"}
    assert json.loads(rows[key]["license"]) == samples[key].source["license"]
    # A dropped input is traceable too: its row has the uid, URL and caption of what was read.
    broken = rows["000029999"]
    assert broken["reason"] == "undecodable_image" and broken["url"] == "http://x/broken.jpg"
    assert broken["uid"] == sample_uid(2, "000029999", "http://x/broken.jpg") and broken["caption"] == "broken image"
    # Stable: a rebuild gives the same uids.
    ShardProcessor(config).setup().process(url, str(tmp_path / "again"))
    again = pq.read_table(tmp_path / "again" / outcomes_name(2, "mlcid")).to_pylist()
    assert {r["key"]: r["uid"] for r in again} == {k: r["uid"] for k, r in rows.items()}
