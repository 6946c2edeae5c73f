"""Salient-foreground masks for the Appendix B overlap rule: a classical CPU backend and a learned depth backend.

The paper uses ICON (Zhuge et al., TPAMI 2022) for salient object detection. ICON's weights are not
distributed through any model hub we can load with a library's own `from_pretrained`, so:

- backend `depth` (production default): monocular depth with transformers `AutoModelForDepthEstimation`
  (registry name `depth-saliency` = Depth-Anything-V2-Small). Its output is relative INVERSE depth (large =
  near). The near region — inverse depth above an Otsu threshold — stands in for ICON's salient foreground. The
  rule it feeds only asks whether a SAM mask is part of the foreground rather than the backdrop (sky, wall,
  floor, far scenery), which is exactly what a near/far split answers; salient objects in LAION-style photos
  are overwhelmingly the near ones. It is a learned model that runs batched on the GPU like the other stages.
- backend `classical` (CPU, no weights): the mean of two classic bottom-up saliency maps — frequency-tuned
  colour contrast (Achanta et al., CVPR 2009: distance of each blurred Lab pixel from the image's mean Lab
  colour) and spectral residual (Hou & Zhang, CVPR 2007: the log-amplitude spectrum minus its local mean,
  transformed back) — each scaled to [0, 1], weighted by a Gaussian centre prior
  `(1 - w) + w·exp(-r²/2σ²)` (r = distance from the centre in half-diagonals, σ = 0.5, w = 0.3), then Otsu.
  Used by the `tiny` profile, where random depth weights would decide nothing.

Both set `item.saliency`, (H, W) bool. A flat map (constant image) gives an all-False mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipelines.base import Item, alive, register_stage
from pipelines.devices import ModelStageConfig, check_model_location


# -- classical maps -----------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(x)


def colour_contrast_map(image: np.ndarray) -> np.ndarray:
    """Frequency-tuned saliency: ‖blurred Lab(x) − mean Lab‖ per pixel. (H, W, 3) uint8 → (H, W) float32."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)  # (H, W, 3)
    blurred = cv2.GaussianBlur(lab, (5, 5), 0)
    return np.linalg.norm(blurred - lab.reshape(-1, 3).mean(axis=0), axis=-1).astype(np.float32)


def spectral_residual_map(image: np.ndarray, work_width: int = 64) -> np.ndarray:
    """Spectral residual saliency computed at `work_width` px wide, resized back. → (H, W) float32."""
    h, w = image.shape[:2]
    ww = min(work_width, w)
    wh = max(1, round(h * ww / w))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    small = cv2.resize(gray, (ww, wh), interpolation=cv2.INTER_AREA)  # (h', w')
    spectrum = np.fft.fft2(small)
    log_amp = np.log(np.abs(spectrum) + 1e-8)
    residual = log_amp - cv2.blur(log_amp, (3, 3))
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sal = cv2.GaussianBlur(sal.astype(np.float32), (0, 0), sigmaX=max(1.0, ww / 24))
    return cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR)


def centre_prior(h: int, w: int, sigma: float = 0.5, weight: float = 0.3) -> np.ndarray:
    """(1 - weight) + weight·Gaussian of the distance from the centre in half-diagonal units. → (H, W)."""
    ys = (np.arange(h, dtype=np.float32) + 0.5 - h / 2) / (h / 2)
    xs = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / (w / 2)
    r2 = (ys[:, None] ** 2 + xs[None, :] ** 2) / 2.0  # squared radius, 1 at the corners
    return (1.0 - weight) + weight * np.exp(-r2 / (2 * sigma**2))


def otsu_mask(values: np.ndarray) -> np.ndarray:
    """Binarise a float map with Otsu's threshold on its [0, 255] rescaling; a flat map → all False."""
    if float(values.max() - values.min()) < 1e-6:
        return np.zeros(values.shape, dtype=bool)
    u8 = np.round(_unit(values.astype(np.float32)) * 255).astype(np.uint8)
    thresh, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return u8 > thresh


def classical_saliency(image: np.ndarray, centre_weight: float = 0.3) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) bool salient foreground (see the module docstring)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"classical_saliency needs an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    if float(image.std()) < 1.0:  # flat image: nothing stands out (maps would only amplify rounding noise)
        return np.zeros((h, w), dtype=bool)
    sal = 0.5 * _unit(colour_contrast_map(image)) + 0.5 * _unit(spectral_residual_map(image))
    return otsu_mask(sal * centre_prior(h, w, weight=centre_weight))


@dataclass(frozen=True)
class ClassicalSaliencyOptions:
    centre_weight: float = 0.3  # weight of the Gaussian centre prior


