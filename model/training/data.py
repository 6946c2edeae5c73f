"""MLCID shards → LayerDiff training tensors: a resumable, deterministic `IterableDataset`, its collate and loader.

Per sample (all layers share ONE random resize/crop):
  images       (L, 3, H, W) float32 in [-1, 1]; layer 0 = background B, then foregrounds back→front. A foreground's
               model input is its RGB where its (dilated) alpha is set and `fill_value` elsewhere (default 0.0 =
               mid grey; the composite only reads F_i inside m_i, so the fill carries no information).
  masks        (L, 3, H, W) float32 in {-1, 1}: undilated m_i repeated to 3 channels; m_b = complement of their union.
  layer_valid  (L,) bool; samples are padded to `max_layers` (images = fill, masks = -1, prompt "").
  global_prompt str, layer_prompts list[str] (len L), key str.

Determinism and resume. Each (rank, loader worker) "slot" reads its own shards through `MLCIDReader` as a
sequence of epochs (resample mode: blocks of `block_size` samples with a fresh shard RNG per block; otherwise one
pass over the slot's shards, re-shuffled per epoch). The crop of sample `i` of epoch `e` is seeded by
(seed, rank, slot, e, i), so a stream is a pure function of (seed, epoch, rank, worker). Every batch carries its
slot and the position after its last sample; the trainer stores the last position per slot and a resumed
dataset skips to it. The skip re-reads (decodes) the skipped samples without transforming them: its cost is at
most `block_size` decoded samples per slot in resample mode, at most one pass over the slot's shards otherwise.
`OrderedBatches` restores the round-robin order of loader workers after a resume.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mlcid import errors
from mlcid.errors import SampleError
from mlcid.reader import MLCIDReader
from mlcid.schema import MLCIDSample
from mlcid.validate import ValidationConfig
from model.training.config import DataConfig
from model.training.interrupt import ignore_sigint

log = logging.getLogger(__name__)

TOO_MANY_LAYERS = "too_many_layers"  # drop reason counted by the dataset (policy "skip")
READER_MAX_LAYERS = 64  # the reader accepts any sane count; the dataset applies `max_layers` with its policy


# -- one sample --------------------------------------------------------------------------------------------------


def crop_box(height: int, width: int, config: DataConfig, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A random square crop in source pixels: shorter side → resolution × U(random_scale), then a random offset."""
    lo, hi = config.random_scale
    scale = lo if hi == lo else float(rng.uniform(lo, hi))
    side = min(height, width) / scale  # crop side in source pixels (≤ shorter side)
    x0 = float(rng.uniform(0.0, width - side)) if width > side else 0.0
    y0 = float(rng.uniform(0.0, height - side)) if height > side else 0.0
    return x0, y0, x0 + side, y0 + side


def _resize(arr: np.ndarray, box: tuple[float, float, float, float], size: int, resample: int, flip: bool) -> np.ndarray:
    out = np.asarray(Image.fromarray(arr).resize((size, size), resample, box=box))
    return out[:, ::-1] if flip else out


def _binary(arr: np.ndarray, box, size: int, flip: bool) -> np.ndarray:
    """Area-resample a 0/255 map and threshold at > 127: keeps disjoint masks disjoint (two values > 127 sum > 255)."""
    return _resize(arr, box, size, Image.Resampling.BILINEAR, flip) > 127


def check_layers(sample: MLCIDSample, config: DataConfig) -> MLCIDSample:
    """Apply the layer-count policy and shape checks; raise `SampleError` for a sample the trainer cannot use."""
    if not sample.foregrounds:
        raise SampleError(errors.LAYER_COUNT, f"{sample.key}: no foreground layer")
    if sample.num_layers > config.max_layers:
        if config.too_many_layers == "skip":
            raise SampleError(TOO_MANY_LAYERS, f"{sample.key}: {sample.num_layers} layers > max_layers {config.max_layers}")
        keep = config.max_layers - 1  # truncate: keep the back-most foregrounds; the rest show the inpainted B
        sample = sample.replace(
            foregrounds=sample.foregrounds[:keep], masks=sample.masks[:keep], layers=sample.layers[: keep + 1]
        )
    h, w = sample.background.shape[:2]
    for i, (fg, m) in enumerate(zip(sample.foregrounds, sample.masks), start=1):
        if fg.shape[:2] != (h, w) or m.shape[:2] != (h, w) or fg.ndim != 3 or fg.shape[2] != 4:
            raise SampleError(
                errors.SIZE_MISMATCH, f"{sample.key}: layer {i} {fg.shape} / mask {m.shape} vs background {(h, w)}"
            )
    return sample


