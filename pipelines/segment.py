"""Stage `segment` (backend `sam`): one binary mask per detection box, from segment-anything's `SamPredictor`.

The real model is the ViT-H checkpoint file (`sam_vit_h_4b8939.pth`); the tiny preset is a folder holding a state
dict and `sam_config.json` with its geometry. Both go through `load_sam`: build `Sam` from segment-anything's own
classes for the geometry, then load the state dict safely (`torch.load(weights_only=True)` or safetensors).

On CUDA the weights are cast to half precision (bf16 where the GPU has it, else fp16; autocast covers SAM's fp32
box coordinates) and the ViT attention runs through SDPA (`pipelines.sam_efficient`). With batch size 0 (the
`real` preset) the encoder batch is sized from the free device memory at the first call.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipelines.base import Item, alive, register_stage
from pipelines.devices import ModelStageConfig
from pipelines.sam_efficient import batch_size_for_memory, free_device_bytes, use_sdpa

log = logging.getLogger(__name__)

MODEL_NAME = "sam-vit-h"
SAM_CONFIG_NAME = "sam_config.json"
NO_MASK = "no_mask"
AUTO_BATCH = 0  # `ModelStageConfig.batch_size` meaning "size from the free device memory"
CPU_AUTO_BATCH = 4


@dataclass(frozen=True)
class SamGeometry:
    """The sizes `segment_anything.build_sam._build_sam` hard-codes, made explicit (defaults: ViT-H)."""

    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamGeometry":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "encoder_global_attn_indexes" in known:
            known["encoder_global_attn_indexes"] = tuple(known["encoder_global_attn_indexes"])
        return cls(**known)


SAM_ARCHS: dict[str, SamGeometry] = {
    "vit_h": SamGeometry(),
    "vit_l": SamGeometry(encoder_embed_dim=1024, encoder_depth=24, encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": SamGeometry(
        encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)
    ),
}


def build_sam_model(g: SamGeometry):
    """`Sam` with random weights for geometry `g`, from segment-anything's classes (as its `_build_sam`)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embed_size = g.img_size // g.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=g.encoder_depth, embed_dim=g.encoder_embed_dim, img_size=g.img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=g.encoder_num_heads,
            patch_size=g.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=g.encoder_global_attn_indexes, window_size=g.window_size,
            out_chans=g.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=g.prompt_embed_dim, image_embedding_size=(embed_size, embed_size),
            input_image_size=(g.img_size, g.img_size), mask_in_chans=g.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=g.decoder_depth, embedding_dim=g.prompt_embed_dim, mlp_dim=g.decoder_mlp_dim,
                num_heads=g.decoder_num_heads,
            ),
            transformer_dim=g.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=g.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.geometry = g  # read by the memory-sized batch (`SamSegmenter.micro_batch`)
    return sam.eval()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a tensors-only torch file (`weights_only=True`: no pickled code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_sam(location: str | Path, arch: str = "vit_h"):
    """Load `Sam` from a checkpoint file (geometry `arch`) or from a folder with `sam_config.json`."""
    path = Path(location)
    if path.is_dir():
        config_file = path / SAM_CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"SAM folder {path} has no {SAM_CONFIG_NAME} describing its geometry")
        config = json.loads(config_file.read_text())
        geometry, checkpoint = SamGeometry.from_dict(config), path / config.get("checkpoint", "sam.pth")
    else:
        if arch not in SAM_ARCHS:
            raise KeyError(f"unknown SAM arch {arch!r}; known: {', '.join(SAM_ARCHS)}")
        geometry, checkpoint = SAM_ARCHS[arch], path
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {checkpoint} not found: download sam_vit_h_4b8939.pth and set "
            "LAYERDIFF_SAM_CHECKPOINT (or pass model=...), or build the tiny preset with `make tiny-models`"
        )
    sam = build_sam_model(geometry)
    sam.load_state_dict(load_state_dict(checkpoint))
    return sam


