"""`LayeredImage`: one composable image as layers — the type that sampling, editing, evaluation and export share.

An MLCID sample (`mlcid.schema.MLCIDSample`) is the dataset's on-disk form, with dilated RGBA cut-outs and
provenance; a `LayeredImage` is the working form: per layer (index 0 = background) a full RGB frame and a
one-hot binary mask, the prompts, and free-form metadata. Every constructor checks shapes and one-hotness, and
the composite is always Eq. 4 of the layers, never stored separately.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlcid.composite import composite as compose_eq4
from mlcid.schema import BACKGROUND_PROMPT, LayerInfo, MLCIDSample


@dataclass
class LayeredImage:
    """L layers of one image, uint8, all (H, W).

    images         [(H, W, 3)] per layer, index 0 = background; full frames (also outside their masks)
    masks          [(H, W)]    per layer, 0/255, one-hot across layers (mask 0 = complement of the foregrounds)
    global_prompt  the prompt of the whole image
    layer_prompts  one prompt per layer, background first ("the background")
    meta           anything else worth keeping with the layers (source, settings)

    Build with `from_arrays` (checked) rather than the constructor.
    """

    images: list[np.ndarray]
    masks: list[np.ndarray]
    global_prompt: str = ""
    layer_prompts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.images)

    @property
    def height(self) -> int:
        return int(self.images[0].shape[0])

    @property
    def width(self) -> int:
        return int(self.images[0].shape[1])

    @property
    def composite(self) -> np.ndarray:
        """Eq. 4 of the layers: (H, W, 3) uint8."""
        return compose_eq4(self.images[0], self.images[1:], self.masks[1:])

    def rgba(self) -> list[np.ndarray]:
        """RGBA layers (H, W, 4) in paint order: opaque background, then each foreground with alpha = its mask."""
        out = [np.dstack([self.images[0], np.full((self.height, self.width), 255, np.uint8)])]
        out += [np.dstack([img, mask]) for img, mask in zip(self.images[1:], self.masks[1:])]
        return out

    def replace(self, **changes: Any) -> "LayeredImage":
        """A copy with some fields changed (checked again when images or masks change)."""
        new = dataclasses.replace(self, **changes)
        if "images" in changes or "masks" in changes:
            return LayeredImage.from_arrays(new.images, new.masks, new.global_prompt, new.layer_prompts, new.meta)
        return new

    def with_foreground(self, image: Any, mask: Any, prompt: str) -> "LayeredImage":
        """This image with a new front-most foreground: earlier masks lose its pixels (front wins), the
        background mask stays the complement of the foregrounds."""
        new = _to_binary_mask(mask, "new foreground mask") > 0
        fg_masks = [np.where(new, 0, m).astype(np.uint8) for m in self.masks[1:]]
        fg_masks.append(np.where(new, 255, 0).astype(np.uint8))
        return LayeredImage.from_arrays([*self.images, image], fg_masks, self.global_prompt,
                                        [*self.layer_prompts, prompt], dict(self.meta))

    @classmethod
    def from_arrays(cls, images: Sequence[Any], masks: Sequence[Any], global_prompt: str = "",
                    layer_prompts: Sequence[str] | None = None, meta: dict[str, Any] | None = None) -> "LayeredImage":
        """Build from per-layer images and masks (numpy / torch / PIL; uint8 or float in [0, 1]); checks them.

        `masks` has one entry per layer (one-hot, background first) or one per foreground (the background
        mask is then the complement of their union). `layer_prompts`, when given, has one prompt per layer.
        """
        imgs = [_to_rgb_uint8(x, f"layer {i} image") for i, x in enumerate(images)]
        if len(imgs) < 2:
            raise ValueError(f"need a background and at least one foreground layer, got {len(imgs)} layer(s)")
        shape = imgs[0].shape[:2]
        bad = [i for i, x in enumerate(imgs) if x.shape[:2] != shape]
        if bad:
            raise ValueError(f"layer {bad[0]} image is {imgs[bad[0]].shape[:2]}, layer 0 is {shape}: sizes differ")
        ms = [_to_binary_mask(m, f"mask {i}") for i, m in enumerate(masks)]
        if len(ms) not in (len(imgs), len(imgs) - 1):
            raise ValueError(f"{len(imgs)} layers need {len(imgs)} masks (background first) or {len(imgs) - 1} "
                             f"foreground masks, got {len(ms)}")
        bad = [i for i, m in enumerate(ms) if m.shape != shape]
        if bad:
            raise ValueError(f"mask {bad[0]} is {ms[bad[0]].shape}, layers are {shape}: sizes differ")
        fg_masks = ms[1:] if len(ms) == len(imgs) else ms
        union = np.zeros(shape, dtype=bool)
        for i, m in enumerate(fg_masks, start=1):
            if (union & (m > 0)).any():
                raise ValueError(f"foreground mask {i} overlaps an earlier foreground mask: masks must be "
                                 "one-hot across layers")
            union |= m > 0
        background = np.where(union, 0, 255).astype(np.uint8)
        if len(ms) == len(imgs) and not np.array_equal(ms[0], background):
            raise ValueError("mask 0 (background) is not the complement of the foreground masks: masks must be "
                             "one-hot across layers")
        prompts = list(layer_prompts) if layer_prompts is not None else []
        if layer_prompts is not None and (len(prompts) != len(imgs) or not all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"{len(imgs)} layers need {len(imgs)} layer prompts (strings, background first), "
                             f"got {layer_prompts!r:.200}")
        if not isinstance(global_prompt, str):
            raise TypeError(f"global_prompt must be a str, got {type(global_prompt).__name__}")
        return cls(images=imgs, masks=[background, *fg_masks], global_prompt=global_prompt, layer_prompts=prompts,
                   meta=dict(meta or {}))

    @classmethod
    def from_sample(cls, sample: MLCIDSample, fill: int | None = None) -> "LayeredImage":
        """An MLCID sample's layers: background B and foregrounds F_i with their undilated masks m_i.

        `fill` (0..255) replaces a foreground's pixels outside its dilated alpha, as the trainer's input does;
        None keeps the stored RGB.
        """
        fgs = [fg[..., :3] if fill is None else np.where(fg[..., 3:4] > 0, fg[..., :3], np.uint8(fill))
               for fg in sample.foregrounds]
        return cls.from_arrays([sample.background[..., :3], *fgs], sample.masks, sample.global_prompt,
                               sample.layer_prompts, {"source": f"mlcid:{sample.key}"})

    def to_sample(self, key: str = "sample") -> MLCIDSample:
        """This image as an `MLCIDSample` (foreground alpha = its mask; no dilation, no provenance)."""
        fgs = [np.dstack([img, m]) for img, m in zip(self.images[1:], self.masks[1:])]
        prompts = self.layer_prompts or [BACKGROUND_PROMPT] + [f"layer {i}" for i in range(1, self.num_layers)]
        area = self.height * self.width
        layers = [LayerInfo(prompts[0])] + [LayerInfo(p, area_frac=float((m > 0).sum()) / area)
                                            for p, m in zip(prompts[1:], self.masks[1:])]
        return MLCIDSample(key=key, global_prompt=self.global_prompt, composite=self.composite,
                           background=self.images[0], foregrounds=fgs, masks=list(self.masks[1:]), layers=layers)


# -------------------------------------------------------------------------------------------- array conversion


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (mlcid never imports torch)
        x = x.detach().cpu()
        x = x.float().numpy() if x.dtype.is_floating_point else x.numpy()
    return np.asarray(x)  # numpy arrays and PIL images


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{what} has NaN or infinite values")
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)  # floats are in [0, 1]
    raise ValueError(f"{what} has dtype {arr.dtype}; want uint8, bool or float in [0, 1]")


def _to_rgb_uint8(x: Any, what: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"{what} must be (H, W, 3) RGB, got shape {arr.shape}")
    return np.ascontiguousarray(_to_uint8(arr, what)[..., :3])


def _to_binary_mask(x: Any, what: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[:2] if arr.shape[-1] == 1 else arr.shape[1:])  # (H, W, 1) / (1, H, W) -> (H, W)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be (H, W), got shape {arr.shape}")
    arr = _to_uint8(arr, what)
    return np.where(arr > 127, 255, 0).astype(np.uint8)