def sample_to_tensors(sample: MLCIDSample, config: DataConfig, rng: np.random.Generator) -> dict[str, Any]:
    """One MLCID sample → padded layer tensors (see the module docstring). Raises `SampleError` for unusable input."""
    # 1. Layer policy and size checks.
    sample = check_layers(sample, config)
    h, w = sample.background.shape[:2]
    size, L = config.resolution, config.max_layers

    # 2. One crop (and flip) for every layer.
    box = crop_box(h, w, config, rng)
    flip = bool(config.hflip and rng.random() < 0.5)
    bicubic = Image.Resampling.BICUBIC

    # 3. Layers in [-1, 1]; foregrounds filled outside their dilated alpha.
    images = np.full((L, size, size, 3), config.fill_value, dtype=np.float32)  # (L, H, W, 3)
    masks = np.zeros((L, size, size), dtype=bool)  # (L, H, W)
    images[0] = _resize(sample.background[..., :3], box, size, bicubic, flip) / 127.5 - 1.0
    for i, (fg, m) in enumerate(zip(sample.foregrounds, sample.masks), start=1):
        rgba = _resize(fg, box, size, bicubic, flip)  # PIL resamples RGBA premultiplied: no fill bleeds in
        alpha = rgba[..., 3] > 127  # (H, W)
        images[i] = np.where(alpha[..., None], rgba[..., :3] / 127.5 - 1.0, config.fill_value)
        masks[i] = _binary(m, box, size, flip)
    n = 1 + len(sample.foregrounds)
    masks[0] = ~masks[1:n].any(axis=0)  # m_b = 1 - Σ m_i

    # 4. To channels-first tensors; masks → 3 channels in {-1, 1}.
    images_t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (L, 3, H, W)
    masks_t = torch.from_numpy(masks).float().mul(2).sub(1)[:, None].expand(L, 3, size, size).contiguous()
    layer_valid = torch.arange(L) < n  # (L,)
    prompts = [layer.prompt for layer in sample.layers[:n]] + [""] * (L - n)
    return {
        "key": sample.key,
        "images": images_t.clamp_(-1.0, 1.0),
        "masks": masks_t,
        "layer_valid": layer_valid,
        "global_prompt": sample.global_prompt,
        "layer_prompts": prompts,
    }


# -- the stream --------------------------------------------------------------------------------------------------


@dataclass
class SlotPosition:
    """Where a (rank, worker) slot's stream stands: the next sample index `index` of epoch `epoch`."""

    epoch: int = 0
    index: int = 0


def _sample_rng(seed: int, rank: int, slot: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, rank, slot, epoch, index]))


