"""Compositing per Eq. 4 (I = m_b*B + Σ m_i*F_i) and conversion to an RGBA layer stack."""

from __future__ import annotations

import cv2
import numpy as np

from mlcid.schema import MLCIDSample


def background_mask(masks: list[np.ndarray]) -> np.ndarray:
    """m_b = 1 - Σ m_i, as a bool array (H, W). Masks are 0/255 or bool, assumed disjoint."""
    if not masks:
        raise ValueError("background_mask needs at least one foreground mask")
    union = np.zeros(masks[0].shape[:2], dtype=bool)
    for m in masks:
        union |= np.asarray(m) > 127 if np.asarray(m).dtype != bool else np.asarray(m)
    return ~union


def composite(background: np.ndarray, foregrounds: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """Eq. 4 with hard masks: each pixel comes from B where no mask is set, else from the F_i whose mask is set.

    background (H, W, 3) uint8; foregrounds [(H, W, 3|4)] uint8 (alpha ignored: the mask decides);
    masks [(H, W)] 0/255 or bool. Later foregrounds win where masks overlap (paint order back→front).
    Returns (H, W, 3) uint8.
    """
    if len(foregrounds) != len(masks):
        raise ValueError(f"{len(foregrounds)} foregrounds but {len(masks)} masks")
    out = np.array(background[..., :3], dtype=np.uint8, copy=True)
    for fg, m in zip(foregrounds, masks):
        if fg.shape[:2] != out.shape[:2] or np.asarray(m).shape[:2] != out.shape[:2]:
            raise ValueError(f"layer size {fg.shape[:2]} / mask {np.asarray(m).shape[:2]} != background {out.shape[:2]}")
        sel = np.asarray(m) > 127 if np.asarray(m).dtype != bool else np.asarray(m)
        out[sel] = fg[..., :3][sel]
    return out


def composite_soft(background: np.ndarray, foregrounds: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """Eq. 4 with soft masks in [0, 1] as float arrays: I = (1 - Σ m_i) B + Σ m_i F_i. Returns float32 (H, W, 3)."""
    bg = np.asarray(background, dtype=np.float32)[..., :3]
    total = np.zeros(bg.shape[:2], dtype=np.float32)
    out = np.zeros_like(bg)
    for fg, m in zip(foregrounds, masks):
        m = np.asarray(m, dtype=np.float32)
        out += m[..., None] * np.asarray(fg, dtype=np.float32)[..., :3]
        total += m
    return out + np.clip(1.0 - total, 0.0, 1.0)[..., None] * bg


def sample_composite(sample: MLCIDSample) -> np.ndarray:
    """Recomposite a sample from its layers (undilated masks): (H, W, 3) uint8."""
    return composite(sample.background, sample.foregrounds, sample.masks)


def to_rgba_stack(sample: MLCIDSample) -> list[np.ndarray]:
    """Layers as RGBA (H, W, 4) uint8 in paint order: opaque background, then each F_i with alpha = m_i.

    Alpha-over compositing of this stack reproduces `sample_composite` exactly (binary alphas).
    """
    h, w = sample.height, sample.width
    stack = [np.concatenate([sample.background[..., :3], np.full((h, w, 1), 255, np.uint8)], axis=-1)]
    for fg, m in zip(sample.foregrounds, sample.masks):
        alpha = np.where(np.asarray(m) > 127, 255, 0).astype(np.uint8)[..., None]
        stack.append(np.concatenate([fg[..., :3], alpha], axis=-1))
    return stack


def alpha_over(stack: list[np.ndarray]) -> np.ndarray:
    """Paint an RGBA stack (bottom first) with straight alpha; returns (H, W, 3) uint8."""
    out = stack[0][..., :3].astype(np.float32)
    for layer in stack[1:]:
        a = layer[..., 3:4].astype(np.float32) / 255.0
        out = layer[..., :3].astype(np.float32) * a + out * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def dilate(mask: np.ndarray, kernel: int = 5) -> np.ndarray:
    """Binary dilation with a kernel×kernel square (the paper's 5×5 cut-out dilation). (H, W) bool → (H, W) bool.

    OpenCV's dilation; pixels outside the image count as unset. The one dilation of the project: synthetic
    scenes, cut-outs and inpainting holes use it.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"dilation kernel must be odd and ≥ 1, got {kernel}")
    mask = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)  # (H, W) 0/1, no copy for a bool mask
    grown = cv2.dilate(mask, np.ones((kernel, kernel), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return grown > 0
