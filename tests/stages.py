"""Classical stand-ins for the model-backed pipeline stages (importing this module registers the test-* backends)."""

from __future__ import annotations

import time

import cv2
import numpy as np

from pipelines.base import STAGES, Detection, alive, register_stage
from tests.builders import BG


def _register(kind: str, backend: str):
    """register_stage, but a second import of this module (a subprocess, another name) reuses the first class."""
    def deco(cls):
        if backend in STAGES.get(kind, {}):
            return STAGES[kind][backend].cls
        return register_stage(kind, backend)(cls)
    return deco


def _foreground(image: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(int) - BG.astype(int)).sum(-1) > 60  # (H, W) bool


class StandIn:
    """The stage interface with nothing to set up; accepts (and ignores) the tiny preset's options."""

    def __init__(self, **options):
        self.options = options

    def setup(self):
        pass


@_register("detect", "test-colour")
class ColourDetect(StandIn):
    """Boxes of connected non-background components (a classical stand-in detector for tests only)."""

    def __call__(self, batch):
        for it in alive(batch):
            n, _, st, _ = cv2.connectedComponentsWithStats(_foreground(it.image).astype(np.uint8))
            it.detections = [Detection((x, y, x + w, y + h), 0.5, "shape") for x, y, w, h, a in st[1:n] if a > 20]
            if not it.detections:
                it.drop("no_detection")
        return batch


@_register("segment", "test-box")
class BoxColourSegment(StandIn):
    """Each detection's mask: the non-background pixels inside its box."""

    def __call__(self, batch):
        for it in alive(batch):
            fg = _foreground(it.image)
            it.masks = []
            for d in it.detections:
                x0, y0, x1, y1 = map(int, d.box)
                m = np.zeros_like(fg)
                m[y0:y1, x0:x1] = fg[y0:y1, x0:x1]
                it.masks.append(m)
        return batch


@_register("inpaint", "test-fill")
class FillInpaint(StandIn):
    """The background: every object's pixels painted in the background colour."""

    def __call__(self, batch):
        for it in alive(batch):
            hole = np.zeros(it.image.shape[:2], bool)
            for o in it.objects:
                hole |= o.rgba[..., 3] > 0
            it.background = np.where(hole[..., None], BG, it.image).astype(np.uint8)
        return batch


@_register("inpaint", "test-slow-fill")
class SlowFillInpaint(FillInpaint):
    """FillInpaint that sleeps per batch, so a test can kill the process while the shard is being written."""

    def __call__(self, batch):
        time.sleep(0.3)
        return super().__call__(batch)


@_register("caption", "test-fail-on-key")
class FailOnKey(StandIn):
    """Raises on any batch holding a key containing 'boom' (exercises the one-by-one retry)."""

    def __call__(self, batch):
        if any("boom" in it.key for it in batch):
            raise RuntimeError("boom")
        for it in alive(batch):
            it.global_prompt = f"shapes on blue {it.key}"
        return batch


@_register("caption", "test-interrupt")
class Interrupt(StandIn):
    """Raises KeyboardInterrupt on the first batch (a Ctrl-C mid-shard)."""

    def __call__(self, batch):
        raise KeyboardInterrupt
