"""Instrument a set-up `ShardProcessor` from the outside: per-stage counts, batches formed, critical-path CPU.

`instrument(processor, survival)` wraps every stage in a `StageProbe` (items in / out, CPU seconds on the main
thread — the GPU actor's critical path — and on others: the runner's `cpu-stage` thread)
and hooks each model-backed stage where it forms its model batches: the captioner's `generate`, OWLv2's image
embedder, SAM's image encoder, the depth model, the SD inpainting pipeline call. Nothing inside
`pipelines/` is changed; the runner calls the probes as it would call the stages.

Survival: the tiny presets have random weights, so whether an image survives a stage says nothing. A probe
therefore applies the configured survival rate of its stage after the stage ran: an item that came out alive
is dropped (reason `modelled:<stage>`) when a hash of (stage, key) falls above the rate. The hash makes an
item's fate independent of stage order and batching, so reordering stages changes costs, not outcomes. After
`mask_rules` the probe also keeps only the first k objects, k drawn (by hash) from the paper's layer mix.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.base import Item, alive

MODELLED = "modelled:"
CPU_KINDS = ("mask_rules", "cutout")  # stages with no model: all their time is CPU on the actor's thread


def unit_hash(*parts: str) -> float:
    """A deterministic number in [0, 1) from `parts`."""
    return zlib.crc32(":".join(parts).encode()) / 2**32


@dataclass
class StageRecord:
    """What one stage saw and did over a run."""

    items_in: int = 0
    items_out: int = 0
    natural_drops: int = 0  # dropped by the stage itself
    modelled_drops: int = 0  # dropped by the survival rate
    objects_in: int = 0
    keys_in: set[str] = field(default_factory=set)
    batches: list[int] = field(default_factory=list)  # model batch sizes formed (items or objects)
    batch_areas: list[float] = field(default_factory=list)  # mean pixels / 512² of each batch
    cpu_s: float = 0.0  # CPU seconds inside the stage call, any thread
    main_cpu_s: float = 0.0  # … of which on the main thread (the one driving the GPU stages: the critical path)
    model_cpu_s: float = 0.0  # … of which inside the hooked model call (tiny-model compute, not counted)
    calls: int = 0


class Recorder:
    """Per-stage records; `current` names the stage the calling thread is in (shared models are attributed to it;
    per thread: the CPU-stage thread runs its stages while the main thread runs the model stages)."""

    def __init__(self) -> None:
        self.stages: dict[str, StageRecord] = defaultdict(StageRecord)
        self._local = threading.local()

    @property
    def current(self) -> str | None:
        return getattr(self._local, "current", None)

    @current.setter
    def current(self, kind: str | None) -> None:
        self._local.current = kind

    def batch(self, size: int, area: float = 1.0) -> None:
        if self.current is not None and size > 0:
            rec = self.stages[self.current]
            rec.batches.append(int(size))
            rec.batch_areas.append(float(area))


class StageProbe:
    """Stands in for a stage in `processor.stages`: runs it, counts, applies the survival rate."""

    def __init__(self, kind: str, stage: Any, recorder: Recorder, survival: float,
                 object_weights: tuple[float, ...] | None = None) -> None:
        self.kind, self.stage, self.recorder = kind, stage, recorder
        self.survival, self.object_weights = float(survival), object_weights

    def __getattr__(self, name: str) -> Any:  # batch_size, bucket_key, batch_load: the runner's bucketing
        if name == "stage":
            raise AttributeError(name)
        return getattr(self.stage, name)

    def setup(self) -> None:
        self.stage.setup()

    def __call__(self, batch: list[Item]) -> list[Item]:
        rec = self.recorder.stages[self.kind]
        live = alive(batch)
        rec.items_in += len(live)
        rec.objects_in += sum(len(it.objects) for it in live)
        rec.keys_in.update(it.key for it in live)
        rec.calls += 1
        self.recorder.current = self.kind
        t0 = time.thread_time()
        try:
            self.stage(batch)
        finally:
            dt = time.thread_time() - t0
            rec.cpu_s += dt
            if threading.current_thread() is threading.main_thread():
                rec.main_cpu_s += dt
            self.recorder.current = None
        for it in live:
            if not it.alive:
                rec.natural_drops += 1
            elif unit_hash(self.kind, it.key) >= self.survival:
                it.drop(f"{MODELLED}{self.kind}", f"cost model: survival rate {self.survival:g}")
                rec.modelled_drops += 1
            elif self.object_weights and it.objects:
                it.objects = it.objects[: self.object_count(it.key)]
        rec.items_out += len(alive(live))
        return batch

    def object_count(self, key: str) -> int:
        """k ≥ 1 foreground objects for this item, drawn by hash from `object_weights` (1, 2, 3, … objects)."""
        u, total, acc = unit_hash("objects", key), sum(self.object_weights), 0.0
        for k, w in enumerate(self.object_weights, start=1):
            acc += w / total
            if u < acc:
                return k
        return len(self.object_weights)


class _TimedPipe:
    """Wraps the SD inpainting pipeline: records each call's batch size and working size, times it.

    `downscale` > 1 runs the tiny model at 1/downscale of the working size (CPU time: its 512² VAE passes
    dominate the run) and resizes its output back, so the inpainter's own code still sees full-size arrays. The
    batch and working size recorded are the requested ones; the tiny model's output means nothing either way.
    """

    def __init__(self, pipe: Any, recorder: Recorder, kind: str, downscale: int = 1) -> None:
        self._pipe, self._recorder, self._kind, self._downscale = pipe, recorder, kind, max(1, int(downscale))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, **kwargs: Any) -> Any:
        prompt = kwargs.get("prompt")
        h, w = kwargs.get("height", 512), kwargs.get("width", 512)
        self._recorder.batch(len(prompt) if isinstance(prompt, list) else 1, h * w / 512**2)
        t0 = time.thread_time()
        try:
            if self._downscale == 1:
                return self._pipe(**kwargs)
            return self._small(h, w, kwargs)
        finally:
            self._recorder.stages[self._kind].model_cpu_s += time.thread_time() - t0

    def _small(self, h: int, w: int, kwargs: dict[str, Any]) -> Any:
        import cv2

        sh, sw = (max(8, v // self._downscale // 8 * 8) for v in (h, w))
        small = dict(kwargs, height=sh, width=sw,
                     image=[im.resize((sw, sh)) for im in kwargs["image"]],
                     mask_image=[m.resize((sw, sh), 0) for m in kwargs["mask_image"]])  # 0 = PIL nearest
        out = self._pipe(**small)
        out.images = np.stack([cv2.resize(np.asarray(im), (w, h)) for im in out.images])  # (B, h, w, 3)
        return out


def _batch_dim(args: tuple, kwargs: dict) -> int:
    x = kwargs.get("pixel_values", args[0] if args else None)
    return int(x.shape[0]) if hasattr(x, "shape") else 0


def _hook_module(module: Any, recorder: Recorder) -> None:
    def pre(_module, args, kwargs):
        recorder.batch(_batch_dim(args, kwargs))

    module.register_forward_pre_hook(pre, with_kwargs=True)


def _hook_generate(captioner: Any, recorder: Recorder, kind: str) -> None:
    generate = captioner.generate

    def counted(images, instruction):
        recorder.batch(len(images))
        t0 = time.thread_time()
        try:
            return generate(images, instruction)
        finally:
            recorder.stages[kind].model_cpu_s += time.thread_time() - t0

    captioner.generate = counted


def hook_batches(kind: str, stage: Any, recorder: Recorder, sd_downscale: int = 1) -> bool:
    """Attach the batch recorder where `stage` forms its model batches; False if it has no model to hook."""
    if hasattr(stage, "captioner"):
        _hook_generate(stage.captioner, recorder, kind)
    elif getattr(stage, "pipe", None) is not None:
        stage.pipe = _TimedPipe(stage.pipe, recorder, kind, sd_downscale)
    elif getattr(stage, "predictor", None) is not None:  # SAM
        _hook_module(stage.predictor.model.image_encoder, recorder)
    elif hasattr(getattr(stage, "model", None), "owlv2"):  # OWLv2: its vision tower runs once per batch
        _hook_module(stage.model.owlv2.vision_model, recorder)
    elif hasattr(getattr(stage, "model", None), "register_forward_pre_hook"):  # depth saliency, Grounding DINO
        _hook_module(stage.model, recorder)
    else:
        return False
    return True


def instrument(processor: Any, survival: dict[str, float], object_weights: tuple[float, ...] | None,
               order: tuple[str, ...] | None = None, sd_downscale: int = 1) -> Recorder:
    """Wrap the set-up processor's stages (optionally reordered to `order`); returns the shared recorder."""
    recorder = Recorder()
    stages = dict(processor.stages)
    kinds = [k for k in (order or tuple(stages)) if k in stages]
    wrapped = []
    for kind in kinds:
        stage = stages[kind]
        hook_batches(kind, stage, recorder, sd_downscale)
        weights = object_weights if kind == "mask_rules" else None
        wrapped.append((kind, StageProbe(kind, stage, recorder, survival.get(kind, 1.0), weights)))
        recorder.stages[kind]  # records in run order, whichever stage a bucketed flow calls first
    processor.stages = wrapped
    return recorder
