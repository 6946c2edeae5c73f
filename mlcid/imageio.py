"""Bounded image decoding and PNG/JPEG encoding (pixel limits guard against decompression bombs)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from mlcid.errors import IMAGE_TOO_LARGE, UNDECODABLE_IMAGE, SampleError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 64 MP; images larger than this are refused before decoding


def open_bounded(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes lazily, refusing more than `max_pixels` before any pixel is decoded."""
    if not data:
        raise SampleError(UNDECODABLE_IMAGE, "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError(IMAGE_TOO_LARGE, str(e)) from e
    except Exception as e:  # PIL raises many types for garbage bytes
        raise SampleError(UNDECODABLE_IMAGE, f"{type(e).__name__}: {e}") from e
    w, h = im.size
    if w <= 0 or h <= 0:
        raise SampleError(UNDECODABLE_IMAGE, f"bad image size {w}x{h}")
    if w * h > max_pixels:
        raise SampleError(IMAGE_TOO_LARGE, f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    return im


def _load(im: Image.Image) -> Image.Image:
    try:
        im.load()
    except Exception as e:
        raise SampleError(UNDECODABLE_IMAGE, f"{type(e).__name__}: {e}") from e
    return im


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = False) -> np.ndarray:
    """Decode to (H, W, 3) uint8 RGB from any mode (L, CMYK, RGBA, I;16, P…)."""
    im = _load(open_bounded(data, max_pixels))
    if exif_transpose:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / (65535.0 if hi > 255 else 255.0) * 255.0, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def decode_rgba(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to (H, W, 4) uint8 RGBA."""
    im = _load(open_bounded(data, max_pixels))
    return np.asarray(im if im.mode == "RGBA" else im.convert("RGBA"), dtype=np.uint8)


def decode_gray(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to (H, W) uint8 single channel."""
    im = _load(open_bounded(data, max_pixels))
    return np.asarray(im if im.mode == "L" else im.convert("L"), dtype=np.uint8)


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of (H, W), (H, W, 3) or (H, W, 4) uint8."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of (H, W, 3) uint8, 4:4:4 (no chroma subsampling: saturated object edges stay clean)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr[..., :3], dtype=np.uint8)).save(
        buf, format="JPEG", quality=quality, subsampling=0
    )
    return buf.getvalue()
