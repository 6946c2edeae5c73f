"""One LayerDiff training step's forward: frozen VAE/CLIP encodings, noising, the UNet call and the loss (Eq. 5)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange

from model.training.data import Batch
from model.loading import encode_prompts
from model.training.losses import drop_prompts, layered_noise_loss, sample_timesteps

VAE_CHUNK = 32  # layer images per VAE encoder call


@dataclass
class Generators:
    """The trainer's own random streams (saved in checkpoints): `cpu` for draws, `device` for noise tensors."""

    cpu: torch.Generator
    device: torch.Generator

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> "Generators":
        return cls(torch.Generator("cpu").manual_seed(seed), torch.Generator(device).manual_seed(seed + 1))

    def state(self) -> dict[str, torch.Tensor]:
        return {"cpu": self.cpu.get_state(), "device": self.device.get_state()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.cpu.set_state(state["cpu"])
        self.device.set_state(state["device"])


class LayerDiffObjective:
    """Frozen encoders + the training noise schedule: turns a `Batch` into the masked noise-prediction loss.

    Layer images and masks (masks already 3-channel) go through the SAME frozen VAE encoder; latents are
    `sample × scaling_factor`. Each prompt (global and per layer) is encoded separately by the frozen CLIP text
    encoder (identical prompts in a batch are encoded once). Padding layers get zero latents and "" prompts and
    carry no loss.
    """

    def __init__(self, vae: Any, text_encoder: Any, tokenizer: Any, noise_scheduler: Any, config: Any,
                 device: torch.device, autocast_dtype: torch.dtype | None) -> None:
        if noise_scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"LayerDiff predicts ε; the scheduler's prediction_type is "
                             f"{noise_scheduler.config.prediction_type!r}")
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.scheduler = noise_scheduler
        self.config = config
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.scaling = float(vae.config.scaling_factor)
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode_layers(self, pixels: torch.Tensor, valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """pixels (B, L, 3, H, W) in [-1, 1], valid (B, L) → latents (B, L, 4, H/8, W/8); zeros on padding."""
        B, L = valid.shape
        flat = rearrange(pixels, "b l c h w -> (b l) c h w")
        keep = valid.reshape(-1).to(flat.device)  # (B·L,)
        x = flat[keep].to(self.device, self.vae.dtype, non_blocking=True)  # (N, 3, H, W)
        parts = [self.vae.encode(chunk).latent_dist.sample(generator=generator) for chunk in x.split(VAE_CHUNK)]
        z = torch.cat(parts) * self.scaling  # (N, 4, h, w)
        out = torch.zeros((B * L, *z.shape[1:]), device=self.device, dtype=torch.float32)
        out[keep.to(self.device)] = z.float()
        return rearrange(out, "(b l) c h w -> b l c h w", b=B)

    @torch.no_grad()
    def encode_text(self, global_prompts: list[str], layer_prompts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """→ global (B, 77, D), layer (B, L, 77, D) in float32; identical prompts encoded once."""
        B, L = len(layer_prompts), len(layer_prompts[0])
        flat = list(global_prompts) + [p for ps in layer_prompts for p in ps]
        unique = sorted(set(flat))
        emb = encode_prompts(self.tokenizer, self.text_encoder, unique).float()  # (U, 77, D)
        index = torch.tensor([unique.index(p) for p in flat], device=emb.device)
        all_emb = emb[index]  # (B + B·L, 77, D)
        layer = rearrange(all_emb[B:], "(b l) t d -> b l t d", b=B, l=L)
        return all_emb[:B], layer

    def loss(self, unet: torch.nn.Module, batch: Batch, gen: Generators) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 5 on one micro-batch: noise image+mask latents, predict ε for all layers, masked MSE."""
        cfg = self.config
        valid = batch.layer_valid.to(self.device)  # (B, L)
        B, L = valid.shape
        # 1. Frozen encoders.
        z_img = self.encode_layers(batch.images, batch.layer_valid, gen.device)  # (B, L, 4, h, w)
        z_msk = self.encode_layers(batch.masks, batch.layer_valid, gen.device)  # (B, L, 4, h, w)
        latents = torch.cat([z_img, z_msk], dim=2)  # (B, L, 8, h, w)
        g_prompts, l_prompts = drop_prompts(batch.global_prompts, batch.layer_prompts, cfg.global_prompt_drop,
                                            cfg.layer_prompt_drop, gen.cpu)
        global_text, layer_text = self.encode_text(g_prompts, l_prompts)  # (B, 77, D), (B, L, 77, D)
        # 2. Timesteps (shared by a sample's layers with prob. p, else per layer) and noise on both latents.
        t = sample_timesteps(B, L, self.num_train_timesteps, cfg.shared_timestep_prob, gen.cpu).to(self.device)
        noise = torch.randn(latents.shape, generator=gen.device, device=self.device)  # (B, L, 8, h, w)
        noisy = self.scheduler.add_noise(
            rearrange(latents, "b l c h w -> (b l) c h w"), rearrange(noise, "b l c h w -> (b l) c h w"),
            t.reshape(-1),
        )
        noisy = rearrange(noisy, "(b l) c h w -> b l c h w", b=B)  # (B, L, 8, h, w)
        # 3. Predict ε for every layer; loss on valid layers only.
        with self.autocast():
            pred = unet(noisy, t, global_text, layer_text, layer_valid=valid).sample  # (B, L, 8, h, w)
        return layered_noise_loss(pred, noise, valid, latent_channels=z_img.shape[2], mask_weight=cfg.mask_loss_weight)


def pick_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast on CUDA, none (fp32) on CPU."""
    if device.type != "cuda" or mixed_precision == "no":
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
