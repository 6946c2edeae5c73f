"""The stage interface: an `Item` per image flows through stages; a stage is `setup()` then `__call__(batch)`.

Backends register by (stage kind, backend name) and are found in `STAGES`; the runner builds a pipeline from
a config naming one backend per stage kind. Stages never open files and never know about Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np


@dataclass
class Detection:
    """An open-vocabulary detection: box (x0, y0, x1, y1) in pixels, score in [0, 1], category label."""

    box: tuple[float, float, float, float]
    score: float
    label: str


@dataclass
class ObjectLayer:
    """A surviving foreground object: undilated mask, its box/score/label, later its prompt and RGBA cut-out."""

    mask: np.ndarray  # (H, W) bool, undilated
    box: tuple[int, int, int, int]
    score: float
    label: str
    prompt: str | None = None
    rgba: np.ndarray | None = None  # (H, W, 4) uint8, alpha = 5×5-dilated mask


@dataclass
class Item:
    """One input image and everything the stages learn about it. A set `drop_reason` means: skip me."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8, already resized to the configured output size
    source: dict[str, Any] = field(default_factory=dict)  # url, original caption, input shard/key
    global_prompt: str | None = None
    detections: list[Detection] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # (H, W) bool per detection, after segmentation
    saliency: np.ndarray | None = None  # (H, W) bool salient foreground
    objects: list[ObjectLayer] = field(default_factory=list)  # back→front paint order once filtered
    background: np.ndarray | None = None  # (H, W, 3) uint8 inpainted background
    drop_reason: str | None = None
    drop_detail: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.drop_reason is None

    def drop(self, reason: str, detail: str = "") -> None:
        if self.drop_reason is None:
            self.drop_reason, self.drop_detail = reason, detail


class Stage(Protocol):
    """A pipeline stage. `setup()` loads models once per worker; `__call__` works on a micro-batch in place."""

    kind: str

    def setup(self) -> None: ...

    def __call__(self, batch: list[Item]) -> list[Item]: ...


STAGES: dict[str, dict[str, Callable[..., Stage]]] = {}


def register_stage(kind: str, backend: str) -> Callable[[type], type]:
    """Class decorator: make `cls` the backend `backend` of stage kind `kind`."""

    def deco(cls: type) -> type:
        STAGES.setdefault(kind, {})
        if backend in STAGES[kind]:
            raise ValueError(f"stage backend {kind}/{backend} registered twice")
        STAGES[kind][backend] = cls
        cls.kind = kind
        cls.backend = backend
        return cls

    return deco


def build_stage(kind: str, backend: str, **kwargs: Any) -> Stage:
    """Instantiate a registered backend; unknown names list what exists."""
    if kind not in STAGES:
        raise KeyError(f"unknown stage kind {kind!r}; known: {', '.join(sorted(STAGES))}")
    if backend not in STAGES[kind]:
        raise KeyError(f"unknown {kind} backend {backend!r}; known: {', '.join(sorted(STAGES[kind]))}")
    return STAGES[kind][backend](**kwargs)


def alive(batch: list[Item]) -> list[Item]:
    """The items of a batch no stage has dropped."""
    return [it for it in batch if it.alive]
