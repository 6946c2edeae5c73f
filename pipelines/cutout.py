"""Foreground cut-outs: an RGBA layer per object whose alpha is the k×k-dilated mask (paper §5.1: 5×5).

RGB = source pixels where the dilated mask is set, a constant `fill` elsewhere (default black, i.e. what a
transparent PNG pixel usually holds; it is never visible since alpha is 0 there). Only the RGBA alpha is
dilated: `obj.mask` stays the undilated mask, so the stored masks remain pairwise disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mlcid.composite import dilate
from pipelines.base import Item, alive, register_stage


def cutout_rgba(image: np.ndarray, mask: np.ndarray, kernel: int = 5,
                fill: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """(H, W, 3) uint8 image + (H, W) mask → (H, W, 4) uint8 RGBA with alpha = 255·dilate(mask)."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    alpha = dilate(mask, kernel)  # (H, W) bool
    rgba = np.empty((*mask.shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.where(alpha[..., None], image[..., :3], np.asarray(fill, dtype=np.uint8))
    rgba[..., 3] = alpha.astype(np.uint8) * 255
    return rgba


@dataclass(frozen=True)
class CutoutOptions:
    """The cut-out's dilation kernel and the RGB outside it; both are `PipelineConfig` fields (one truth)."""

    PIPELINE_FIELDS: ClassVar[dict[str, str]] = {"kernel": "dilate_kernel", "fill": "cutout_fill"}

    kernel: int = 5
    fill: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"dilation kernel must be odd and ≥ 1, got {self.kernel}")


@register_stage("cutout", "dilate5", CutoutOptions)
class DilatedCutout:
    """Stage: set `obj.rgba` for every object of every alive item."""

    def __init__(self, options: CutoutOptions = CutoutOptions()) -> None:
        self.kernel, self.fill = options.kernel, tuple(int(v) for v in options.fill)

    def setup(self) -> None:
        pass

    def __call__(self, batch: list[Item]) -> list[Item]:
        for item in alive(batch):
            for obj in item.objects:
                obj.rgba = cutout_rgba(item.image, obj.mask, self.kernel, self.fill)
        return batch
