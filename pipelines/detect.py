"""Stage `detect`: open-vocabulary boxes over the 365 Objects365 names (backends `owlv2`, `grounding-dino`).

DetCLIP (the paper's detector) is not public; OWLv2 (default, `google/owlv2-base-patch16-ensemble`) and
Grounding DINO load through transformers' own classes. The vocabulary is `data/objects365.txt`: the official
Objects365 v2 category names in id order (1–365), spelled as in the annotation files (including their typos,
e.g. "Moniter/TV"; trailing spaces stripped). A name's query text is lower-cased with "/" read as " or ".

Per image: every box scored against the vocabulary (optionally only names that occur in the global caption),
boxes below `score_threshold` dropped, class-agnostic NMS (`nms_iou`), the best `max_detections` kept, sorted by
score. An image without a detection is dropped with reason `no_detection`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.base import Detection, Item, alive, register_stage
from pipelines.devices import ModelStageConfig, check_model_location

VOCAB_FILE = Path(__file__).resolve().parent / "data" / "objects365.txt"
NO_DETECTION = "no_detection"


def load_objects365() -> list[str]:
    """The 365 Objects365 v2 category names, in category-id order."""
    names = [line.strip() for line in VOCAB_FILE.read_text().splitlines() if line.strip()]
    if len(names) != 365:
        raise RuntimeError(f"{VOCAB_FILE} should list 365 names, found {len(names)}")
    return names


def query_text(name: str) -> str:
    """A category name as detector text: lower case, "/" alternatives read as "or"."""
    return re.sub(r"\s+", " ", name.lower().replace("/", " or ")).strip()


def in_caption(names: list[str], caption: str | None) -> np.ndarray:
    """(C,) bool: which names (any "/" alternative, as whole words, plural `s` allowed) occur in `caption`."""
    text = " " + re.sub(r"[^a-z0-9]+", " ", (caption or "").lower()) + " "
    hits = []
    for name in names:
        alternatives = [re.sub(r"[^a-z0-9]+", " ", a.lower()).strip() for a in name.split("/")]
        hits.append(any(a and re.search(rf" {re.escape(a)}(s|es)? ", text) for a in alternatives))
    return np.asarray(hits, dtype=bool)


def select(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    size: tuple[int, int],
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
    min_box_side: float = 1.0,
) -> list[Detection]:
    """Boxes (N, 4) xyxy pixels, scores (N,), label ids (N,) → thresholded, NMS'd, top-k `Detection`s by score.

    Boxes are clipped to the image; boxes narrower or lower than `min_box_side` pixels after clipping are dropped.
    """
    from torchvision.ops import nms

    h, w = size
    boxes = boxes.float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    scores = scores.float()
    keep = (scores >= score_threshold) & (boxes[:, 2] - boxes[:, 0] >= min_box_side)
    keep &= boxes[:, 3] - boxes[:, 1] >= min_box_side
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if nms_iou < 1.0 and len(boxes):
        order = nms(boxes, scores, nms_iou)  # indices sorted by decreasing score
    else:
        order = torch.argsort(scores, descending=True)
    order = order[:max_detections]
    return [
        Detection(box=tuple(float(v) for v in boxes[i].tolist()), score=float(scores[i]), label=names[int(labels[i])])
        for i in order.tolist()
    ]


@dataclass(frozen=True)
class DetectOptions:
    """Box selection per image (both detector backends); `query_template` is OWLv2's text query."""

    score_threshold: float = 0.1  # Appendix B: detector score ≥ 0.1
    max_detections: int = 20
    nms_iou: float = 0.5
    min_box_side: float = 1.0
    narrow_by_caption: bool = False  # score only the names that occur in the global caption
    vocabulary: tuple[str, ...] | None = None  # default: the 365 Objects365 names
    query_template: str = "a photo of a {}"

    def __post_init__(self) -> None:
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be ≥ 1, got {self.max_detections}")


