"""Train a small SD-shaped `AutoencoderKL` (×8, 4 latent channels) on MLCID layer images and masks.

No pretrained VAE reaches these machines, so the learning benchmark (`benchmarks.learn_bench`) first fits one on the
exact tensors the LayerDiff trainer feeds its frozen VAE: `model.training.data.sample_to_tensors` gives each sample's layer
images (foregrounds filled outside their alpha) and 3-channel ±1 masks; both go through the same encoder, as in
training. Loss: L1 + MSE reconstruction + a small KL (SD's VAE uses KL weight 1e-6; no GAN/LPIPS here). After
training, `scaling_factor` is set to 1 / std of the latents (how SD's 0.18215 was chosen), so the diffusion model
sees unit-variance latents. Saved with `save_pretrained` (safetensors) and loaded back by `from_pretrained`.

    layerdiff train-vae --data 'shards/mlcid-{000000..000003}.tar' --out vae/ --steps 1500
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlcid.reader import MLCIDReader
from model.training.config import DataConfig
from model.training.data import sample_to_tensors

log = logging.getLogger(__name__)


# GroupNorm over g channels of a spatially flat region leaves g − 2 numbers per group (its mean and variance are
# removed): with 1–2 channels per group flat colours collapse to a handful of outputs. SD's VAE has 4 (128 / 32).
MIN_CHANNELS_PER_GROUP = 4


@dataclass
class VAETrainConfig:
    """Sizes and schedule of the small VAE. Four blocks = SD's ×8 downscale (the loaders insist on it)."""

    resolution: int = 64
    block_out_channels: tuple[int, ...] = (32, 64, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8  # ≥ MIN_CHANNELS_PER_GROUP channels per group in every block
    max_layers: int = 4
    fill_value: float = 0.0  # the trainer's default foreground fill (DataConfig.fill_value)
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    kl_weight: float = 1e-6
    max_samples: int = 1500  # scenes read into memory for training
    holdout: int = 64  # images kept out for the reconstruction report
    seed: int = 0
    threads: int = 0  # torch threads (0 = leave as is)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if len(self.block_out_channels) != 4:
            raise ValueError(f"need 4 VAE blocks (×8 like SD), got {self.block_out_channels}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block widths {self.block_out_channels} must divide by norm_num_groups "
                             f"{self.norm_num_groups}")
        per_group = min(self.block_out_channels) // self.norm_num_groups
        if per_group < MIN_CHANNELS_PER_GROUP:
            raise ValueError(
                f"norm_num_groups {self.norm_num_groups} leaves {per_group} channel(s) per group in the "
                f"{min(self.block_out_channels)}-channel block: GroupNorm removes each group's mean and variance, so "
                f"a flat region keeps {max(0, per_group - 2)} number(s) per group and its colour cannot pass the VAE; "
                f"use at most {max(1, min(self.block_out_channels) // MIN_CHANNELS_PER_GROUP)} groups")
        if self.resolution % 8 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("resolution must be a multiple of 8; steps and batch_size ≥ 1")


@dataclass
class VAEReport:
    """Held-out reconstruction quality of the trained VAE (pixels in [-1, 1])."""

    image_mse: float
    image_psnr_db: float
    mask_iou: float  # binary masks: decoded channel mean > 0 vs truth, mean IoU over foreground masks
    mask_pixel_error: float
    flat_colour_error: float  # mean |Δ| in 0-255 units on flat frames of the held-out images' mean colours
    scaling_factor: float
    train_seconds: float
    steps: int
    params_m: float
    losses: list[float] = field(default_factory=list)


def build_vae(config: VAETrainConfig):
    """A random-weight diffusers `AutoencoderKL` with SD's layout (4 blocks, 4 latent channels)."""
    from diffusers import AutoencoderKL

    n = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups, sample_size=config.resolution, scaling_factor=1.0,
    )