def clip_box(box: tuple[float, float, float, float], h: int, w: int) -> tuple[int, int, int, int]:
    """Integer pixel box (x0, y0, x1, y1) covering `box`, clipped to the image; x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    x0, y0 = int(np.clip(np.floor(x0), 0, w)), int(np.clip(np.floor(y0), 0, h))
    x1, y1 = int(np.clip(np.ceil(x1), 0, w)), int(np.clip(np.ceil(y1), 0, h))
    return x0, y0, max(x1, x0), max(y1, y0)


@dataclass(frozen=True)
class SegmentOptions:
    """SAM settings: `mask_threshold` on its mask logits (SAM's own: 0.0); `clip_to_box` zeroes each mask outside
    its box grown by `box_pad` px; `attention` "sdpa" (memory-efficient, default) or "eager" (segment-anything's
    own); `max_batch_size` caps the memory-sized batch. `compile_mode` (e.g. "default", "max-autotune") runs the
    image encoder through `torch.compile` with `compile_backend`; `channels_last` gives its convolutions (patch
    embedding, neck) NHWC tensors. Both are off by default: they are measured options, not yet measured wins."""

    arch: str = "vit_h"
    mask_threshold: float = 0.0
    clip_to_box: bool = False
    box_pad: int = 0
    attention: str = "sdpa"
    max_batch_size: int = 32
    compile_mode: str | None = None  # None: no torch.compile
    compile_backend: str = "inductor"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"SAM attention must be 'sdpa' or 'eager', got {self.attention!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be ≥ 1, got {self.max_batch_size}")


@register_stage("segment", "sam", SegmentOptions, model_backed=True)
class SamSegmenter:
    """Box-prompted SAM masks: one (H, W) bool mask per detection, same order, `multimask_output=False`.

    The image encoder runs on micro-batches of `batch_size` images; the decoder takes all boxes of an image at
    once (`predict_torch` after `apply_boxes_torch`). An item whose every mask is empty is dropped (`no_mask`).
    """

    def __init__(self, model: ModelStageConfig = ModelStageConfig(), options: SegmentOptions = SegmentOptions()
                 ) -> None:
        self.model_id, self.options = model.location(MODEL_NAME), options
        self.arch = options.arch
        self.device, self.dtype = model.torch_device_dtype()
        self.batch_size = model.batch_size  # AUTO_BATCH: sized at the first call
        self.mask_threshold, self.clip_to_box = options.mask_threshold, options.clip_to_box
        self.box_pad = options.box_pad
        self.predictor = None

    def setup(self) -> None:
        if self.predictor is None:
            self.use(load_sam(self.model_id, self.arch))

    def use(self, sam) -> None:
        """Take an already built `Sam` (benchmarks pass a random-weight ViT-H): device, precision, attention."""
        from segment_anything import SamPredictor

        sam = sam.to(self.device, self.dtype).eval()  # half weights on GPU ("auto": bf16 where supported)
        if self.options.attention == "sdpa":
            use_sdpa(sam)
        if self.options.channels_last:
            sam.image_encoder.to(memory_format=torch.channels_last)  # 4-D conv weights only
        self.predictor = SamPredictor(sam)
        if self.options.compile_mode:
            sam.image_encoder = torch.compile(sam.image_encoder, mode=self.options.compile_mode,
                                              backend=self.options.compile_backend, dynamic=False)

    def micro_batch(self) -> int:
        """The encoder batch: as configured, or (AUTO_BATCH) sized once from the free device memory."""
        if self.batch_size == AUTO_BATCH:
            if self.device.type == "cuda":
                geometry = getattr(self.predictor.model, "geometry", None) or SAM_ARCHS[self.arch]
                free = free_device_bytes(self.device)
                self.batch_size = batch_size_for_memory(free, geometry, self.dtype.itemsize,
                                                        self.options.max_batch_size)
                log.info("SAM batch %d from %.1f GiB free", self.batch_size, free / 2**30)
            else:
                self.batch_size = CPU_AUTO_BATCH
        return self.batch_size

    def _autocast(self):
        """Autocast to the weights' half dtype (SAM's prompt encoder mixes fp32 box coordinates with its weights)."""
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def prepare(self, item: Item) -> None:
        """SAM's resize of one item to its input size (CPU, on the decode threads): (h', w', 3) uint8."""
        self.setup()
        item.prepared[self.kind] = self.predictor.transform.apply_image(item.image)

    def encode(self, images: list[np.ndarray], prepared: list[np.ndarray | None] | None = None) -> torch.Tensor:
        """Run SAM's image encoder on a micro-batch of (H, W, 3) uint8 RGB images: (B, C, h, w) embeddings.

        `prepared[i]`: image i already resized by `prepare` (None: resized here)."""
        sam, transform = self.predictor.model, self.predictor.transform
        prepared = prepared or [None] * len(images)
        inputs = []
        for image, done in zip(images, prepared):
            resized = done if done is not None else transform.apply_image(image)  # (h', w', 3), long side = S
            x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]  # (1, 3, h', w')
            inputs.append(sam.preprocess(x))  # normalised, padded to (1, 3, S, S)
        batch = torch.cat(inputs)  # (B, 3, S, S)
        if self.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            return sam.image_encoder(batch)  # (B, C, S/p, S/p)

    def decode(
        self, features: torch.Tensor, size: tuple[int, int], boxes: list[tuple[float, float, float, float]]
    ) -> list[np.ndarray]:
        """Masks for `boxes` (pixels, xyxy) given one image's (1, C, h, w) embedding: (H, W) bool arrays."""
        h, w = size
        if not boxes:
            return []
        predictor = self.predictor
        predictor.reset_image()  # then set the state `SamPredictor.set_torch_image` would leave behind
        predictor.original_size = (h, w)
        predictor.input_size = predictor.transform.get_preprocess_shape(h, w, predictor.transform.target_length)
        predictor.features, predictor.is_image_set = features, True
        with torch.inference_mode(), self._autocast():
            box_t = torch.as_tensor(boxes, dtype=torch.float32, device=self.device)  # (N, 4) xyxy pixels
            box_t = predictor.transform.apply_boxes_torch(box_t, (h, w))
            logits, _, _ = predictor.predict_torch(
                point_coords=None, point_labels=None, boxes=box_t, multimask_output=False, return_logits=True
            )  # (N, 1, H, W)
        predictor.reset_image()
        masks = (logits[:, 0].float() > self.mask_threshold).cpu().numpy()  # (N, H, W) bool
        out = []
        for mask, box in zip(masks, boxes):
            if self.clip_to_box:
                p = self.box_pad
                x0, y0, x1, y1 = clip_box((box[0] - p, box[1] - p, box[2] + p, box[3] + p), h, w)
                keep = np.zeros_like(mask)
                keep[y0:y1, x0:x1] = True
                mask = mask & keep
            out.append(np.ascontiguousarray(mask))
        return out

    def segment(self, image: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> list[np.ndarray]:
        """Masks for `boxes` on one image (encoder + decoder)."""
        self.setup()
        return self.decode(self.encode([image]), image.shape[:2], boxes) if boxes else []

    def __call__(self, batch: list[Item]) -> list[Item]:
        self.setup()
        items, size = alive(batch), self.micro_batch()
        for i in range(0, len(items), size):
            chunk = items[i : i + size]
            features = self.encode([it.image for it in chunk], [it.prepared.pop(self.kind, None) for it in chunk])
            for j, item in enumerate(chunk):
                item.masks = self.decode(features[j : j + 1], item.image.shape[:2], [d.box for d in item.detections])
                if not any(m.any() for m in item.masks):
                    item.drop(NO_MASK, f"{len(item.detections)} boxes gave only empty masks")
        return batch