class _Detector:
    """Shared config and the stage loop; backends implement `setup()` and `raw(images, allowed)`."""

    model_name: str

    def __init__(self, model: ModelStageConfig = ModelStageConfig(), options: DetectOptions = DetectOptions()
                 ) -> None:
        self.model_id, self.options = model.location(self.model_name), options
        self.device, self.dtype = model.torch_device_dtype()
        self.batch_size = max(1, model.batch_size)
        self.score_threshold, self.max_detections, self.nms_iou = (options.score_threshold, options.max_detections,
                                                                   options.nms_iou)
        self.narrow_by_caption, self.min_box_side = options.narrow_by_caption, options.min_box_side
        self.names = list(options.vocabulary) if options.vocabulary else load_objects365()
        self.model = self.processor = None

    def allowed(self, item: Item) -> np.ndarray:
        """(C,) bool queries to score for this item: all, or those in its caption (all if none occurs)."""
        if not self.narrow_by_caption:
            return np.ones(len(self.names), dtype=bool)
        hits = in_caption(self.names, item.global_prompt or item.source.get("caption"))
        return hits if hits.any() else np.ones(len(self.names), dtype=bool)

    def detect(self, images: list[np.ndarray], allowed: list[np.ndarray], pixels: torch.Tensor | None = None
               ) -> list[list[Detection]]:
        """Detections for each (H, W, 3) uint8 image; `allowed[i]` (C,) bool restricts image i's vocabulary;
        `pixels` (B, 3, S, S): the images already through `prepare` (backends without it ignore it)."""
        self.setup()
        out = []
        for image, (boxes, scores, labels) in zip(images, self.raw(images, allowed, pixels)):
            out.append(select(boxes, scores, labels, self.names, image.shape[:2], self.score_threshold,
                              self.nms_iou, self.max_detections, self.min_box_side))
        return out

    def __call__(self, batch: list[Item]) -> list[Item]:
        self.setup()
        items = alive(batch)
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            pixels = [it.prepared.pop(self.kind, None) for it in chunk]  # from `prepare` on the decode threads
            stacked = torch.stack(pixels) if all(p is not None for p in pixels) else None  # (B, 3, S, S)
            found = self.detect([it.image for it in chunk], [self.allowed(it) for it in chunk], stacked)
            for item, dets in zip(chunk, found):
                item.detections = dets
                if not dets:
                    item.drop(NO_DETECTION, f"no box scored ≥ {self.score_threshold}")
        return batch


@register_stage("detect", "owlv2", DetectOptions, model_backed=True)
class Owlv2Detector(_Detector):
    """OWLv2: all 365 queries at once; their text embeddings are computed once in `setup` and cached."""

    model_name = "owlv2"

    def __init__(self, model: ModelStageConfig = ModelStageConfig(), options: DetectOptions = DetectOptions()
                 ) -> None:
        super().__init__(model, options)
        self.query_template = options.query_template
        self.query_embeds = None

    def setup(self) -> None:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        if self.model is not None:
            return
        check_model_location(self.model_id, "OWLv2")
        processor = Owlv2Processor.from_pretrained(self.model_id)
        model = Owlv2ForObjectDetection.from_pretrained(self.model_id, dtype=self.dtype)
        self._adopt(model.to(self.device), processor)  # device only: from_pretrained set the precision

    def use(self, model, processor) -> None:
        """Take an already built model + processor (benchmarks pass random-weight ones); caches the queries."""
        self._adopt(model.to(self.device, self.dtype), processor)

    def _adopt(self, model, processor) -> None:
        self.model, self.processor = model.eval(), processor
        self.cache_queries()

    def cache_queries(self) -> None:
        """Embed the vocabulary's query texts once: (C, D), unit norm as in `Owlv2Model.forward`."""
        texts = [self.query_template.format(query_text(n)) for n in self.names]
        tokens = self.processor.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                                          max_length=self.model.config.text_config.max_position_embeddings)
        owl = self.model.owlv2
        with torch.inference_mode():  # (C, T) tokens → (C, D) embeddings
            pooled = owl.text_model(input_ids=tokens["input_ids"].to(self.device),
                                    attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
            embeds = owl.text_projection(pooled)  # (C, D)
        self.query_embeds = embeds / torch.linalg.norm(embeds, dim=-1, keepdim=True)  # as Owlv2Model.forward

    def prepare(self, item: Item) -> None:
        """The image processor's padding + resizing for one item (CPU, on the decode threads): (3, S, S)."""
        self.setup()
        pixels = self.processor.image_processor(images=[item.image], return_tensors="pt")["pixel_values"][0]
        item.prepared[self.kind] = pixels.to(self.dtype)

    def raw(self, images, allowed, pixels=None):
        """Per image: boxes (P, 4) xyxy pixels, best score (P,) and its query id (P,) for every patch P."""
        if pixels is None:
            pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)  # (B, 3, S, S): each image padded to a square, resized
        b = pixels.shape[0]
        mask = torch.as_tensor(np.stack(allowed), device=self.device)  # (B, C) bool
        with torch.inference_mode():
            feature_map, _ = self.model.image_embedder(pixel_values=pixels)  # (B, h, w, D)
            feats = feature_map.reshape(b, -1, feature_map.shape[-1])  # (B, P, D)
            queries = self.query_embeds.to(feats.dtype)[None].expand(b, -1, -1)  # (B, C, D)
            logits, _ = self.model.class_predictor(feats, queries, mask)  # (B, P, C)
            boxes = self.model.box_predictor(feats, feature_map)  # (B, P, 4) cx, cy, w, h in [0, 1] of the square
        best = logits.float().max(dim=-1)
        scores, labels = torch.sigmoid(best.values), best.indices  # (B, P)
        out = []
        for k, image in enumerate(images):
            side = max(image.shape[:2])  # the processor padded to a square of this side before resizing
            cx, cy, w, h = boxes[k].float().unbind(-1)
            xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * side  # (P, 4)
            out.append((xyxy.cpu(), scores[k].cpu(), labels[k].cpu()))
        return out


