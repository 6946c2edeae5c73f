"""Feature extraction for evaluation: torch-fidelity FID features, CLIP embeddings, cached reference statistics.

The math on these features lives in `model.evaluation.metrics`. Extractors come from `model.loading` (real weights from
local files, or the tiny presets), so real and tiny runs share every line here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mlcid.reader import MLCIDReader
from mlcid.shards import expand_urls
from model.evaluation.config import ALL
from model.evaluation.metrics import FeatureStats
from model.loading import ClipScorer, FidExtractor

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: centre square crop, then bicubic resize (no-op at that size)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(image[top:top + side, left:left + side, :3])  # (side, side, 3)
    if side == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))


def _batches(items: Sequence[Any], batch_size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


# ----------------------------------------------------------------------------------------------------------
# FID features (torch-fidelity extractor)
# ----------------------------------------------------------------------------------------------------------


class FidFeatures:
    """A torch-fidelity feature extractor (registered by `model.loading.load_fid_extractor`) on uint8 images."""

    def __init__(self, extractor: FidExtractor, device: str | torch.device = "cpu", batch_size: int = 32):
        from torch_fidelity.utils import create_feature_extractor

        self.spec = extractor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = create_feature_extractor(
            extractor.name, [extractor.feature_layer], cuda=False, verbose=False,
            feature_extractor_weights_path=extractor.weights_path).to(self.device)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Features (N, D) float32 of uint8 RGB images [(H, W, 3)], all one size."""
        if len(images) == 0:
            raise ValueError("no images to extract features from")
        shape = images[0].shape
        if len(shape) != 3 or shape[-1] != 3 or any(im.shape != shape for im in images):
            raise ValueError(f"images must all be (H, W, 3) uint8 of one size; first is {shape}")
        out = []
        for batch in _batches(images, self.batch_size):
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
            (features,) = self.net(x.to(self.device))  # (B, D)
            out.append(features.float().cpu().reshape(len(batch), -1))
        return torch.cat(out).numpy()

    def cache_identity(self) -> dict[str, Any]:
        """What the features depend on, for cache keys: extractor name, layer, weights file (size, mtime)."""
        return {"extractor": self.spec.name, "layer": self.spec.feature_layer,
                "weights": _file_identity(self.spec.weights_path)}


# ----------------------------------------------------------------------------------------------------------
# CLIP embeddings (open_clip)
# ----------------------------------------------------------------------------------------------------------


class ClipEmbedder:
    """Image and text embeddings of an open_clip model (the paper's CLIP RN50, or the tiny preset)."""

    def __init__(self, scorer: ClipScorer, device: str | torch.device = "cpu", batch_size: int = 32):
        self.model = scorer.model.to(device).eval()
        self.preprocess, self.tokenizer = scorer.preprocess, scorer.tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Embeddings (N, D) float32 of uint8 RGB images [(H, W, 3)] (any sizes: CLIP's own preprocessing)."""
        out = []
        for batch in _batches(images, self.batch_size):
            x = torch.stack([self.preprocess(Image.fromarray(np.ascontiguousarray(im[..., :3]))) for im in batch])
            out.append(self.model.encode_image(x.to(self.device)).float().cpu())  # (B, D)
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings (N, D) float32 of prompts (CLIP's tokenizer truncates at 77 tokens)."""
        out = []
        for batch in _batches(list(texts), self.batch_size):
            tokens = self.tokenizer(list(batch)).to(self.device)  # (B, 77)
            out.append(self.model.encode_text(tokens).float().cpu())  # (B, D)
        return torch.cat(out)


def layer_on_fill(image: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """A foreground layer for the layer CLIP score: its RGB inside its mask, a neutral `fill` outside."""
    out = np.empty_like(image[..., :3])
    out[...] = np.asarray(fill, np.uint8)
    sel = np.asarray(mask) > 127
    out[sel] = image[..., :3][sel]
    return out


# ----------------------------------------------------------------------------------------------------------
# Reference statistics of a dataset's real composites, cached per (shards, extractor, size)
# ----------------------------------------------------------------------------------------------------------


def _file_identity(path: str | None) -> Any:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return {"path": str(p.resolve()), "files": {f.name: _file_identity(str(f)) for f in sorted(p.iterdir())
                                                    if f.is_file()}}
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return str(path)


def reference_key(urls: Sequence[str], features: FidFeatures, size: int, groups: Sequence[str],
                  max_per_group: int | None) -> tuple[str, dict[str, Any]]:
    """Cache key (16 hex) and the document it hashes: shard list (with local files' size and mtime),
    extractor identity, image size, groups and cap."""
    doc = {"version": CACHE_VERSION, "shards": [_file_identity(u) if Path(u).exists() else u for u in urls],
           "features": features.cache_identity(), "size": size, "groups": list(groups),
           "max_per_group": max_per_group}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    return digest, doc


def reference_stats(shards: str | Sequence[str], features: FidFeatures, cache_dir: str | os.PathLike, size: int,
                    groups: Sequence[str], max_per_group: int | None = None,
                    progress: bool = True) -> dict[str, FeatureStats]:
    """FID statistics of the real composites in `shards`, per group ("2", "3", "4" layer counts, or "all").

    Read from `cache_dir/ref-<key>-<group>.npz` when present (key: see `reference_key`), else computed in one
    pass over the shards and written there with a `ref-<key>.json` describing what was hashed.
    """
    from tqdm import tqdm

    urls = expand_urls(shards)
    key, doc = reference_key(urls, features, size, groups, max_per_group)
    cache_dir = Path(cache_dir)
    paths = {g: cache_dir / f"ref-{key}-{g}.npz" for g in groups}
    if all(p.is_file() for p in paths.values()):
        log.info("reference statistics from cache %s (key %s)", cache_dir, key)
        return {g: FeatureStats.load(p) for g, p in paths.items()}

    # 1. Collect real composites per group (capped), resized like the generated images.
    images: dict[str, list[np.ndarray]] = {g: [] for g in groups}
    reader = MLCIDReader(urls, rank=0, world_size=1)
    cap = max_per_group if max_per_group is not None else float("inf")
    for sample in tqdm(reader, desc="reference composites", unit="img", disable=not progress, mininterval=1.0):
        for g in (str(sample.num_layers), ALL):
            if g in images and len(images[g]) < cap:
                images[g].append(resize_rgb(sample.composite, size))
        if all(len(v) >= cap for v in images.values()):
            break
    # 2. Features and statistics per group, cached.
    out = {}
    for g in groups:
        if len(images[g]) < 2:
            raise ValueError(f"reference group {g!r}: {len(images[g])} real composite(s) in {len(urls)} shard(s); "
                             "FID needs at least 2")
        out[g] = FeatureStats.from_features(features(images[g]))
        out[g].save(paths[g])
    doc["counts"] = {g: out[g].count for g in groups}
    (cache_dir / f"ref-{key}.json").write_text(json.dumps(doc, indent=1))
    log.info("reference statistics computed (%s) and cached under %s (key %s)",
             ", ".join(f"{g}: {s.count}" for g, s in out.items()), cache_dir, key)
    return out
