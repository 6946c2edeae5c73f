"""`cluster.read_mlcid`: one Ray Data row per sample across shards with different layer counts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tests.builders import make_sample, write_shard

from mlcid.writer import shard_name

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cpus():
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.environ["RAY_TMPDIR"], log_to_driver=False)
    yield
    ray.shutdown()


def test_mixed_layer_counts_one_row_per_sample(tmp_path: Path, ray_cpus) -> None:
    from cluster.read_mlcid import read_mlcid

    d = tmp_path / "data"
    write_shard(d, [make_sample(f"a{i}", n_fg=1 + i % 3, seed=i) for i in range(4)], 0)  # 2, 3, 4, 2 layers
    write_shard(d, [make_sample("b0", n_fg=3, seed=7)], 1)
    ds = read_mlcid(str(d / "mlcid-{000000..000001}.tar"))
    rows = sorted(ds.take_all(), key=lambda r: r["key"])
    assert [r["key"] for r in rows] == ["a0", "a1", "a2", "a3", "b0"]
    assert [r["num_layers"] for r in rows] == [2, 3, 4, 2, 4]
    for r in rows:
        layers, masks = np.asarray(r["layers"]), np.asarray(r["masks"])
        assert layers.shape == (r["num_layers"], 48, 48, 4) and masks.shape == (r["num_layers"] - 1, 48, 48)
        assert (layers[1:, ..., 3][masks == 255] == 255).all()  # each foreground's alpha covers its mask
        assert (layers[0, ..., 3] == 255).all() and list(r["layer_prompts"])[0] == "the background"
    assert rows[4]["shard"].endswith(shard_name(1))
    # batched reading (map_batches, training loops) works across layer counts; read_webdataset's breaks here
    batches = list(ds.iter_batches(batch_size=3, batch_format="numpy"))
    assert sum(len(b["key"]) for b in batches) == 5
    assert sorted(int(n) for b in batches for n in b["num_layers"]) == [2, 2, 3, 4, 4]
    # the exact pixels of one sample survive the trip through Ray
    expected = make_sample("a2", n_fg=3, seed=2)
    assert np.array_equal(np.asarray(rows[2]["layers"])[3], expected.foregrounds[2])