@register_stage("saliency", "classical", ClassicalSaliencyOptions)
class ClassicalSaliency:
    """CPU saliency: colour contrast + spectral residual, centre prior, Otsu."""

    def __init__(self, options: ClassicalSaliencyOptions = ClassicalSaliencyOptions()) -> None:
        self.centre_weight = options.centre_weight
        self.model_id = "classical:ft+spectral-residual+centre-prior+otsu"

    def setup(self) -> None:
        pass

    def __call__(self, batch: list[Item]) -> list[Item]:
        for item in alive(batch):
            item.saliency = classical_saliency(item.image, self.centre_weight)
        return batch


# -- learned: depth ------------------------------------------------------------------------------------------
def depth_work_size(h: int, w: int, resolution: int, step: int) -> tuple[int, int]:
    """(h', w'): the shorter side scaled to `resolution`, the longer one to `resolution` + a multiple of `step`
    (so each step is one aspect-ratio bucket); `step` 0 keeps (h, w)."""
    if step == 0:
        return h, w
    scale = resolution / min(h, w)
    long = resolution + max(0, round((max(h, w) * scale - resolution) / step)) * step
    return (resolution, long) if h <= w else (long, resolution)


@dataclass(frozen=True)
class DepthSaliencyOptions:
    """`resolution`, `size_step`: the working size images are resized to before the depth model, so images of
    nearby aspect ratios share a batch (`bucket_key`; the flow buckets them across chunks). The shorter side
    becomes `resolution` (518: Depth-Anything-V2's own input size, a multiple of its 14-px patch; its processor
    then leaves the image as it is), the longer one is rounded to `resolution` + a multiple of `size_step`
    (56 px ≈ 5% of the longer side's aspect at most 28 px off, undone when the depth map is resized back).
    `size_step` 0: each image at its own shape, only equal shapes batched."""

    model_name: str = "depth-saliency"  # `mlcid.registry` name of the depth model
    resolution: int = 518
    size_step: int = 56

    def __post_init__(self) -> None:
        if self.resolution < 14 or self.size_step < 0:
            raise ValueError(f"need resolution ≥ 14 and size_step ≥ 0, got {self.resolution}, {self.size_step}")


@register_stage("saliency", "depth", DepthSaliencyOptions, model_backed=True)
class DepthSaliency:
    """Learned saliency: near region (Otsu over inverse depth) of `AutoModelForDepthEstimation`."""

    def __init__(self, model: ModelStageConfig = ModelStageConfig(),
                 options: DepthSaliencyOptions = DepthSaliencyOptions()) -> None:
        self.model_id = model.location(options.model_name)
        self.device, self.dtype = model.torch_device_dtype()
        self.batch_size = max(1, model.batch_size)
        self.resolution, self.size_step = options.resolution, options.size_step
        self.model = self.processor = None

    def setup(self) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        check_model_location(self.model_id, "depth-saliency")
        self.processor = AutoImageProcessor.from_pretrained(self.model_id)
        self.model = AutoModelForDepthEstimation.from_pretrained(self.model_id, dtype=self.dtype)
        self.model.to(self.device).eval()

    def bucket_key(self, item: Item) -> tuple[int, int]:
        """Items of one working size share a model pass."""
        return depth_work_size(*item.image.shape[:2], self.resolution, self.size_step)

    def inverse_depth(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Relative inverse depth per image, resized to each image's (H, W). Images of one working size share a
        pass."""
        import torch
        import torch.nn.functional as F

        if self.model is None:
            raise RuntimeError("DepthSaliency.setup() must run before use")
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(depth_work_size(*im.shape[:2], self.resolution, self.size_step), []).append(i)
        for (wh, ww), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                work = [images[i] if images[i].shape[:2] == (wh, ww) else
                        cv2.resize(images[i], (ww, wh), interpolation=cv2.INTER_AREA
                                   if wh < images[i].shape[0] else cv2.INTER_CUBIC) for i in chunk]  # (wh, ww, 3)
                inputs = self.processor(images=work, return_tensors="pt")
                pixels = inputs["pixel_values"].to(self.device, self.dtype)  # (B, 3, h', w')
                with torch.inference_mode():
                    depth = self.model(pixel_values=pixels).predicted_depth  # (B, h'', w'')
                for j, i in enumerate(chunk):
                    h, w = images[i].shape[:2]
                    d = F.interpolate(depth[j : j + 1, None].float(), size=(h, w), mode="bilinear",
                                      align_corners=False)  # (1, 1, H, W)
                    out[i] = d[0, 0].cpu().numpy()
        return out  # type: ignore[return-value]

    def __call__(self, batch: list[Item]) -> list[Item]:
        items = alive(batch)
        for item, inv_depth in zip(items, self.inverse_depth([it.image for it in items])):
            item.saliency = otsu_mask(inv_depth)
        return batch
