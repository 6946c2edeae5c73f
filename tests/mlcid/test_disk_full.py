"""A full disk (ENOSPC) at every point of writing a shard: the first error is raised and nothing stays visible."""

from __future__ import annotations

import errno
import os

import pytest

from mlcid import writer as writer_mod
from mlcid.writer import ShardWriter, is_complete
from tests.builders import make_sample
from tests.full_disk import filling

# A shard thrown away must not write its buffered bytes into the closed file later (at garbage collection).
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def test_disk_full_mid_shard_raises_enospc_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ShardWriter, "_open_tmp", filling(6000))
    with pytest.raises(OSError) as info:
        with ShardWriter(tmp_path, 3) as w:
            w.attach("mlcid-000003.parquet", b"outcomes")
            for i in range(50):
                w.write(make_sample(f"k{i}"))
    assert info.value.errno == errno.ENOSPC  # not masked by a second error inside abort()
    assert os.listdir(tmp_path) == [] and not is_complete(tmp_path, 3)


def test_disk_full_while_closing_the_tar_raises_enospc_and_leaves_nothing(tmp_path, monkeypatch):
    probe = [make_sample(f"k{i}") for i in range(2)]
    monkeypatch.setattr(ShardWriter, "_open_tmp", filling(10**9))
    w = ShardWriter(tmp_path, 4).__enter__()  # measure the bytes the samples take before the tar is closed
    for s in probe:
        w.write(s)
    used = 10**9 - w._file.room
    w.abort()
    monkeypatch.setattr(ShardWriter, "_open_tmp", filling(used))
    w = ShardWriter(tmp_path, 4).__enter__()
    w.attach("mlcid-000004.parquet", b"outcomes")
    for s in probe:
        w.write(s)
    with pytest.raises(OSError) as info:
        w.close()
    assert info.value.errno == errno.ENOSPC
    w.abort()  # a caller's cleanup after a failed close must not raise either
    assert os.listdir(tmp_path) == []


def test_disk_full_writing_the_stats_file_removes_the_published_tar(tmp_path, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod, "_atomic_write_bytes", full)
    with pytest.raises(OSError, match="No space"):
        with ShardWriter(tmp_path, 5) as w:
            w.attach("mlcid-000005.parquet", b"outcomes")
            w.write(make_sample())
    assert os.listdir(tmp_path) == []  # tar and outcomes were renamed, then removed again: no unvouched shard


def test_attached_files_appear_only_with_the_closed_shard(tmp_path):
    with ShardWriter(tmp_path, 6) as w:
        w.attach("mlcid-000006.parquet", b"outcomes")
        w.write(make_sample())
        assert sorted(os.listdir(tmp_path)) == ["mlcid-000006.parquet.tmp", "mlcid-000006.tar.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["mlcid-000006.parquet", "mlcid-000006.tar", "mlcid-000006_stats.json"]
    assert w.names == ["mlcid-000006.tar", "mlcid-000006.parquet", "mlcid-000006_stats.json"]
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, 7).attach("mlcid-000007_stats.json", b"{}")