@register_stage("detect", "grounding-dino", DetectOptions, model_backed=True)
class GroundingDinoDetector(_Detector):
    """Grounding DINO: the vocabulary as "a. b. c." prompts, chunked to fit the text encoder's token limit."""

    model_name = "grounding-dino"

    def setup(self) -> None:
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        if self.model is not None:
            return
        check_model_location(self.model_id, "Grounding DINO")
        self.processor = GroundingDinoProcessor.from_pretrained(self.model_id)
        self.model = GroundingDinoForObjectDetection.from_pretrained(self.model_id, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.chunks = self.make_chunks(self.model.config.max_text_len)

    def make_chunks(self, max_tokens: int) -> list[dict]:
        """Split the vocabulary into prompts of ≤ `max_tokens` tokens; each with its (C_k, T) positive map."""
        tok = self.processor.tokenizer
        chunks, start = [], 0
        while start < len(self.names):
            end = start + 1
            while end < len(self.names) and self._prompt_len(start, end + 1) <= max_tokens:
                end += 1
            if self._prompt_len(start, end) > max_tokens:
                raise ValueError(f"category {self.names[start]!r} alone exceeds {max_tokens} tokens")
            phrases = [query_text(n) for n in self.names[start:end]]
            text = ". ".join(phrases) + "."
            enc = tok(text, return_offsets_mapping=True, return_token_type_ids=True, return_tensors="pt")
            offsets = enc.pop("offset_mapping")[0]  # (T, 2) char spans; (0, 0) for special tokens
            positive = torch.zeros(len(phrases), offsets.shape[0])  # (C_k, T)
            pos = 0
            for c, phrase in enumerate(phrases):
                span_end = pos + len(phrase)
                hit = (offsets[:, 0] < span_end) & (offsets[:, 1] > pos) & (offsets[:, 1] > offsets[:, 0])
                positive[c, hit] = 1.0
                pos = span_end + 2  # ". "
            positive = positive / positive.sum(dim=1, keepdim=True).clamp(min=1)  # mean over a name's tokens
            chunks.append({"ids": list(range(start, end)), "text": text, "positive": positive, "tokens": dict(enc)})
            start = end
        return chunks

    def _prompt_len(self, start: int, end: int) -> int:
        text = ". ".join(query_text(n) for n in self.names[start:end]) + "."
        return len(self.processor.tokenizer(text)["input_ids"])

    def raw(self, images, allowed, pixels=None):
        """Per image: boxes (N, 4), scores (N,), ids (N,) over all query slots of all chunks.

        Images are batched only with images of the same size: a padded batch changes a DETR-style model's output.
        `pixels` is unused (this backend has no `prepare`).
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape[:2], []).append(i)
        out: list[tuple | None] = [None] * len(images)
        for idx in groups.values():
            for i, res in zip(idx, self._raw_same_size([images[i] for i in idx], [allowed[i] for i in idx])):
                out[i] = res
        return out

    def _raw_same_size(self, images, allowed):
        allowed_t = torch.as_tensor(np.stack(allowed))  # (B, C) bool
        b, (h, w) = len(images), images[0].shape[:2]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        pixels = self.processor.image_processor(images=images, return_tensors="pt")  # once for all chunks
        pixels = {k: v.to(self.device) for k, v in pixels.items()}
        pixels["pixel_values"] = pixels["pixel_values"].to(self.dtype)  # (B, 3, H', W')
        parts: list[tuple] = []
        for chunk in self.chunks:
            ids = torch.as_tensor(chunk["ids"])  # (C_k,)
            use = allowed_t[:, ids]  # (B, C_k)
            if not use.any():
                continue
            text = {k: v.to(self.device).expand(b, -1) for k, v in chunk["tokens"].items()}  # (B, T) each
            with torch.inference_mode():
                outputs = self.model(**pixels, **text)
            probs = torch.sigmoid(outputs.logits.float()).cpu()  # (B, Q, max_text_len)
            t = chunk["positive"].shape[1]
            cat = probs[:, :, :t] @ chunk["positive"].T  # (B, Q, C_k): mean probability over each name's tokens
            cat = cat.masked_fill(~use[:, None, :], 0.0)
            best = cat.max(dim=-1)  # (B, Q)
            cx, cy, bw, bh = outputs.pred_boxes.float().cpu().unbind(-1)  # (B, Q) each, relative to the image
            xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1) * scale  # (B, Q, 4)
            parts.append((xyxy, best.values, ids[best.indices]))
        if not parts:
            return [(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))] * b
        boxes, scores, labels = (torch.cat(x, dim=1) for x in zip(*parts))  # (B, N, 4), (B, N), (B, N)
        return [(boxes[k], scores[k], labels[k]) for k in range(len(images))]
