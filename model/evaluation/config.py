"""The evaluation settings (`EvalConfig`): what `layerdiff eval` compares, on which prompts, at which sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass

ALL = "all"  # group of every sample, whatever its layer count
METHODS = ("sd15", "layerdiff", "layerdiff+smg")  # Table 1 rows: SD 1.5, LayerDiff (CFG), LayerDiff + SMG
LAYER_COUNTS = (2, 3, 4)  # paper Table 1 columns


@dataclass
class EvalConfig:
    """What to evaluate and how. Paper defaults: DDIM 50 steps, CFG 3, SMG 3, LayerDiff at 256², SD at 512²→256²."""

    model: str  # LayerDiff run folder
    data: list[str]  # MLCID test shards (paths, brace patterns, fsspec URLs)
    out: str
    preset: str = "real"  # "real" | "tiny": where SD 1.5, CLIP RN50 and the FID extractor load from
    rows: tuple[str, ...] = ("sd15", "layerdiff", "layerdiff+smg")
    layer_counts: tuple[int, ...] = LAYER_COUNTS
    per_group: int = 1000  # prompts per layer count (paper Table 3: 500/300/200 of a 1k set)
    num_inference_steps: int = 50
    guidance_scale: float = 3.0
    smg_scale: float = 3.0
    sd_guidance_scale: float = 7.5  # SD 1.5's own default
    seed: int = 0
    size: int | None = None  # LayerDiff sampling size; None: the run's default (256 for the paper's model)
    sd_size: int | None = None  # SD baseline size; None: its native size (512 for SD 1.5)
    eval_size: int = 256  # every composite (real and generated) is resized to this before FID and CLIP score
    max_reference: int | None = None  # cap on real composites per group for the reference statistics
    layer_fill: tuple[int, int, int] = (128, 128, 128)  # neutral fill outside a layer's mask (layer CLIP score)
    sd_model: str | None = None  # SD 1.5 folder or hub id (default: the registry's, per preset)
    clip_model: str | None = None  # open_clip folder / weights file (default: $LAYERDIFF_CLIP_RN50 or the preset)
    fid_weights: str | None = None  # extractor weights (default: $LAYERDIFF_FID_WEIGHTS, torch hub cache, preset)
    device: str = "cpu"
    dtype: str = "float32"  # "float16" on GPUs
    batch_size: int = 32  # feature / embedding batches
    save_layers: bool = False  # also write every LayerDiff output as a layered folder (PNG + PSD + ORA)
    progress: bool = True

    def __post_init__(self) -> None:
        self.rows, self.layer_counts = tuple(self.rows), tuple(int(n) for n in self.layer_counts)
        self.data = [url for spec in ([self.data] if isinstance(self.data, str) else self.data) for url in spec.split()]
        self.layer_fill = tuple(self.layer_fill)
        unknown = [r for r in self.rows if r not in METHODS]
        if unknown or not self.rows:
            raise ValueError(f"unknown method(s) {unknown or '(none given)'}; choose from {', '.join(METHODS)}")
        if self.per_group < 2:
            raise ValueError(f"per_group must be ≥ 2 (FID needs a covariance), got {self.per_group}")
        if not self.layer_counts or any(n < 2 for n in self.layer_counts):
            raise ValueError(f"layer_counts must be ≥ 2 (background + foregrounds), got {self.layer_counts}")
        for name in ("num_inference_steps", "eval_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("guidance_scale", "smg_scale", "sd_guidance_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    @property
    def groups(self) -> list[str]:
        return [str(n) for n in self.layer_counts] + [ALL]
