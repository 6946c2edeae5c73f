"""What `LayerDiffPipeline` returns: layered images (+ masks, RGBA, composites), x0 previews, and export helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput

from mlcid.schema import LayerInfo, MLCIDSample
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

    def to_sample(self, index: int = 0, key: str = "sample") -> MLCIDSample:
        """Sample `index` as an `MLCIDSample` (foreground alpha = its mask), e.g. for the applications."""
        if self.layer_images is None:
            raise ValueError("this output holds latents only (output_type='latent'); sample with 'pil' or 'np'")
        images = [np.asarray(im)[..., :3] for im in self.layer_images[index]]
        masks = [np.asarray(m) for m in self.masks[index]]
        fgs = [np.concatenate([im, m[..., None]], axis=-1) for im, m in zip(images[1:], masks[1:])]
        area = masks[0].size
        layers = [LayerInfo(self.layer_prompts[0])] + [
            LayerInfo(p, area_frac=float((m > 127).sum()) / area) for p, m in zip(self.layer_prompts[1:], masks[1:])]
        return MLCIDSample(key=key, global_prompt=self.global_prompt, composite=np.asarray(self.composites[index]),
                           background=images[0], foregrounds=fgs, masks=masks[1:], layers=layers)

    def save(self, folder: str | os.PathLike, index: int = 0, *, overwrite: bool = False, **meta: Any) -> Path:
        """Export sample `index` (PNG layers + masks, composite, layers.json, PSD, OpenRaster) into `folder`.

        Prompts and sampling settings come from this output; `meta` adds or overrides `OutputMeta` fields
        (`seed=…`, `model=…`, `extra={…}`). An existing `folder` is an error unless `overwrite=True`."""
        known = {k: v for k, v in self.settings.items() if k in OutputMeta.__dataclass_fields__}
        rest = {k: v for k, v in self.settings.items() if k not in known}
        extra = rest | dict(meta.pop("extra", None) or {})
        fields = dict(global_prompt=self.global_prompt, layer_prompts=list(self.layer_prompts)) | known | meta
        return save_output(folder, self, OutputMeta(**fields, extra=extra), index=index, overwrite=overwrite)

