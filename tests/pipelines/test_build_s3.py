"""`mlcid build-local --out s3://…` against a real S3 server on 127.0.0.1, and every shard reader on it."""

from __future__ import annotations

import json
import uuid

import pytest

from cli.main import mlcid_main
from mlcid.reader import MLCIDReader
from mlcid.shards import expand_urls
from mlcid.storage import ShardStore
from mlcid.view import build_view
from pipelines.runner import ShardProcessor
from tests.builders import CLASSICAL, classical_config, input_records, write_input_shard
import tests.stages  # noqa: F401 — registers the test-* stage backends CLASSICAL names
from tests.s3_server import s3_server  # noqa: F401 — fixture

NAMES = ("mlcid-{:06d}.tar", "mlcid-{:06d}.parquet", "mlcid-{:06d}_stats.json")


@pytest.fixture
def bucket(s3_server) -> str:
    import s3fs

    name = f"mlcid-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(name)
    return name


def test_local_builder_writes_to_s3_resumes_and_every_reader_takes_the_prefix(bucket, tmp_path, capsys,
                                                                              monkeypatch):
    raw = [write_input_shard(tmp_path / f"{i:05d}.tar", input_records(3, seed=20 + i, shard=i)) for i in range(2)]
    out = f"s3://{bucket}/runs/mlcid"
    store = ShardStore(out)
    uploads: list[str] = []
    real_put = store.fs.put_file  # fsspec caches the filesystem: the builder's store uses this same instance

    def put_file(lpath, rpath, *args, **kwargs):
        uploads.append(rpath.rsplit("/", 1)[-1])
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", put_file)
    assert mlcid_main(["build-local", "--shards", *raw, "--out", out, *CLASSICAL]) == 0
    assert uploads == [n.format(i) for i in range(2) for n in NAMES]  # per shard: tar, outcomes, stats LAST
    totals = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert totals["processed"] == 2 and totals["read"] == 6
    store = ShardStore(out)
    # no .tmp, no staging left behind; the wids index (mlcid.wids_index) beside the shards
    assert store.names() == {n.format(i) for i in range(2) for n in NAMES} | {"index.json"}
    for i in range(2):  # the stats object, the completion marker, was uploaded last
        info = {n.format(i): store.fs.info(store.path(n.format(i)))["LastModified"] for n in NAMES}
        assert info[NAMES[2].format(i)] >= max(info.values())
    # Resume reads the remote listing: nothing is rebuilt.
    assert mlcid_main(["build-local", "--shards", *raw, "--out", out, *CLASSICAL]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 2
    # Readers: a prefix lists its shards; validate, stats, the loader's reader and the viewer all take it.
    assert expand_urls(out) == [f"{out}/mlcid-000000.tar", f"{out}/mlcid-000001.tar"]
    assert mlcid_main(["validate", out]) == 0
    assert "OK   s3://" in capsys.readouterr().out
    assert mlcid_main(["stats", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] == 2 and summary["read"] == 6
    samples = list(MLCIDReader(out))
    assert len(samples) == summary["written"] > 0
    assert all(s.source["uid"] for s in samples)
    view = build_view(out, tmp_path / "view")
    assert (tmp_path / "view" / "index.html").exists() and view is not None


def test_a_failed_upload_leaves_no_object_of_the_shard(bucket, tmp_path, monkeypatch):
    url = write_input_shard(tmp_path / "00003.tar", input_records(2, seed=3, shard=3))
    out = f"s3://{bucket}/mlcid"
    store = ShardStore(out)
    real_put = store.fs.put_file  # fsspec caches the filesystem: the processor's store uses this same instance

    def put_file(lpath, rpath, *args, **kwargs):
        if rpath.endswith(".parquet"):
            raise OSError("connection reset while uploading")
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", put_file)
    with pytest.raises(OSError, match="connection reset"):
        ShardProcessor(classical_config()).setup().process(url, out)
    assert store.names() == set()  # the tar that was already uploaded is removed again
    monkeypatch.undo()
    stats = ShardProcessor(classical_config()).setup().process(url, out)
    assert not stats["skipped"] and store.names() == {n.format(3) for n in NAMES}


def test_a_missing_prefix_says_not_found(bucket):
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_urls(f"s3://{bucket}/no-such-run")
