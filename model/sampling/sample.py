"""Sample layered images with a trained LayerDiff run and export them (`make sample`; the command is cli/sample.py).

    layerdiff sample --model runs/layerdiff --prompt 'a dog playing with a red ball on the grass' \\
        --layers 'the background|a red ball|a dog' --out out/dog [--steps 50 --cfg 3 --smg 3 --seed 0]

Writes one output folder per image (layers.json, layerNN.png, maskNN.png, composite.png, layers.psd,
layers.ora — see model/export.py); with --num-images N > 1 the folders are OUT/000, OUT/001, …
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.sampling.guidance import smg_variant
from model.sampling.pipeline import LayerDiffPipeline

log = logging.getLogger("model.sampling.sample")


@dataclass
class SampleConfig:
    """One `make sample` invocation."""

    model: str
    global_prompt: str
    layer_prompts: list[str]
    out: Path
    steps: int = 50
    cfg: float = 3.0
    smg: float = 3.0
    guidance: str = "cfg+smg"
    smg_variant: str = "default"  # a name of model.sampling.guidance.SMG_VARIANTS ("default" = Eq. 9 as printed)
    smg_start: float = 0.0  # SMG on the steps i with smg_start <= i / steps < smg_end (0 and 1: every step, the paper)
    smg_end: float = 1.0
    smg_mask_interval: int = 1  # SMG's layer masks re-decoded every this many steps
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    max_batch: int | None = None
    from_sd: bool = False
    previews: int = 0  # save x0 previews every N steps (Fig. 13); 0 = off
    device: str = "auto"
    dtype: str = "float32"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.global_prompt.strip():
            raise ValueError("--prompt is empty: give a global prompt describing the whole image")
        smg_variant(self.smg_variant)  # an unknown name fails here, before any model loads
        if not 0.0 <= self.smg_start < self.smg_end <= 1.0 or self.smg_mask_interval < 1:
            raise ValueError(f"need 0 <= --smg-start < --smg-end <= 1 and --smg-mask-interval >= 1, got "
                             f"{self.smg_start}, {self.smg_end}, {self.smg_mask_interval}")

    def folders(self) -> list[Path]:
        """The output folder of each image: OUT itself for one image, OUT/000, OUT/001, … for several."""
        return [self.out] if self.num_images == 1 else [self.out / f"{i:03d}" for i in range(self.num_images)]


def parse_layers(text: str) -> list[str]:
    """'the background|a red ball|a dog' → ['the background', 'a red ball', 'a dog'] (empty parts refused)."""
    parts = [p.strip() for p in text.split("|")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"--layers must be '|'-separated non-empty prompts, background first; got {text!r}")
    return parts


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """'x0,y0,x1,y1;x0,y0,x1,y1' (pixels, one per foreground) → list of boxes."""
    boxes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        values = part.split(",")
        if len(values) != 4:
            raise ValueError(f"a box is 'x0,y0,x1,y1', got {part!r}")
        boxes.append(tuple(int(v) for v in values))
    return boxes


def load_pipeline(model: str, device: str = "auto", dtype: str = "float32", from_sd: bool = False) -> LayerDiffPipeline:
    """The run folder (or, with `from_sd`, an untrained LayerDiff made from an SD-1.x folder) on the device."""
    target = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if from_sd:
        log.warning("--from-sd: LayerDiff initialised from %s WITHOUT training (smoke tests and demos only)", model)
        pipe = LayerDiffPipeline.from_sd(model, dtype=torch_dtype)
    else:
        pipe = LayerDiffPipeline.from_pretrained(model, dtype=torch_dtype)
    return pipe.to(target)


def save_previews(path: Path, intermediates) -> None:
    """A grid: one row per preview step, the layer images then the layer masks (first image of the batch)."""
    rows = []
    for item in intermediates:
        images = list(item.images[0])  # L × (H, W, 3)
        masks = [np.repeat(m[..., None], 3, axis=-1) for m in item.masks[0]]
        rows.append(np.concatenate(images + masks, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def run(config: SampleConfig) -> list[Path]:
    """Sample and export; returns the written output folders."""
    from model.sampling.applications import sample_with_mask_priors

    existing = [f for f in config.folders() if f.exists()]
    if existing and not config.overwrite:  # before any model loads or samples
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
    pipe = load_pipeline(config.model, config.device, config.dtype, config.from_sd)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    smg = smg_variant(config.smg_variant)
    kwargs = dict(num_inference_steps=config.steps, guidance_scale=config.cfg, smg_scale=config.smg,
                  guidance=config.guidance, smg=smg, smg_start=config.smg_start, smg_end=config.smg_end,
                  smg_mask_interval=config.smg_mask_interval, height=config.height,
                  width=config.width, num_images=config.num_images, generator=generator, max_batch=config.max_batch,
                  return_intermediates=config.previews > 0, intermediate_every=max(config.previews, 1),
                  output_type="np")
    start = time.perf_counter()
    if config.boxes:
        out = sample_with_mask_priors(pipe, config.global_prompt, config.layer_prompts, boxes=config.boxes, **kwargs)
    else:
        out = pipe(config.global_prompt, config.layer_prompts, **kwargs)
    log.info("sampled %d × %d layers in %.1f s", config.num_images, len(config.layer_prompts),
             time.perf_counter() - start)
    folders = config.folders()
    for i, folder in enumerate(folders):
        out.save(folder, index=i, overwrite=config.overwrite, seed=config.seed, model=config.model,
                 extra={"batch_index": i, "smg_variant": config.smg_variant, "smg_start": config.smg_start,
                        "smg_end": config.smg_end,
                        "smg_mask_interval": config.smg_mask_interval, "boxes": [list(b) for b in config.boxes],
                        "untrained": config.from_sd})
        if out.intermediates:
            save_previews(folder / "previews.png", [_one(item, i) for item in out.intermediates])
        log.info("wrote %s", folder)
    return folders


def _one(item, index: int):
    """The intermediate of batch item `index` only (keeps a batch axis of 1)."""
    return type(item)(step=item.step, timestep=item.timestep, images=item.images[index:index + 1],
                      masks=item.masks[index:index + 1])
