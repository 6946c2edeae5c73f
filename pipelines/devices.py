"""What every model-backed stage shares: `ModelStageConfig` (where its model comes from, where and how it runs),
the device/dtype choice and the early model-location check."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlcid.registry import PRESETS, resolve


def half_dtype(device: torch.device) -> torch.dtype:
    """The half-precision dtype for `device`: bfloat16 where the GPU has it (no fp16 overflow), else float16."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """"auto" → cuda if available else cpu; "auto" dtype → `half_dtype` on cuda (bf16 where it can), fp32 on cpu."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return dev, half_dtype(dev) if dev.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r} (e.g. 'auto', 'float32', 'bfloat16', 'float16')")
    return dev, resolved


def check_model_location(location: str, what: str) -> str:
    """Fail early and clearly when `location` looks like a local path (absolute, ./, ~) that does not exist."""
    path = Path(location).expanduser()
    if not path.exists() and (path.is_absolute() or location.startswith((".", "~"))):
        raise FileNotFoundError(
            f"{what} model folder {location} does not exist (for tiny presets run `make tiny-models`)"
        )
    return location


@dataclass(frozen=True)
class ModelStageConfig:
    """The settings every model-backed stage takes (caption, detect, segment, saliency, inpaint).

    `model` names this stage's model location outright (hub id or local folder); otherwise `model_overrides`
    (registry name → location, `PipelineConfig.models`) and then `mlcid.registry` for `preset` decide.
    """

    preset: str = "real"  # one of `mlcid.registry.PRESETS`
    model: str | None = None
    model_overrides: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16  # micro-batch inside the stage; the segment stage reads 0 as "size from free memory"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be ≥ 0, got {self.batch_size}")

    def location(self, registry_name: str) -> str:
        """Where to load registry model `registry_name` from (`model`, then the overrides, then the registry)."""
        return resolve(registry_name, self.preset, self.model or self.model_overrides.get(registry_name))

    def torch_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        return device_and_dtype(self.device, self.dtype)
