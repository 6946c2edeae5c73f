"""`read_mlcid(urls) -> ray.data.Dataset`: one row per MLCID sample, whatever its layer count.

Ray Data's `read_webdataset` turns tar members into columns, so shards whose samples have different layer
counts (`layer03.png` in some, not others) give NaN-filled columns, and batched reading (`iter_batches`,
`map_batches`) fails on them (Ray 2.60: "TypeError: Expected a well-typed ndarray … unsupported element of type
numpy.float64 (value: nan)"). Here each shard is read by one Ray task through
the MLCID reader (validation included; a bad sample is dropped and its reason logged by the task) and every
sample becomes one row with a fixed set of columns:

    key, shard, global_prompt, layer_prompts (list[str]), num_layers, width, height, metadata (JSON text),
    composite  (H, W, 3) uint8
    layers     (L, H, W, 4) uint8   RGBA; layer 0 is the background (alpha 255), 1… the foregrounds
    masks      (L-1, H, W) uint8    0/255 foreground masks

Image columns are ragged tensors (sizes and layer counts differ between rows).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from mlcid.errors import SampleError
from mlcid.reader import iter_shard_samples
from mlcid.schema import MLCIDSample
from mlcid.shards import expand_urls
from mlcid.validate import ValidationConfig

log = logging.getLogger(__name__)


def sample_row(sample: MLCIDSample, shard: str) -> dict[str, Any]:
    """One sample as a Ray Data row (see the module docstring for the columns)."""
    h, w = sample.height, sample.width
    background = np.concatenate([sample.background, np.full((h, w, 1), 255, np.uint8)], axis=-1)  # (H, W, 4)
    layers = np.stack([background, *sample.foregrounds])  # (L, H, W, 4)
    masks = np.stack(sample.masks) if sample.masks else np.zeros((0, h, w), np.uint8)  # (L-1, H, W)
    return {
        "key": sample.key,
        "shard": shard,
        "global_prompt": sample.global_prompt,
        "layer_prompts": sample.layer_prompts,
        "num_layers": sample.num_layers,
        "width": w,
        "height": h,
        "metadata": json.dumps(sample.metadata(), ensure_ascii=False, sort_keys=True),
        "composite": sample.composite,
        "layers": layers,
        "masks": masks,
    }


def _shard_rows(item: dict[str, Any], config: ValidationConfig | None) -> Iterator[dict[str, Any]]:
    """All valid samples of one shard (the task's input row holds its URL); drops are logged by reason."""
    url = item["url"]
    dropped: Counter[str] = Counter()
    for sample in iter_shard_samples(url, config):
        if isinstance(sample, SampleError):
            dropped[sample.reason] += 1
            continue
        yield sample_row(sample, url)
    if dropped:
        log.warning("%s: dropped %s", url, dict(dropped))


def read_mlcid(urls: str | Iterable[str], config: ValidationConfig | None = ValidationConfig(),
               num_cpus: float = 1.0):
    """A `ray.data.Dataset` with one row per valid sample of the shards (paths, brace patterns, fsspec URLs).

    One read task per shard (plain tasks, no actors: on a small machine actor pools can take every CPU and
    starve the read). `config=None` skips validation; `num_cpus` is what each read task reserves.
    """
    import ray.data

    shards = expand_urls(urls, complete_only=True)  # finished shards, as MLCIDReader
    seeds = ray.data.from_items([{"url": u} for u in shards], override_num_blocks=len(shards))
    return seeds.flat_map(_shard_rows, fn_kwargs={"config": config}, num_cpus=num_cpus)
