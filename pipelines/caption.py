"""Stages `caption` and `object_caption` (backend `instructblip`): the global prompt and one prompt per object.

Both use InstructBLIP (default `Salesforce/instructblip-flan-t5-xl`) through transformers' own
`InstructBlipForConditionalGeneration` / `InstructBlipProcessor`, with the paper's instructions, greedy decoding
(`num_beams` configurable) and a `max_new_tokens` cap. Object captions run on crops: the box of the object's
mask, pixels outside the mask set to a constant `fill`, batched across all objects of a micro-batch.

Precision: the model is loaded with `from_pretrained(dtype=...)` and only MOVED to the device afterwards, so
transformers' `_keep_in_fp32_modules` (T5's `wo`, InstructBLIP's `query_tokens`) stay fp32 — Flan-T5 overflows in
fp16 otherwise. `dtype="auto"` is bf16 on GPUs that have it. Captions never go silently wrong: a caption that is
empty, or whose decoding met a non-finite logit, is a fallback (global: the source alt text, else the item is
dropped; object: the detection label), and `Item.prompt_source` / `ObjectLayer.prompt_source` record where each
prompt came from so the runner counts them per shard and stores them in the sample's JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.base import (
    PROMPT_FROM_ALT_TEXT,
    PROMPT_FROM_CAPTION,
    PROMPT_FROM_LABEL,
    Item,
    alive,
    register_stage,
)
from pipelines.devices import ModelStageConfig, check_model_location

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


@dataclass(frozen=True)
class CaptionOptions:
    """Generation settings of the global caption (stage `caption`)."""

    max_new_tokens: int = 60
    num_beams: int = 1
    repetition_penalty: float = 1.0
    share_model: bool = True  # `caption` and `object_caption` in one process hold one InstructBLIP
    instruction: str = GLOBAL_INSTRUCTION

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be ≥ 1, got {self.max_new_tokens}, {self.num_beams}")


@dataclass(frozen=True)
class ObjectCaptionOptions(CaptionOptions):
    """Generation settings of the per-object captions (stage `object_caption`); `fill` paints outside the mask."""

    max_new_tokens: int = 20
    instruction: str = OBJECT_INSTRUCTION
    fill: tuple[int, int, int] = (255, 255, 255)


def keep_in_fp32_names(model) -> set[str]:
    """Names transformers keeps in fp32 for `model` and its sub-models (e.g. {'wo', 'query_tokens'})."""
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for module in model.modules():
        names |= set(getattr(type(module), "_keep_in_fp32_modules", None) or ())
    return names


def cast_keeping_fp32(model, dtype: torch.dtype):
    """`model.to(dtype)` except the keep-in-fp32 modules, as `from_pretrained(dtype=...)` would leave them."""
    keep = keep_in_fp32_names(model)
    model.to(dtype)
    if dtype != torch.float32 and keep:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and keep & set(name.split(".")):
                tensor.data = tensor.data.float()
    return model


class NonFiniteLogits:
    """A `LogitsProcessor` that flags rows whose logits hold NaN/inf at any step (it changes nothing)."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.flags = torch.zeros(rows, dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.flags |= ~torch.isfinite(scores).all(dim=-1)  # (rows,) with rows = B · num_beams
        return scores


# (model_id, device, dtype) → (model, processor): `caption` and `object_caption` hold one InstructBLIP together.
_SHARED: dict[tuple[str, str, str], tuple[object, object]] = {}