class MLCIDTrainDataset(IterableDataset):
    """Endless, deterministic stream of training samples from MLCID shards (see the module docstring).

    `start` maps a loader-worker slot to the `SlotPosition` to resume from. Each yielded dict also holds
    `slot`, `position` (the `SlotPosition` after it) and `dropped` (reason → count since the slot's previous
    sample: reader drops such as corrupt shards, plus this dataset's own `too_many_layers`/size skips).
    """

    def __init__(
        self,
        shards: str | list[str],
        config: DataConfig = DataConfig(),
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: dict[int, SlotPosition] | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.config, self.seed = shards, config, seed
        self.rank, self.world_size = rank, world_size
        self.start = dict(start or {})
        self.validation = ValidationConfig(READER_MAX_LAYERS, config.min_area_frac, config.max_area_frac)

    def _epoch_items(self, epoch: int, slot: int) -> tuple[MLCIDReader, Iterator[MLCIDSample]]:
        """The reader and the (shuffled, for resample mode block-limited) sample stream of one epoch."""
        c = self.config
        reader = MLCIDReader(
            self.shards, self.validation, rank=self.rank, world_size=self.world_size,
            shuffle_shards=c.shuffle_shards, resample=c.resample, seed=self.seed,
        )  # fmt: skip
        reader.set_epoch(epoch)
        items: Iterator[MLCIDSample] = iter(reader)
        if c.resample:
            items = itertools.islice(items, c.block_size)
        if c.shuffle_buffer > 1:
            items = _shuffled(items, c.shuffle_buffer, random.Random(hash((self.seed, self.rank, slot, epoch))))
        return reader, items

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        pos = self.start.get(slot, SlotPosition())
        epoch, skip = pos.epoch, pos.index
        while True:
            reader, items = self._epoch_items(epoch, slot)
            seen = Counter()  # reader drops already attributed to a sample
            extra: Counter[str] = Counter()  # this dataset's own skips since the last yield
            produced = False
            for index, sample in enumerate(items):
                if index < skip:  # resume: replay the stream without transforming (cost: decode only)
                    seen = Counter(reader.dropped)
                    continue
                try:
                    item = sample_to_tensors(sample, self.config, _sample_rng(self.seed, self.rank, slot, epoch, index))
                except SampleError as e:
                    if not extra[e.reason]:
                        log.warning("skipping sample (%s): %s", e.reason, e.detail[:300])
                    extra[e.reason] += 1
                    continue
                dropped = (Counter(reader.dropped) - seen) + extra
                seen, extra = Counter(reader.dropped), Counter()
                item.update(slot=slot, position=SlotPosition(epoch, index + 1), dropped=dict(dropped))
                produced = True
                yield item
            if not produced and skip == 0:
                raise RuntimeError(
                    f"rank {self.rank} loader worker {slot}: epoch {epoch} of {self.shards!r} gave no usable sample "
                    f"(dropped: {dict(reader.dropped + extra) or 'none'}); check the shards and data.max_layers"
                )
            epoch, skip = epoch + 1, 0


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A bounded shuffle buffer (deterministic for a given rng)."""
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


# -- batches -----------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A collated batch from one loader worker. Tensors: images/masks (B, L, 3, H, W), layer_valid (B, L)."""

    keys: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    layer_valid: torch.Tensor
    global_prompts: list[str]
    layer_prompts: list[list[str]]  # (B, L)
    slot: int = 0
    position: SlotPosition = field(default_factory=SlotPosition)
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def collate(items: list[dict[str, Any]], trim_padding: bool = True) -> Batch:
    """Stack samples; optionally drop trailing layer slots that are padding in every sample."""
    valid = torch.stack([it["layer_valid"] for it in items])  # (B, L)
    L = int(valid.any(0).nonzero().max()) + 1 if trim_padding else valid.shape[1]
    dropped: Counter[str] = Counter()
    for it in items:
        dropped.update(it.get("dropped", {}))
    return Batch(
        keys=[it["key"] for it in items],
        images=torch.stack([it["images"][:L] for it in items]),  # (B, L, 3, H, W)
        masks=torch.stack([it["masks"][:L] for it in items]),  # (B, L, 3, H, W)
        layer_valid=valid[:, :L],
        global_prompts=[it["global_prompt"] for it in items],
        layer_prompts=[list(it["layer_prompts"][:L]) for it in items],
        slot=int(items[-1].get("slot", 0)),
        position=items[-1].get("position", SlotPosition()),
        dropped=dict(dropped),
    )


class _Collate:
    """Picklable collate with the padding option bound (loader workers may be spawned)."""

    def __init__(self, trim_padding: bool) -> None:
        self.trim_padding = trim_padding

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        return collate(items, self.trim_padding)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    ignore_sigint()


def build_loader(
    shards: str | list[str],
    config: DataConfig,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start: dict[int, SlotPosition] | None = None,
) -> DataLoader:
    """A DataLoader of `Batch`es; each batch comes whole from one worker (slot)."""
    dataset = MLCIDTrainDataset(shards, config, seed=seed, rank=rank, world_size=world_size, start=start)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=config.num_workers,
        collate_fn=_Collate(config.trim_padding),
        worker_init_fn=_worker_init if config.num_workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if config.num_workers else None,
    )


class OrderedBatches:
    """Yield loader batches in worker round-robin order starting at slot `first` (restores order after resume).

    A fresh DataLoader hands out worker 0's batch first; an interrupted run had reached slot `first`. Batches of
    other slots wait in small per-slot queues (at most one per worker) until their turn.
    """

    def __init__(self, loader: DataLoader, num_slots: int, first: int = 0) -> None:
        self.iterator = iter(loader)
        self.num_slots = max(1, num_slots)
        self.next_slot = first % self.num_slots
        self.queues: dict[int, deque[Batch]] = {s: deque() for s in range(self.num_slots)}

    def __iter__(self) -> "OrderedBatches":
        return self

    def __next__(self) -> Batch:
        want = self.next_slot
        while not self.queues[want]:
            batch = next(self.iterator)
            self.queues[batch.slot].append(batch)
        self.next_slot = (want + 1) % self.num_slots
        return self.queues[want].popleft()
