"""The `mlcid/1` invariants of one sample, checked by the writer, the reader and `mlcid validate` (via `mlcid.shard_check`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlcid import errors
from mlcid.errors import SampleError
from mlcid.schema import (
    BACKGROUND_PROMPT,
    DEFAULT_MAX_AREA_FRAC,
    DEFAULT_MAX_LAYERS,
    DEFAULT_MIN_AREA_FRAC,
    MIN_LAYERS,
    MLCIDSample,
)

MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class ValidationConfig:
    """Limits a sample must respect. Area limits apply to each foreground mask."""

    max_layers: int = DEFAULT_MAX_LAYERS
    min_area_frac: float = DEFAULT_MIN_AREA_FRAC
    max_area_frac: float = DEFAULT_MAX_AREA_FRAC


def _check_text(name: str, text: object) -> None:
    if not isinstance(text, str) or not text.strip():
        raise SampleError(errors.BAD_TEXT, f"{name} must be a non-empty string, got {text!r:.80}")
    if len(text) > MAX_PROMPT_CHARS or "\x00" in text:
        raise SampleError(errors.BAD_TEXT, f"{name} is longer than {MAX_PROMPT_CHARS} chars or holds NUL")


def validate_sample(sample: MLCIDSample, config: ValidationConfig = ValidationConfig()) -> None:
    """Raise `SampleError` naming the first broken invariant; return None for a valid sample."""
    # 1. Layer count and metadata agree.
    n = sample.num_layers
    if not (MIN_LAYERS <= n <= config.max_layers):
        raise SampleError(errors.LAYER_COUNT, f"{n} layers, allowed {MIN_LAYERS}..{config.max_layers}")
    if len(sample.masks) != len(sample.foregrounds) or len(sample.layers) != n:
        raise SampleError(
            errors.BAD_SCHEMA,
            f"{len(sample.foregrounds)} foregrounds, {len(sample.masks)} masks, {len(sample.layers)} layer entries",
        )
    if not isinstance(sample.key, str) or not sample.key or "." in sample.key or "/" in sample.key:
        raise SampleError(errors.BAD_SCHEMA, f"bad key {sample.key!r:.80} (non-empty, no '.' or '/')")
    _check_text("global_prompt", sample.global_prompt)
    if sample.layers[0].prompt != BACKGROUND_PROMPT:
        raise SampleError(errors.BAD_SCHEMA, f"layer 0 prompt must be {BACKGROUND_PROMPT!r}")
    for i, layer in enumerate(sample.layers[1:], start=1):
        _check_text(f"layers[{i}].prompt", layer.prompt)

    # 2. One size, right dtypes and channels.
    h, w = sample.composite.shape[:2]
    expected = {"composite": (h, w, 3), "background": (h, w, 3)}
    arrays = {"composite": sample.composite, "background": sample.background}
    for i, (fg, m) in enumerate(zip(sample.foregrounds, sample.masks), start=1):
        expected[f"layer{i:02d}"], arrays[f"layer{i:02d}"] = (h, w, 4), fg
        expected[f"mask{i:02d}"], arrays[f"mask{i:02d}"] = (h, w), m
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
            raise SampleError(errors.BAD_SCHEMA, f"{name} must be a uint8 array")
        if arr.shape != expected[name]:
            raise SampleError(errors.SIZE_MISMATCH, f"{name} has shape {arr.shape}, expected {expected[name]}")

    # 3. Masks binary, disjoint, each inside the area range (background mask is their complement by construction).
    union = np.zeros((h, w), dtype=bool)
    for i, m in enumerate(sample.masks, start=1):
        if np.count_nonzero((m != 0) & (m != 255)):
            raise SampleError(errors.MASK_VALUES, f"mask{i:02d} holds values other than 0 and 255")
        sel = m == 255
        if (union & sel).any():
            raise SampleError(errors.MASK_OVERLAP, f"mask{i:02d} overlaps an earlier mask")
        union |= sel
        frac = float(sel.mean())
        if not (config.min_area_frac <= frac <= config.max_area_frac):
            raise SampleError(
                errors.MASK_AREA,
                f"mask{i:02d} covers {frac:.4f} of the image, allowed {config.min_area_frac}..{config.max_area_frac}",
            )