class InstructBlipCaptioner:
    """InstructBLIP loaded once; `generate(images, instruction)` → one cleaned caption per image ('' = unusable)."""

    def __init__(self, model: ModelStageConfig, options: CaptionOptions) -> None:
        self.model_id, self.options = model.location(MODEL_NAME), options
        self.device, self.dtype = model.torch_device_dtype()
        self.model = self.processor = None

    def setup(self) -> None:
        """Load once. With `share_model`, stages in one process with the same model/device/dtype share it."""
        from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

        if self.model is not None:
            return
        key = (self.model_id, str(self.device), str(self.dtype))
        if self.options.share_model and key in _SHARED:
            self._adopt(*_SHARED[key])
            return
        check_model_location(self.model_id, "InstructBLIP")
        processor = InstructBlipProcessor.from_pretrained(self.model_id)
        model = InstructBlipForConditionalGeneration.from_pretrained(self.model_id, dtype=self.dtype)
        self._adopt(model.to(self.device), processor)  # device only: from_pretrained set the precision per module
        if self.options.share_model:
            _SHARED[key] = (self.model, self.processor)

    def use(self, model, processor) -> None:
        """Take an already built model + processor (benchmarks pass random-weight ones): cast as `from_pretrained`
        would (keep-in-fp32 modules stay fp32), move to the device."""
        self._adopt(cast_keeping_fp32(model, self.dtype).to(self.device), processor)

    def _adopt(self, model, processor) -> None:
        self.model, self.processor = model.eval(), processor
        self.encoder_decoder = bool(model.language_model.config.is_encoder_decoder)
        if not self.encoder_decoder:  # decoder-only LMs (Vicuna) continue the prompt: pad on the left
            self.processor.tokenizer.padding_side = "left"

    def generate(self, images: list[np.ndarray], instruction: str) -> list[str]:
        """Greedy (or beam) captions of (H, W, 3) uint8 images; '' where the caption is empty or met NaN/inf."""
        from transformers import LogitsProcessorList

        if not images:
            return []
        self.setup()
        opts = self.options
        inputs = self.processor(images=images, text=[instruction] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.vision_model.dtype)  # (B, 3, S, S)
        watch = NonFiniteLogits(len(images) * opts.num_beams, self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, do_sample=False, num_beams=opts.num_beams, max_new_tokens=opts.max_new_tokens,
                repetition_penalty=opts.repetition_penalty, logits_processor=LogitsProcessorList([watch]),
            )  # (B, T) new tokens; decoder-only models return the prompt first
        if not self.encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1] :]
        broken = watch.flags.view(len(images), opts.num_beams).any(dim=1).tolist()  # (B,)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return ["" if bad else clean_caption(t) for t, bad in zip(texts, broken)]


class _CaptionStage:
    """What both caption stages share: one InstructBlipCaptioner, batched by `model.batch_size`.

    `options` defaults to the subclass's `Options()`.
    """

    Options: type[CaptionOptions] = CaptionOptions

    def __init__(self, model: ModelStageConfig = ModelStageConfig(), options: CaptionOptions | None = None) -> None:
        options = self.Options() if options is None else options
        self.captioner = InstructBlipCaptioner(model, options)
        self.model_id, self.options = self.captioner.model_id, options
        self.batch_size = max(1, model.batch_size)

    def setup(self) -> None:
        self.captioner.setup()


@register_stage("caption", "instructblip", CaptionOptions, model_backed=True)
class GlobalCaption(_CaptionStage):
    """Sets `item.global_prompt` and `item.prompt_source`: the caption, else the source alt text, else drops the
    item with `empty_caption`."""

    Options = CaptionOptions

    def __call__(self, batch: list[Item]) -> list[Item]:
        items = alive(batch)
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            captions = self.captioner.generate([it.image for it in chunk], self.options.instruction)
            for item, caption in zip(chunk, captions):
                alt_text = clean_caption(item.source.get("caption") or "")
                if caption:
                    item.global_prompt, item.prompt_source = caption, PROMPT_FROM_CAPTION
                elif alt_text:
                    item.global_prompt, item.prompt_source = alt_text, PROMPT_FROM_ALT_TEXT
                else:
                    item.drop(EMPTY_CAPTION, "InstructBLIP returned an empty or non-finite caption and there is "
                              "no source caption")
        return batch


@register_stage("object_caption", "instructblip", ObjectCaptionOptions, model_backed=True)
class ObjectCaption(_CaptionStage):
    """Sets `obj.prompt` / `obj.prompt_source` for each of `item.objects` from a masked crop; an empty or
    non-finite caption falls back to the detection label."""

    Options = ObjectCaptionOptions

    def batch_load(self, item: Item) -> int:
        """An item fills as many places of a batch as it has objects (the runner's buckets count these)."""
        return len(item.objects)

    def __call__(self, batch: list[Item]) -> list[Item]:
        objects = [(item, obj) for item in alive(batch) for obj in item.objects]  # flattened across items
        for i in range(0, len(objects), self.batch_size):
            chunk = objects[i : i + self.batch_size]
            crops = [crop_object(item.image, obj.mask, self.options.fill) for item, obj in chunk]
            for (_, obj), caption in zip(chunk, self.captioner.generate(crops, self.options.instruction)):
                if caption:
                    obj.prompt, obj.prompt_source = caption, PROMPT_FROM_CAPTION
                else:
                    obj.prompt, obj.prompt_source = obj.label.strip().lower(), PROMPT_FROM_LABEL
        return batch
