"""Device/dtype choice and early model-location checks shared by the model-backed stages."""

from __future__ import annotations

from pathlib import Path

import torch


def device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """"auto" → cuda if available else cpu; "auto" dtype → float16 on cuda, float32 on cpu."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


def check_model_location(location: str, what: str) -> str:
    """Fail early and clearly when `location` looks like a local path (absolute, ./, ~) that does not exist."""
    path = Path(location).expanduser()
    if not path.exists() and (path.is_absolute() or location.startswith((".", "~"))):
        raise FileNotFoundError(
            f"{what} model folder {location} does not exist (for tiny presets run `make tiny-models`)"
        )
    return location
