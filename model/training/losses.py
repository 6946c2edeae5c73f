"""The LayerDiff training objective's pieces (paper §4.1 Eq. 5, §5.1–5.2): timesteps, prompt drops, masked MSE."""

from __future__ import annotations

import torch
from einops import reduce


def sample_timesteps(
    batch: int, layers: int, num_train_timesteps: int, shared_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """(B, L) int64 timesteps: with probability `shared_prob` one t for all layers of a sample, else one per layer."""
    per_layer = torch.randint(0, num_train_timesteps, (batch, layers), generator=generator)  # (B, L)
    shared = per_layer[:, :1].expand(batch, layers)  # (B, L): layer 0's draw for every layer
    use_shared = torch.rand(batch, generator=generator) < shared_prob  # (B,)
    return torch.where(use_shared[:, None], shared, per_layer)


def drop_prompts(
    global_prompts: list[str], layer_prompts: list[list[str]], global_p: float, layer_p: float,
    generator: torch.Generator,
) -> tuple[list[str], list[list[str]]]:
    """Replace prompts by "" (the unconditional prompt for CFG): the global prompt with probability `global_p`,
    and, independently, all layer prompts of a sample together with probability `layer_p`."""
    B = len(global_prompts)
    drop_global = (torch.rand(B, generator=generator) < global_p).tolist()
    drop_layers = (torch.rand(B, generator=generator) < layer_p).tolist()
    new_global = ["" if d else p for p, d in zip(global_prompts, drop_global)]
    new_layers = [[""] * len(ps) if d else list(ps) for ps, d in zip(layer_prompts, drop_layers)]
    return new_global, new_layers


def layered_noise_loss(
    pred: torch.Tensor, target: torch.Tensor, layer_valid: torch.Tensor, latent_channels: int = 4,
    mask_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE between predicted and true noise of image (ch :4) and mask (ch 4:) latents, over valid layers only.

    pred, target (B, L, 8, h, w); layer_valid (B, L) bool. Returns (loss, {"image": mse, "mask": mse}) with
    loss = (mse_image + w·mse_mask) / (1 + w) — for w = 1 the plain mean over all 8 channels (Eq. 5).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if layer_valid.shape != pred.shape[:2]:
        raise ValueError(f"layer_valid {tuple(layer_valid.shape)} does not match (B, L) {tuple(pred.shape[:2])}")
    err = (pred.float() - target.float()).pow(2)  # (B, L, 8, h, w)
    img = reduce(err[:, :, :latent_channels], "b l c h w -> b l", "mean")  # (B, L)
    msk = reduce(err[:, :, latent_channels:], "b l c h w -> b l", "mean")  # (B, L)
    w = layer_valid.to(err.dtype)  # (B, L)
    n = w.sum().clamp_min(1.0)
    mse_img, mse_msk = (img * w).sum() / n, (msk * w).sum() / n
    loss = (mse_img + mask_weight * mse_msk) / (1.0 + mask_weight)
    return loss, {"image": mse_img.detach(), "mask": mse_msk.detach()}
