"""Streaming reader over MLCID shards: drops bad samples with a counted reason, splits by node and worker."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator

from mlcid.codec import decode_sample
from mlcid.errors import SampleError
from mlcid.imageio import DEFAULT_MAX_PIXELS
from mlcid.schema import MLCIDSample
from mlcid.shards import expand_urls, iter_tar_groups, split_for, worker_slot
from mlcid.validate import ValidationConfig, validate_sample

log = logging.getLogger(__name__)


def iter_shard_samples(
    url: str,
    config: ValidationConfig | None = ValidationConfig(),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[MLCIDSample | SampleError]:
    """Yield each decoded (and, unless `config` is None, validated) sample of one shard, or its `SampleError`."""
    for item in iter_tar_groups(url):
        if isinstance(item, SampleError):
            yield item
            continue
        key, members = item
        try:
            sample = decode_sample(key, members, max_pixels)
            if config is not None:
                validate_sample(sample, config)
        except SampleError as e:
            yield SampleError(e.reason, f"{url}:{key}: {e.detail}")
            continue
        yield sample


class MLCIDReader:
    """Iterate valid `MLCIDSample`s from shards (paths, brace patterns, fsspec URLs).

    - A folder stands for its finished shards: where shards carry stats files, a tar whose stats file is not
      written yet (still being built or uploaded) is skipped with a warning; a folder without any stats file
      (shards from other tools) is read whole. Tars named one by one (or by a brace pattern) are always read.
    - Shards are split across (node rank × dataloader worker); each slot reads a disjoint subset.
    - `resample=True` streams forever, drawing shards at random with replacement (per-slot seeded RNG).
    - `shuffle_shards=True` shuffles the shard order each epoch (seeded by `seed` and `epoch`).
    - Bad samples are dropped; `self.dropped` counts them by reason, and each reason is logged once.
    This is a plain iterable; `torch.utils.data.IterableDataset` wrappers can delegate to it.
    """

    def __init__(
        self,
        shards: str | Iterable[str],
        config: ValidationConfig | None = ValidationConfig(),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_shards: bool = False,
        resample: bool = False,
        seed: int = 0,
    ) -> None:
        self.urls = expand_urls(shards, complete_only=True)
        self.config = config
        self.max_pixels = max_pixels
        self.rank, self.world_size = rank, world_size
        self.shuffle_shards = shuffle_shards
        self.resample = resample
        self.seed = seed
        self.epoch = 0
        self.read = 0
        self.yielded = 0
        self.dropped: Counter[str] = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _slot(self) -> tuple[int, int, int, int]:
        """(rank, world_size, worker, num_workers): the constructor's rank/world_size, else webdataset's view."""
        rank, world, worker, workers = worker_slot()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        return rank, world, worker, workers

    def slot_urls(self) -> list[str]:
        """The shards this (rank, worker) slot reads."""
        rank, world, worker, workers = self._slot()
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        if len(urls) >= world * workers:
            return split_for(urls, rank, world, worker, workers)
        if self.resample:
            return urls  # too few shards to split: resampling slots draw from all with their own RNG
        raise ValueError(
            f"{len(urls)} shards cannot be split over {world} node(s) × {workers} worker(s) without repeats; "
            "use more shards, fewer workers, or resample=True"
        )

    def _shard_stream(self) -> Iterator[str]:
        urls = self.slot_urls()
        if not self.resample:
            yield from urls
            return
        from webdataset.shardlists import ResampledShards

        rank, _, worker, _ = self._slot()
        shards = ResampledShards(urls, seed=self.seed * 1_000_003 + self.epoch, deterministic=True,
                                 worker_seed=lambda: rank * 1000 + worker)  # webdataset's own slot seed
        for shard in shards:
            yield shard["url"]

    def __iter__(self) -> Iterator[MLCIDSample]:
        for url in self._shard_stream():
            for item in iter_shard_samples(url, self.config, self.max_pixels):
                self.read += 1
                if isinstance(item, SampleError):
                    if not self.dropped[item.reason]:
                        log.warning("dropping sample (%s): %s", item.reason, item.detail[:300])
                    self.dropped[item.reason] += 1
                    continue
                self.yielded += 1
                yield item
