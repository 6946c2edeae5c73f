"""See what the model learns while it trains: sample a fixed prompt set with the current (EMA) weights.

Every `validation_every` steps rank 0 builds a `LayerDiffPipeline` around the training UNet (EMA weights swapped
in, then back), samples each prompt with a fixed seed, and returns one grid image: a row per prompt with the
composite, then every layer, then every mask. The trainer logs it to TensorBoard and as a PNG in the run folder.
Training RNG is untouched (the sampler draws from its own generator inside `torch.random.fork_rng`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mlcid.reader import MLCIDReader
from mlcid.schema import BACKGROUND_PROMPT

FOLDER = "validation"


@dataclass
class ValidationPrompt:
    """One global prompt and its layer prompts (index 0 = the background)."""

    prompt: str
    layers: list[str]


def prompts_from_config(items: list[dict[str, Any]]) -> list[ValidationPrompt]:
    out = []
    for item in items:
        if not isinstance(item, dict) or "prompt" not in item or not item.get("layers"):
            raise ValueError(f"validation_prompts: each item needs 'prompt' and 'layers', got {item!r:.120}")
        layers = list(item["layers"])
        out.append(ValidationPrompt(item["prompt"], layers if layers[0] == BACKGROUND_PROMPT else [BACKGROUND_PROMPT, *layers]))
    return out


def prompts_from_data(shards: str, count: int, max_layers: int) -> list[ValidationPrompt]:
    """The prompts of the first `count` valid samples (at most `max_layers` layers) of the first shard(s)."""
    out: list[ValidationPrompt] = []
    for sample in MLCIDReader(shards, rank=0, world_size=1):
        if sample.num_layers <= max_layers:
            out.append(ValidationPrompt(sample.global_prompt, [layer.prompt for layer in sample.layers]))
        if len(out) >= count:
            break
    return out


def grid(composites: list[np.ndarray], layers: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """Rows of [composite | layer 0..L-1 | mask 0..L-1] (uint8, H × W × 3 tiles); short rows padded with black."""
    width = max(len(ls) for ls in layers)
    rows = []
    for comp, ls, ms in zip(composites, layers, masks):  # comp (H, W, 3), ls (L, H, W, 3), ms (L, H, W)
        blank = np.zeros_like(comp)
        tiles = [comp, *ls, *([blank] * (width - len(ls))), *np.repeat(ms[..., None], 3, -1),
                 *([blank] * (width - len(ms)))]
        rows.append(np.concatenate(tiles, axis=1))  # (H, (1 + 2L) W, 3)
    return np.concatenate(rows, axis=0)  # (rows H, (1 + 2L) W, 3)


@contextlib.contextmanager
def ema_weights(unet: torch.nn.Module, ema: Any):
    """Swap the EMA weights into `unet` for the block (a no-op without EMA); the training weights come back."""
    if ema is None:
        yield
        return
    saved = {n: p.detach().clone() for n, p in unet.named_parameters() if n in ema.shadow}
    ema.copy_to(unet)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


@torch.no_grad()
def sample_grid(components: Any, unet: torch.nn.Module, ema: Any, prompts: list[ValidationPrompt], size: int,
                steps: int, seed: int, amp: torch.dtype | None) -> np.ndarray:
    """Sample every prompt with the current (EMA) weights and return the grid (uint8, H × W × 3)."""
    from model.sampling.pipeline import LayerDiffPipeline

    device = next(unet.parameters()).device
    pipe = LayerDiffPipeline(unet=unet, vae=components.vae, text_encoder=components.text_encoder,
                             tokenizer=components.tokenizer, scheduler=components.scheduler)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    comps, layers, masks = [], [], []
    devices = [device] if device.type == "cuda" else []
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=devices), ema_weights(unet, ema), autocast:
            for i, p in enumerate(prompts):
                gen = torch.Generator(device).manual_seed(seed + i)
                out = pipe(p.prompt, p.layers, num_inference_steps=steps, height=size, width=size, generator=gen,
                           output_type="np")
                comps.append(out.composites[0])
                layers.append(out.layer_images[0])
                masks.append(out.masks[0])
    finally:
        unet.train(was_training)
    return grid(comps, layers, masks)


def save_png(image: np.ndarray, run_dir: Path, step: int) -> str:
    """Write a grid as `validation/step-NNNNNN.png` under `run_dir`; returns that relative name."""
    name = f"{FOLDER}/step-{step:06d}.png"
    (run_dir / FOLDER).mkdir(exist_ok=True)
    Image.fromarray(image).save(run_dir / name)
    return name


def log_hparams(writer: Any, config: dict[str, Any]) -> None:
    """The training config as TensorBoard hparams, in the run's own event file (nested keys dotted)."""
    from torch.utils.tensorboard.summary import hparams

    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix.rstrip(".")] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config)
    for summary in hparams(flat, {"train/loss": float("nan")}):
        writer._get_file_writer().add_summary(summary)


LOSS_CURVE = "loss.png"


def loss_curve_from(metrics: Path) -> Image.Image:
    """`loss_curve` of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return loss_curve([r["step"] for r in rows], [r["loss"] for r in rows])


def loss_curve(steps: list[int], losses: list[float], size: tuple[int, int] = (640, 320)) -> Image.Image:
    """The training loss against the step as a picture (raw values light, a running mean dark), for the card."""
    from PIL import ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 10, 10, height - 30  # plot area
    draw.rectangle((left, top, right, bottom), outline="black")
    if not losses:
        return image
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-6
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step: int, loss: float) -> tuple[float, float]:
        return (left + (step - first) / (last - first) * (right - left),
                bottom - (loss - lo) / (hi - lo) * (bottom - top))

    window = max(1, len(losses) // 50)
    mean = np.convolve(losses, np.ones(window) / window, mode="valid")  # (N - window + 1,)
    draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(170, 190, 230), width=1)
    draw.line([xy(s, float(v)) for s, v in zip(steps[window - 1:], mean)], fill=(20, 50, 140), width=2)
    draw.text((4, top), f"{hi:.4g}", fill="black")
    draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
    draw.text((left, bottom + 8), f"step {first}", fill="black")
    draw.text((right - 70, bottom + 8), f"step {steps[-1]}", fill="black")
    draw.text((left + 8, top + 4), "training loss", fill="black")
    return image
