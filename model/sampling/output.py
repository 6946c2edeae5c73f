"""What `LayerDiffPipeline` returns: layered images (+ masks, RGBA, composites), x0 previews, and `save()`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput

from mlcid.layered import LayeredImage
from model.sampling.export import OutputMeta, save_output


@dataclass
class Intermediate:
    """An x0 preview (Fig. 13): decoded layer images (B, L, H, W, 3) and one-hot masks (B, L, H, W), uint8."""

    step: int
    timestep: int
    images: np.ndarray
    masks: np.ndarray


@dataclass
class LayerDiffPipelineOutput(BaseOutput):
    """Per sample b and layer l (0 = background): RGB image, binary mask (0/255, one-hot over layers), RGBA layer
    (alpha = mask; background opaque) and the Eq. 4 composite. `output_type="pil"`: nested lists [b][l] of PIL
    images; "np": uint8 arrays images (B, L, H, W, 3), masks (B, L, H, W), rgba_layers (B, L, H, W, 4),
    composites (B, H, W, 3); "latent": only `latents`."""

    latents: torch.Tensor  # (B, L, 8, h, w) final image ‖ mask latents
    layer_images: Any = None
    masks: Any = None
    rgba_layers: Any = None
    composites: Any = None
    global_prompt: str = ""
    layer_prompts: list[str] = field(default_factory=list)
    intermediates: list[Intermediate] | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # how it was sampled (steps, scales, guidance, size)

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    def layered(self, index: int = 0) -> LayeredImage:
        """Batch item `index` as a `LayeredImage` with this output's prompts (export it, edit it, score it)."""
        if self.layer_images is None:
            raise ValueError("this output holds latents only (output_type='latent'); sample with 'pil' or 'np'")
        if not 0 <= index < self.batch_size:
            raise IndexError(f"batch index {index} outside 0..{self.batch_size - 1}")
        return LayeredImage.from_arrays(list(self.layer_images[index]), list(self.masks[index]), self.global_prompt,
                                        self.layer_prompts)

    def save(self, folder: str | os.PathLike, index: int = 0, *, overwrite: bool = False, **meta: Any) -> Path:
        """Export batch item `index` (PNG layers + masks, composite, layers.json, PSD, OpenRaster) into `folder`.

        Prompts and sampling settings come from this output; `meta` adds or overrides `OutputMeta` fields
        (`seed=…`, `model=…`, `extra={…}`). An existing `folder` is an error unless `overwrite=True`."""
        known = {k: v for k, v in self.settings.items() if k in OutputMeta.__dataclass_fields__}
        extra = {k: v for k, v in self.settings.items() if k not in known} | dict(meta.pop("extra", None) or {})
        return save_output(folder, self.layered(index), OutputMeta(**(known | meta), extra=extra), overwrite=overwrite)
