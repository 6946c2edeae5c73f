"""LayerDiff applications without fine-tuning (paper §5.5, Appendices D and F): layer inpainting, layer style
transfer, sampling with mask priors (boxes or masks), and iterative layer adding.

Each edit takes a `mlcid.layered.LayeredImage` — from an output folder (`export.load_layers`), an MLCID sample
(`source_from_sample`) or a pipeline output (`output.layered(i)`) — and returns a `LayerDiffPipelineOutput`.

    src = load_layers("out/dog")                                          # layers.json + layerNN/maskNN.png
    out = layer_inpaint(pipe, src, {1: "a cat"}, generator=torch.Generator().manual_seed(0))
    save_output("out/cat", out.layered(0))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from mlcid.layered import LayeredImage
from mlcid.schema import BACKGROUND_PROMPT, MLCIDSample
from model.sampling import guidance as G
from model.training.config import DataConfig
from model.sampling.pipeline import KeepLayers, LayerDiffPipeline, LayerDiffPipelineOutput

MASK_HOLD_STEPS = 1  # Appendix D: non-target mask latents held for k = 1 step
STYLE_STRENGTH = 0.8  # Appendix D: SDEdit strength for layer style transfer
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, exclusive end (as mlcid LayerInfo.box)


# ------------------------------------------------------------------------------------------------ encoding


def _to_pixels(arrays: Sequence[np.ndarray], size: tuple[int, int], is_mask: bool) -> torch.Tensor:
    """uint8 images (H, W, 3) or masks (H, W) → (1, L, 3, h, w) in [-1, 1] at `size` (masks repeated to RGB)."""
    out = []
    for arr in arrays:
        im = Image.fromarray(np.asarray(arr))
        if (im.height, im.width) != size:
            im = im.resize((size[1], size[0]), Image.NEAREST if is_mask else Image.BICUBIC)
        x = torch.from_numpy(np.array(im, dtype=np.float32) / 127.5 - 1.0)
        out.append(x[None].expand(3, *size) if is_mask else x.permute(2, 0, 1))  # (3, h, w)
    return torch.stack(out)[None]  # (1, L, 3, h, w)


def encode_layers(pipe: LayerDiffPipeline, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  size: tuple[int, int]) -> torch.Tensor:
    """Layer images and masks → clean latents (1, L, 8, h, w): image ‖ mask, through the same VAE (§4.1)."""
    z_img = pipe.encode_pixels(_to_pixels(images, size, is_mask=False))  # (1, L, 4, h, w)
    z_msk = pipe.encode_pixels(_to_pixels(masks, size, is_mask=True))  # (1, L, 4, h, w)
    return torch.cat([z_img, z_msk], dim=2).float()


def _target_size(pipe: LayerDiffPipeline, src: LayeredImage, height: int | None,
                 width: int | None) -> tuple[int, int]:
    """(h, w) to sample at: as given, else the source's size rounded down to the VAE's factor."""
    f = pipe.vae_scale_factor
    return height or max(f, src.height // f * f), width or max(f, src.width // f * f)


def source_from_sample(sample: MLCIDSample) -> LayeredImage:
    """An MLCID sample as an edit source, its foregrounds filled outside their dilated alpha as in training."""
    return LayeredImage.from_sample(sample, fill=int(round((DataConfig().fill_value + 1) * 127.5)))


def _check_source(source: LayeredImage) -> LayeredImage:
    if not isinstance(source, LayeredImage):
        raise TypeError(f"the source must be a LayeredImage, got {type(source).__name__}: read an output folder "
                        "with export.load_layers(folder), a sample with LayeredImage.from_sample(sample), a "
                        "pipeline output with output.layered(i)")
    if len(source.layer_prompts) != source.num_layers:
        raise ValueError(f"the source has {source.num_layers} layers but {len(source.layer_prompts)} layer prompts")
    return source


def _check_layers(indices: Sequence[int], num_layers: int, what: str) -> tuple[int, ...]:
    idx = tuple(int(i) for i in indices)
    if not idx:
        raise ValueError(f"no {what} given: name at least one layer index (0 = background)")
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{what} {bad} outside the source's layers 0..{num_layers - 1}")
    return tuple(sorted(set(idx)))


def _noise(pipe: LayerDiffPipeline, shape: tuple[int, ...], generator) -> torch.Tensor:
    return randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ 1. inpainting


def layer_inpaint(
    pipe: LayerDiffPipeline,
    source: LayeredImage,
    new_prompts: Mapping[int, str],
    global_prompt: str | None = None,
    mask_hold_steps: int = MASK_HOLD_STEPS,
    num_inference_steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    mask_priors: Mapping[int, np.ndarray] | None = None,
    **sampler: Any,
) -> LayerDiffPipelineOutput:
    """Appendix D: regenerate the layers in `new_prompts` (index → prompt) from noise; the others are encoded,
    noised to T, and their predicted x0 is replaced by the original latents at every step (image latents) or
    during the first `mask_hold_steps` steps (mask latents, so masks adapt to the new layers).

    `mask_priors` (index → (H, W) 0/255 mask) start chosen layers' mask latents from a noised prior instead of
    the source mask (targets) — used by iterative generation. `sampler`: more `LayerDiffPipeline` arguments.
    """
    # 1. Check inputs.
    src = _check_source(source)
    targets = _check_layers(list(new_prompts), src.num_layers, "target layers")
    if mask_hold_steps < 0:
        raise ValueError(f"mask_hold_steps must be >= 0, got {mask_hold_steps}")
    prompts = [new_prompts.get(i, p) for i, p in enumerate(src.layer_prompts)]
    keep_idx = tuple(i for i in range(src.num_layers) if i not in targets)
    size = _target_size(pipe, src, height, width)
    masks = list(src.masks)
    for i, prior in (mask_priors or {}).items():
        _check_layers([i], src.num_layers, "mask prior layer")
        masks[i] = np.asarray(prior)

    # 2. Clean latents of every layer, the first timestep, and noise.
    z0 = encode_layers(pipe, src.images, masks, size)  # (1, L, 8, h, w)
    t_first = pipe.prepare_timesteps(num_inference_steps)[0]
    noise = _noise(pipe, (sampler.get("num_images", 1), *z0.shape[1:]), generator)  # (B, L, 8, h, w)
    # 3. Non-target layers (and any prior masks) noised to T; target layers from Gaussian noise.
    latents = G.add_noise(z0.to(noise.device), noise, pipe.alpha_bar(t_first))
    fresh = torch.zeros(1, src.num_layers, z0.shape[2], 1, 1, dtype=torch.bool, device=noise.device)  # (1, L, 8, 1, 1)
    fresh[:, list(targets)] = True
    c = pipe.latent_channels
    for i in mask_priors or {}:
        fresh[:, i, c:] = False
    latents = torch.where(fresh, noise * pipe.scheduler.init_noise_sigma, latents)
    keep = KeepLayers(latents=z0, image_layers=keep_idx, mask_layers=keep_idx, mask_steps=mask_hold_steps)
    return pipe(global_prompt if global_prompt is not None else src.global_prompt, prompts,
                num_inference_steps=num_inference_steps, height=size[0], width=size[1], generator=generator,
                latents=latents, keep=keep, **sampler)


# ------------------------------------------------------------------------------------------------ 2. style transfer


def layer_style_transfer(
    pipe: LayerDiffPipeline,
    source: LayeredImage,
    targets: Sequence[int],
    style: str | None = None,
    new_prompts: Mapping[int, str] | None = None,
    global_prompt: str | None = None,
    strength: float = STYLE_STRENGTH,
    num_inference_steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    **sampler: Any,
) -> LayerDiffPipelineOutput:
    """Appendix D: SDEdit on all layers (noise to `strength`, denoise the last `strength` of the steps) with the
    style text appended to the target layer prompts and the global prompt ("…, in Van Gogh style"); non-target
    layers get their original x0 back on image AND mask latents at every step."""
    # 1. Check inputs.
    src = _check_source(source)
    targets = _check_layers(targets, src.num_layers, "target layers")
    if not style and not new_prompts:
        raise ValueError("give a `style` to append to the target prompts, or `new_prompts`")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    suffix = f", {style}" if style else ""
    prompts = [(new_prompts or {}).get(i, p + suffix if i in targets else p) for i, p in enumerate(src.layer_prompts)]
    g_prompt = global_prompt if global_prompt is not None else src.global_prompt + suffix
    keep_idx = tuple(i for i in range(src.num_layers) if i not in targets)
    size = _target_size(pipe, src, height, width)

    # 2. Encode every layer, noise all to the first kept timestep (SDEdit).
    z0 = encode_layers(pipe, src.images, src.masks, size)  # (1, L, 8, h, w)
    timesteps = pipe.prepare_timesteps(num_inference_steps, strength)
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} leaves no denoising step out of {num_inference_steps}")
    noise = _noise(pipe, (sampler.get("num_images", 1), *z0.shape[1:]), generator)  # (B, L, 8, h, w)
    latents = G.add_noise(z0.to(noise.device), noise, pipe.alpha_bar(timesteps[0]))
    keep = KeepLayers(latents=z0, image_layers=keep_idx, mask_layers=keep_idx, mask_steps=None)
    return pipe(g_prompt, prompts, num_inference_steps=num_inference_steps, height=size[0], width=size[1],
                generator=generator, latents=latents, strength=strength, keep=keep, **sampler)


# ------------------------------------------------------------------------------------------------ 3. mask priors


def prior_masks(num_foregrounds: int, height: int, width: int, boxes: Sequence[Box] | None = None,
                masks: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Appendix F.1 mask priors, one per layer (H, W) 0/255: each foreground its box (or mask), the background
    the complement of their union."""
    if (boxes is None) == (masks is None):
        raise ValueError("give either boxes or masks as mask priors (exactly one of them)")
    given = boxes if boxes is not None else masks
    if len(given) != num_foregrounds:
        raise ValueError(f"{len(given)} {'boxes' if boxes is not None else 'masks'} for {num_foregrounds} "
                         "foreground layers: give one per foreground (background excluded)")
    fgs = []
    if boxes is not None:
        for i, box in enumerate(boxes, start=1):
            x0, y0, x1, y1 = (int(v) for v in box)
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise ValueError(f"box {i} {tuple(box)} is empty or outside the {width}x{height} image "
                                 "(want 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
            m = np.zeros((height, width), dtype=bool)
            m[y0:y1, x0:x1] = True
            fgs.append(m)
    else:
        for i, m in enumerate(masks, start=1):
            m = np.asarray(m)
            if m.shape != (height, width):
                raise ValueError(f"mask prior {i} is {m.shape}, the image is {(height, width)}")
            fgs.append(m > (127 if m.dtype == np.uint8 else 0.5))
    background = ~np.logical_or.reduce(fgs)
    return [np.where(m, 255, 0).astype(np.uint8) for m in (background, *fgs)]


def mask_prior_latents(pipe: LayerDiffPipeline, priors: Sequence[np.ndarray], num_inference_steps: int,
                       generator: torch.Generator | None = None, num_images: int = 1) -> torch.Tensor:
    """Initial latents (B, L, 8, h, w) for prior masks (one per layer, background first): one Gaussian draw
    (B, L, 8, h, w) from `generator`; image channels = that noise; mask channels = the VAE-encoded priors noised
    to the first timestep with that noise's mask channels (Eq. 1)."""
    height, width = priors[0].shape
    c = pipe.latent_channels
    z_mask = pipe.encode_pixels(_to_pixels(priors, (height, width), is_mask=True)).float()  # (1, L, 4, h, w)
    noise = _noise(pipe, (num_images, len(priors), 2 * c, *z_mask.shape[-2:]), generator)  # (B, L, 8, h, w)
    t_first = pipe.prepare_timesteps(num_inference_steps)[0]
    mask_t = G.add_noise(z_mask.to(noise.device), noise[:, :, c:], pipe.alpha_bar(t_first))
    return torch.cat([noise[:, :, :c] * pipe.scheduler.init_noise_sigma, mask_t], dim=2)


def sample_with_mask_priors(
    pipe: LayerDiffPipeline,
    global_prompt: str,
    layer_prompts: Sequence[str],
    boxes: Sequence[Box] | None = None,
    masks: Sequence[np.ndarray] | None = None,
    num_inference_steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    num_images: int = 1,
    **sampler: Any,
) -> LayerDiffPipelineOutput:
    """Appendix F.1: start the mask latents from noised box/mask priors, image latents from Gaussian noise,
    then sample as usual."""
    if not layer_prompts:
        raise ValueError("no layer prompts: give the background prompt first, e.g. ['the background', 'a dog']")
    height, width = height or pipe.default_size, width or pipe.default_size
    priors = prior_masks(len(layer_prompts) - 1, height, width, boxes, masks)
    latents = mask_prior_latents(pipe, priors, num_inference_steps, generator, num_images)
    return pipe(global_prompt, list(layer_prompts), num_inference_steps=num_inference_steps, height=height,
                width=width, generator=generator, latents=latents, num_images=num_images, **sampler)


# ------------------------------------------------------------------------------------------------ 4. iterative


@dataclass
class IterativeResult:
    """The layered image built so far (`layers`) and the 2-layer output of every step."""

    layers: LayeredImage
    steps: list[LayerDiffPipelineOutput]


def iterative_generation(
    pipe: LayerDiffPipeline,
    global_prompt: str,
    foreground_prompts: Sequence[str],
    boxes: Sequence[Box | None] | None = None,
    start: LayeredImage | None = None,
    num_inference_steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    **sampler: Any,
) -> IterativeResult:
    """Appendix F.2: keep a two-layer structure and add foregrounds one by one. Each step merges the layers so
    far into one background (Eq. 4 composite) and inpaints layer 1 with the next prompt (optionally starting
    its mask from a box prior, the background's from the complement). Without `start`, the first foreground
    is sampled together with a new background (with its box prior when given)."""
    # 1. Check inputs.
    if not foreground_prompts:
        raise ValueError("no foreground prompts to add")
    if sampler.get("num_images", 1) != 1:
        raise ValueError("iterative generation builds one image at a time (num_images must be 1)")
    boxes = list(boxes) if boxes is not None else [None] * len(foreground_prompts)
    if len(boxes) != len(foreground_prompts):
        raise ValueError(f"{len(boxes)} boxes for {len(foreground_prompts)} foreground prompts (use None for "
                         "a foreground without a box)")
    steps: list[LayerDiffPipelineOutput] = []
    prompts = list(foreground_prompts)

    # 2. The starting layered image: given, or sampled with the first foreground.
    if start is None:
        first, box = prompts.pop(0), boxes.pop(0)
        two = [BACKGROUND_PROMPT, first]
        if box is not None:
            out = sample_with_mask_priors(pipe, global_prompt, two, boxes=[box], num_inference_steps=num_inference_steps,
                                          height=height, width=width, generator=generator, **sampler)
        else:
            out = pipe(global_prompt, two, num_inference_steps=num_inference_steps, height=height, width=width,
                       generator=generator, **sampler)
        steps.append(out)
        layers = out.layered(0)
    else:
        layers = _check_source(start)
    h, w = layers.height, layers.width

    # 3. Each next foreground: merge → 2-layer inpainting of layer 1 → append.
    for prompt, box in zip(prompts, boxes):
        merged = layers.composite  # (H, W, 3): everything so far as one background
        if box is not None:
            priors = prior_masks(1, h, w, boxes=[box])  # [background = complement, foreground = box]
        else:
            priors = [np.full((h, w), 255, np.uint8), np.zeros((h, w), np.uint8)]
        two = LayeredImage.from_arrays([merged, merged], priors, global_prompt, [BACKGROUND_PROMPT, prompt])
        out = layer_inpaint(pipe, two, {1: prompt}, num_inference_steps=num_inference_steps, height=height,
                            width=width, generator=generator, mask_priors={1: priors[1]} if box else None,
                            output_type="np", **{k: v for k, v in sampler.items() if k != "output_type"})
        steps.append(out)
        new_image = _resize_like(out.layer_images[0, 1], (h, w), Image.BICUBIC)
        new_mask = _resize_like(out.masks[0, 1], (h, w), Image.NEAREST)
        layers = layers.with_foreground(new_image, new_mask, prompt)
    return IterativeResult(layers=layers.replace(global_prompt=global_prompt), steps=steps)


def _resize_like(arr: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    if arr.shape[:2] == size:
        return np.asarray(arr)
    return np.asarray(Image.fromarray(np.asarray(arr)).resize((size[1], size[0]), resample))
