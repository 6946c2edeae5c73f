"""The bundled-photo raw shard is readable by the pipeline's input reader."""

from mlcid.photos import load_photos, write_photo_shard
from pipelines.inputs import iter_raw_records, input_shard_id


def test_photo_shard_has_every_bundled_photo(tmp_path):
    path = write_photo_shard(tmp_path, shard_id=7)
    assert input_shard_id(str(path)) == 7
    records = [r for r in iter_raw_records(str(path)) if hasattr(r, "members")]
    assert len(records) == len(load_photos()) >= 6
    assert all({"jpg", "txt", "json"} <= set(r.members) for r in records)