def load_pixels(data: str, config: VAETrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer images and masks of up to `max_samples` scenes as the trainer sees them: images (N, 3, H, W), masks
    (M, 3, H, W), both float16 in [-1, 1] (padding layers and the background mask left out)."""
    dcfg = DataConfig(resolution=config.resolution, max_layers=config.max_layers, fill_value=config.fill_value)
    rng = np.random.default_rng(config.seed)
    images, masks = [], []
    reader = MLCIDReader(data, resample=False, shuffle_shards=False)
    for n, sample in enumerate(reader):
        if n >= config.max_samples:
            break
        t = sample_to_tensors(sample, dcfg, rng)
        valid = t["layer_valid"]  # (L,)
        images.append(t["images"][valid].half())  # (n, 3, H, W)
        masks.append(t["masks"][valid][1:].half())  # foreground masks only: the background one is their complement
    if not images:
        raise ValueError(f"no MLCID samples read from {data!r}")
    return torch.cat(images), torch.cat(masks)


def _loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample  # (N, 3, H, W)
    rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
    return rec + kl_weight * posterior.kl().mean()


@torch.no_grad()
def evaluate_vae(vae, images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """MSE/PSNR on images, IoU of thresholded decoded masks (posterior mode, like `LayerDiffPipeline`), and the
    error on flat frames of each image's mean colour (what a plain background asks of the VAE)."""
    vae.eval()
    rec = vae.decode(vae.encode(images.float()).latent_dist.mode()).sample.clamp(-1, 1)  # (N, 3, H, W)
    mse = float(F.mse_loss(rec, images.float()))
    psnr = 10 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak range 2 in [-1, 1]
    m_rec = vae.decode(vae.encode(masks.float()).latent_dist.mode()).sample.mean(1) > 0  # (M, H, W)
    m_true = masks[:, 0] > 0
    inter = (m_rec & m_true).flatten(1).sum(1).float()
    union = (m_rec | m_true).flatten(1).sum(1).clamp(min=1).float()
    flat = images.float().mean((2, 3), keepdim=True).expand(images.shape).contiguous()  # (N, 3, H, W)
    f_rec = vae.decode(vae.encode(flat).latent_dist.mode()).sample.clamp(-1, 1)  # (N, 3, H, W)
    return {"image_mse": mse, "image_psnr_db": psnr, "mask_iou": float((inter / union).mean()),
            "mask_pixel_error": float((m_rec != m_true).float().mean()),
            "flat_colour_error": float((f_rec - flat).abs().mean()) * 127.5}


@torch.no_grad()
def latent_scaling(vae, pixels: torch.Tensor) -> float:
    """1 / std of the posterior-mode latents of `pixels` (SD's way of choosing `scaling_factor`)."""
    z = vae.encode(pixels.float()).latent_dist.mode()  # (N, 4, h, w)
    return float(1.0 / z.std())


def train_vae(data: str, out: str | Path, config: VAETrainConfig = VAETrainConfig(), progress: bool = True) -> VAEReport:
    """Fit the VAE on `data` shards, set its scaling factor, `save_pretrained(out)`; write `out/report.json`.

    Weights and report go to a hidden sibling folder first, which then replaces `out` (an existing `out` is
    removed only then): an interrupted run leaves `out` as it was, never half-written."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = Path(out)
    # 1. Data: images and masks together; a fixed held-out slice of each for the report.
    images, masks = load_pixels(data, config)
    h_img, h_msk = min(config.holdout, len(images) // 4), min(config.holdout, len(masks) // 4)
    test_img, test_msk = images[:h_img], masks[:h_msk]
    train = torch.cat([images[h_img:], masks[h_msk:]])  # (N, 3, H, W) float16
    log.info("VAE data: %d images + %d masks for training, %d + %d held out", len(images) - h_img,
             len(masks) - h_msk, h_img, h_msk)
    # 2. Model and optimiser.
    vae = build_vae(config).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(config.seed)
    # 3. Steps over random minibatches.
    start, losses = time.perf_counter(), []
    bar = tqdm(range(config.steps), desc="vae", unit="step", disable=not progress, mininterval=2)
    for step in bar:
        idx = torch.randint(len(train), (config.batch_size,), generator=gen)
        loss = _loss(vae, train[idx].float(), config.kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    seconds = time.perf_counter() - start
    # 4. Report, scaling factor, save.
    vae.eval()
    metrics = evaluate_vae(vae, test_img, test_msk)
    scale = latent_scaling(vae, torch.cat([images[:256], masks[:256]]))
    vae.register_to_config(scaling_factor=scale)
    report = VAEReport(**metrics, scaling_factor=scale, train_seconds=seconds, steps=config.steps,
                       params_m=sum(p.numel() for p in vae.parameters()) / 1e6,
                       losses=[float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)])
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    vae.save_pretrained(partial, safe_serialization=True)
    (partial / "report.json").write_text(json.dumps({"config": asdict(config), **asdict(report)}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    log.info("VAE: image MSE %.4f (PSNR %.1f dB), mask IoU %.3f, flat colours |Δ| %.1f / 255, scaling %.4f, %.0f s",
             report.image_mse, report.image_psnr_db, report.mask_iou, report.flat_colour_error, scale, seconds)
    return report


def load_report(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "report.json").read_text())

