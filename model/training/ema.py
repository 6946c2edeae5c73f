"""Exponential moving average of trainable weights, saved as safetensors (no pickles)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


# Not diffusers' EMAModel: by default it ramps the decay ((1 + t) / (10 + t), capped at `decay`) and its state_dict()
# is meant for torch.save (a pickle); this one keeps the configured decay from step 1 and saves safetensors.
class EMA:
    """shadow ← decay·shadow + (1 − decay)·param after each optimiser step; float32 shadows on the model's device."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (same parameter names)."""
        params = dict(model.named_parameters())
        missing = set(self.shadow) - set(params)
        if missing:
            raise ValueError(f"EMA weights do not match the model: {len(missing)} missing, e.g. {sorted(missing)[:3]}")
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous().cpu() for k, v in self.shadow.items()}, str(path))

    def load(self, path: str | Path) -> None:
        loaded = load_file(str(path))
        if set(loaded) != set(self.shadow):
            raise ValueError(f"{path}: EMA weights are for another model ({len(loaded)} vs {len(self.shadow)} tensors)")
        for k, v in loaded.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"{path}: EMA tensor {k} has shape {tuple(v.shape)}, model {tuple(self.shadow[k].shape)}")
            self.shadow[k].copy_(v)
