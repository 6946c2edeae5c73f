"""Stage `inpaint`: the background layer — the image with its foreground objects filled in (`sd`, `opencv`).

The hole is the union of the objects' masks, dilated by a `dilate_kernel`² square. Backend `sd` (the paper's
choice) runs diffusers' `StableDiffusionInpaintPipeline` (`sd15-inpaint`) with an empty prompt and the object
terms (layer prompts, else labels) joined as the negative prompt (Appendix B), batched over items that share a
working size; backend `opencv` is `cv2.inpaint` (Telea). Both paste the source back outside the hole, so those
pixels are kept exactly.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np
import torch
from PIL import Image

from mlcid.registry import resolve
from pipelines.base import Item, alive, register_stage
from pipelines.devices import check_model_location, device_and_dtype

MODEL_NAME = "sd15-inpaint"


def hole_mask(item: Item, kernel: int) -> np.ndarray:
    """(H, W) bool: union of `item.objects` masks, dilated by a `kernel`×`kernel` square (1 = no dilation)."""
    h, w = item.image.shape[:2]
    union = np.zeros((h, w), dtype=np.uint8)
    for obj in item.objects:
        if obj.mask.shape != (h, w):
            raise ValueError(f"{item.key}: object mask {obj.mask.shape} does not match image {(h, w)}")
        union |= obj.mask.astype(np.uint8)
    if kernel > 1:
        union = cv2.dilate(union, np.ones((kernel, kernel), np.uint8))
    return union.astype(bool)


def paste_back(source: np.ndarray, filled: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """`filled` inside `hole`, `source` exactly everywhere else: (H, W, 3) uint8."""
    out = source.copy()
    out[hole] = filled[hole]
    return out


def negative_prompt(item: Item) -> str:
    """The object terms of an item, joined: each object's prompt, else its detection label."""
    terms = [(obj.prompt or obj.label or "").strip() for obj in item.objects]
    return ", ".join(dict.fromkeys(t for t in terms if t))


def work_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """(h', w'): the shorter side scaled to `resolution`, both rounded to a multiple of 8 (latent stride)."""
    scale = resolution / min(h, w)
    return max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8)


class _Inpainter:
    """Shared loop: compute each item's hole, fill it (`fill(items, holes)`), paste the source back."""

    def __init__(self, dilate_kernel: int = 5, batch_size: int = 8) -> None:
        if dilate_kernel < 1 or dilate_kernel % 2 == 0:
            raise ValueError(f"dilate_kernel must be odd and ≥ 1, got {dilate_kernel}")
        self.dilate_kernel, self.batch_size = dilate_kernel, max(1, int(batch_size))

    def __call__(self, batch: list[Item]) -> list[Item]:
        self.setup()
        items = alive(batch)
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            holes = [hole_mask(it, self.dilate_kernel) for it in chunk]
            for item, hole in zip(chunk, holes):
                if not hole.any():  # nothing to fill
                    item.background = item.image.copy()
            todo = [k for k, hole in enumerate(holes) if hole.any()]
            filled = self.fill([chunk[k] for k in todo], [holes[k] for k in todo]) if todo else []
            for k, image in zip(todo, filled):
                chunk[k].background = paste_back(chunk[k].image, image, holes[k])
        return batch


@register_stage("inpaint", "opencv")
class OpenCVInpainter(_Inpainter):
    """Classical inpainting: `cv2.inpaint` with Telea's fast marching method (or Navier–Stokes)."""

    model_id = "opencv:cv2.inpaint"

    def __init__(self, dilate_kernel: int = 5, radius: int = 5, method: str = "telea", batch_size: int = 64) -> None:
        super().__init__(dilate_kernel, batch_size)
        methods = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}
        if method not in methods:
            raise ValueError(f"unknown OpenCV inpaint method {method!r}; choose one of {', '.join(methods)}")
        self.radius, self.flag = radius, methods[method]

    def setup(self) -> None:
        pass

    def fill(self, items: list[Item], holes: list[np.ndarray]) -> list[np.ndarray]:
        return [cv2.inpaint(it.image, hole.astype(np.uint8) * 255, self.radius, self.flag)
                for it, hole in zip(items, holes)]


@register_stage("inpaint", "sd")
class StableDiffusionInpainter(_Inpainter):
    """SD 1.5 inpainting at a working size whose shorter side is `resolution`; output resized to the item size.

    Each item gets its own generator seeded from `seed` and its key, so a batch gives the same result as
    running its items one by one.
    """

    def __init__(
        self,
        preset: str = "real",
        model: str | None = None,
        model_overrides: dict[str, str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        dilate_kernel: int = 5,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        resolution: int = 512,
        seed: int = 0,
    ) -> None:
        super().__init__(dilate_kernel, batch_size)
        self.model_id = resolve(MODEL_NAME, preset, model or (model_overrides or {}).get(MODEL_NAME))
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)
        self.resolution, self.seed = int(resolution), int(seed)
        self.pipe = None

    def setup(self) -> None:
        from diffusers import StableDiffusionInpaintPipeline

        if self.pipe is not None:
            return
        check_model_location(self.model_id, "SD inpainting")
        self.use(StableDiffusionInpaintPipeline.from_pretrained(
            self.model_id, dtype=self.dtype, safety_checker=None, requires_safety_checker=False
        ))

    def use(self, pipe) -> None:
        """Take an already built inpainting pipeline (benchmarks pass a random-weight SD 1.5 one)."""
        self.pipe = pipe.to(self.device) if pipe.dtype == self.dtype else pipe.to(self.device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)

    def generator(self, key: str) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)

    def fill(self, items: list[Item], holes: list[np.ndarray]) -> list[np.ndarray]:
        # 1. Group items by working size so each group is one batched pipeline call.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(work_size(*it.image.shape[:2], self.resolution), []).append(i)
        out: list[np.ndarray | None] = [None] * len(items)
        for (wh, ww), idx in groups.items():
            # 2. Resize images and holes to the working size (nearest for the mask keeps it binary).
            images = [Image.fromarray(items[i].image).resize((ww, wh), Image.BICUBIC) for i in idx]
            masks = [Image.fromarray(holes[i].astype(np.uint8) * 255).resize((ww, wh), Image.NEAREST) for i in idx]
            # 3. Empty prompt, object terms as the negative prompt (Appendix B).
            with torch.inference_mode():
                result = self.pipe(
                    prompt=[""] * len(idx),
                    negative_prompt=[negative_prompt(items[i]) for i in idx],
                    image=images,
                    mask_image=masks,
                    height=wh,
                    width=ww,
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance_scale,
                    generator=[self.generator(items[i].key) for i in idx],
                    output_type="np",
                ).images  # (B, h', w', 3) float in [0, 1]
            # 4. Back to uint8 at each item's own size.
            for i, filled in zip(idx, result):
                h, w = items[i].image.shape[:2]
                filled = (np.clip(filled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # (h', w', 3)
                out[i] = cv2.resize(filled, (w, h), interpolation=cv2.INTER_AREA if wh > h else cv2.INTER_CUBIC)
        return out  # type: ignore[return-value]
