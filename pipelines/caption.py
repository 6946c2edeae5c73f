"""Stages `caption` and `object_caption` (backend `instructblip`): the global prompt and one prompt per object.

Both use InstructBLIP (default `Salesforce/instructblip-flan-t5-xl`) through transformers' own
`InstructBlipForConditionalGeneration` / `InstructBlipProcessor`, with the paper's instructions, greedy decoding
(`num_beams` configurable) and a `max_new_tokens` cap. Object captions run on crops: the box of the object's
mask, pixels outside the mask set to a constant `fill`, batched across all objects of a micro-batch.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from mlcid.registry import resolve
from pipelines.base import Item, alive, register_stage
from pipelines.devices import check_model_location, device_and_dtype

GLOBAL_INSTRUCTION = (
    "Please provide a comprehensive description of the image, including the color, shapes, and any actions "
    "taking place."
)
OBJECT_INSTRUCTION = "Briefly describe the main subject of the image."
EMPTY_CAPTION = "empty_caption"
MODEL_NAME = "instructblip"


def clean_caption(text: str) -> str:
    """Collapse whitespace and strip; an all-whitespace caption becomes ''."""
    return re.sub(r"\s+", " ", text).strip()


def crop_object(image: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The box of `mask` cut from `image` (H, W, 3) uint8, pixels outside the mask set to `fill`: (h, w, 3)."""
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("cannot crop an object with an empty mask")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = image[y0:y1, x0:x1].copy()  # (h, w, 3)
    crop[~mask[y0:y1, x0:x1]] = np.asarray(fill, dtype=np.uint8)
    return crop


# (model_id, device, dtype) → (model, processor): `caption` and `object_caption` hold one InstructBLIP together.
_SHARED: dict[tuple[str, str, str], tuple[object, object]] = {}


class InstructBlipCaptioner:
    """InstructBLIP loaded once; `generate(images, instruction)` → one cleaned caption per image."""

    def __init__(
        self,
        model_id: str,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 60,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        share_model: bool = True,
    ) -> None:
        self.model_id, self.share_model = model_id, share_model
        self.repetition_penalty = float(repetition_penalty)
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.max_new_tokens, self.num_beams = int(max_new_tokens), int(num_beams)
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be ≥ 1, got {max_new_tokens}, {num_beams}")
        self.model = self.processor = None

    def setup(self) -> None:
        """Load once. With `share_model`, stages in one process with the same model/device/dtype share it."""
        from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

        if self.model is not None:
            return
        key = (self.model_id, str(self.device), str(self.dtype))
        if self.share_model and key in _SHARED:
            self.use(*_SHARED[key])
            return
        check_model_location(self.model_id, "InstructBLIP")
        processor = InstructBlipProcessor.from_pretrained(self.model_id)
        self.use(InstructBlipForConditionalGeneration.from_pretrained(self.model_id, dtype=self.dtype), processor)
        if self.share_model:
            _SHARED[key] = (self.model, self.processor)

    def use(self, model, processor) -> None:
        """Take an already built model + processor (what `setup` loads; benchmarks pass random-weight ones)."""
        self.model, self.processor = model.to(self.device, self.dtype).eval(), processor
        self.encoder_decoder = bool(model.language_model.config.is_encoder_decoder)
        if not self.encoder_decoder:  # decoder-only LMs (Vicuna) continue the prompt: pad on the left
            self.processor.tokenizer.padding_side = "left"

    def generate(self, images: list[np.ndarray], instruction: str) -> list[str]:
        """Greedy (or beam) captions of (H, W, 3) uint8 images for one instruction; may contain ''."""
        if not images:
            return []
        self.setup()
        inputs = self.processor(images=images, text=[instruction] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)  # (B, 3, S, S)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, do_sample=False, num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                repetition_penalty=self.repetition_penalty,
            )  # (B, T) new tokens; decoder-only models return the prompt first
        if not self.encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1] :]
        return [clean_caption(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def _captioner(preset, model, model_overrides, device, dtype, **generation) -> InstructBlipCaptioner:
    location = resolve(MODEL_NAME, preset, model or (model_overrides or {}).get(MODEL_NAME))
    return InstructBlipCaptioner(location, device, dtype, **generation)


@register_stage("caption", "instructblip")
class GlobalCaption:
    """Sets `item.global_prompt`. An empty caption keeps the source caption if any, else drops `empty_caption`."""

    def __init__(
        self,
        preset: str = "real",
        model: str | None = None,
        model_overrides: dict[str, str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        max_new_tokens: int = 60,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        share_model: bool = True,
        instruction: str = GLOBAL_INSTRUCTION,
    ) -> None:
        self.captioner = _captioner(preset, model, model_overrides, device, dtype, max_new_tokens=max_new_tokens,
                                    num_beams=num_beams, repetition_penalty=repetition_penalty,
                                    share_model=share_model)
        self.model_id = self.captioner.model_id
        self.batch_size, self.instruction = max(1, int(batch_size)), instruction

    def setup(self) -> None:
        self.captioner.setup()

    def __call__(self, batch: list[Item]) -> list[Item]:
        items = alive(batch)
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            for item, caption in zip(chunk, self.captioner.generate([it.image for it in chunk], self.instruction)):
                source = clean_caption(item.source.get("caption") or "")
                if caption:
                    item.global_prompt = caption
                elif source:
                    item.global_prompt = source
                else:
                    item.drop(EMPTY_CAPTION, "InstructBLIP returned an empty caption and there is no source caption")
        return batch


@register_stage("object_caption", "instructblip")
class ObjectCaption:
    """Sets `obj.prompt` for each of `item.objects` from a masked crop; an empty caption falls back to the label."""

    def __init__(
        self,
        preset: str = "real",
        model: str | None = None,
        model_overrides: dict[str, str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        share_model: bool = True,
        instruction: str = OBJECT_INSTRUCTION,
        fill: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        self.captioner = _captioner(preset, model, model_overrides, device, dtype, max_new_tokens=max_new_tokens,
                                    num_beams=num_beams, repetition_penalty=repetition_penalty,
                                    share_model=share_model)
        self.model_id = self.captioner.model_id
        self.batch_size, self.instruction, self.fill = max(1, int(batch_size)), instruction, tuple(fill)

    def setup(self) -> None:
        self.captioner.setup()

    def __call__(self, batch: list[Item]) -> list[Item]:
        objects = [(item, obj) for item in alive(batch) for obj in item.objects]  # flattened across items
        for i in range(0, len(objects), self.batch_size):
            chunk = objects[i : i + self.batch_size]
            crops = [crop_object(item.image, obj.mask, self.fill) for item, obj in chunk]
            for (_, obj), caption in zip(chunk, self.captioner.generate(crops, self.instruction)):
                obj.prompt = caption or obj.label.strip().lower()
        return batch
