"""A LAION-shaped input shard for the cost model: img2dataset's layout, LAION's spread of aspect ratios.

What `mlcid laion` (img2dataset `--resize_mode keep_ratio --image_size 512 --min_image_size 64`) writes: JPEGs
whose shorter side is 512 and whose longer side follows the source aspect ratio, plus `.txt` captions and
`.json` metadata. The aspect-ratio mix (`LaionMix.aspects`) is the shape of LAION-400M / LAION-2B-en's WIDTH and
HEIGHT metadata columns: landscape photo formats (4:3, 3:2, 16:9) dominate, then squares (product shots,
thumbnails) and portrait formats, with a continuous tail of odd crops (`odd_fraction`, ratio uniform in
[1/2.5, 2.5]). The weights are rounded estimates of that shape, not a measured histogram: they are options.

Content: `mlcid.synthetic` scenes (plain shapes on patterned backgrounds) resized to each aspect, with the
foreground-count mix of the paper's MLCID (1.7M / 0.3M / 0.08M samples with 2 / 3 / 4 layers, Sec. 4.1). The
pixels only have to flow through the tiny models; survival per stage is set by the cost model, not by them.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mlcid.synthetic import SceneConfig, encode_jpeg_444, make_scene, raw_key

# (width / height, weight): rounded shares of LAION's common formats (see the module docstring).
LAION_ASPECTS: tuple[tuple[float, float], ...] = (
    (1.0, 0.22), (4 / 3, 0.20), (3 / 2, 0.16), (16 / 9, 0.08), (3 / 4, 0.10), (2 / 3, 0.09), (9 / 16, 0.03),
    (5 / 4, 0.04), (2.0, 0.02),
)
# MLCID Sec. 4.1: 1.7M two-layer, 0.3M three-layer, 0.08M four-layer samples → 1, 2, 3 foregrounds.
PAPER_FOREGROUND_WEIGHTS = (1.7, 0.3, 0.08)


@dataclass(frozen=True)
class LaionMix:
    """The input distribution: aspect ratios, img2dataset's resize, the foreground-count mix."""

    aspects: tuple[tuple[float, float], ...] = LAION_ASPECTS
    odd_fraction: float = 0.06  # share of images with an aspect ratio outside the list (uniform in log space)
    short_side: int = 512  # img2dataset --image_size with --resize_mode keep_ratio
    max_aspect: float = 2.5
    foreground_weights: tuple[float, ...] = PAPER_FOREGROUND_WEIGHTS
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if not self.aspects or any(r <= 0 or w < 0 for r, w in self.aspects) or sum(w for _, w in self.aspects) <= 0:
            raise ValueError("aspects needs (ratio > 0, weight ≥ 0) pairs with a positive total weight")
        if not 0.0 <= self.odd_fraction <= 1.0 or self.short_side < 16 or self.max_aspect < 1.0:
            raise ValueError("need 0 ≤ odd_fraction ≤ 1, short_side ≥ 16 and max_aspect ≥ 1")

    def draw_aspect(self, rng: np.random.Generator) -> float:
        """One width/height ratio from the mix."""
        if rng.random() < self.odd_fraction:
            return float(np.exp(rng.uniform(-np.log(self.max_aspect), np.log(self.max_aspect))))
        ratios, weights = zip(*self.aspects)
        p = np.asarray(weights, float) / sum(weights)
        return float(ratios[rng.choice(len(ratios), p=p)])

    def size(self, aspect: float) -> tuple[int, int]:
        """(width, height) after img2dataset's keep_ratio resize: the shorter side is `short_side`."""
        if aspect >= 1.0:
            return round(self.short_side * aspect), self.short_side
        return self.short_side, round(self.short_side / aspect)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_laion_shard(path: str | Path, samples: int, mix: LaionMix = LaionMix(), seed: int = 0,
                      shard_id: int = 0) -> dict[str, int]:
    """Write `samples` LAION-shaped records to the img2dataset tar `path` (atomically); returns size counts."""
    if samples < 1:
        raise ValueError(f"samples must be ≥ 1, got {samples}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_fg = len(mix.foreground_weights)
    scenes = SceneConfig(size=mix.short_side, min_foregrounds=1, max_foregrounds=n_fg,
                         count_weights=mix.foreground_weights)
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for offset in range(samples):
            key = raw_key(shard_id, offset)
            scene = make_scene(scenes, seed, offset, key=key)
            w, h = mix.size(mix.draw_aspect(rng))
            image = np.asarray(Image.fromarray(scene.composite).resize((w, h), Image.BICUBIC))  # (h, w, 3)
            jpg = encode_jpeg_444(image, quality=mix.jpeg_quality)
            meta = {"key": key, "url": f"laion-mix://{seed}/{key}", "caption": scene.global_prompt,
                    "status": "success", "width": w, "height": h, "original_width": w, "original_height": h,
                    "crc32": zlib.crc32(jpg)}
            _member(tar, f"{key}.jpg", jpg)
            _member(tar, f"{key}.txt", scene.global_prompt.encode("utf-8"))
            _member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
            sizes[f"{w}x{h}"] = sizes.get(f"{w}x{h}", 0) + 1
    tmp.replace(path)
    return sizes
