"""`PipelineConfig`: one typed profile for the MLCID construction pipeline, with presets `real` and `tiny`.

A preset is a complete profile (backends, models, thresholds, sizes, batch sizes). `from_preset(name, **overrides)`
starts from it; dict-valued fields given as overrides are merged one level deep (e.g.
`stage_options={"detect": {"score_threshold": 0.2}}` changes only that key of the detect options).

Why `tiny` has its own thresholds: the tiny presets carry random weights, so detector scores, SAM logits and
depth maps decide nothing. To make the synthetic scenes (`python -m mlcid.synthetic`) still YIELD SAMPLES through
every real code path, `tiny` keeps every detection (score threshold 0, top-k per image), clips SAM masks to their
boxes (a random decoder's mask is otherwise arbitrary), uses the classical saliency (it sees the plain-coloured
synthetic objects) and inpaints with OpenCV. The area rule keeps Appendix B's 1%–80%. Nothing is faked: each
stage runs its model and the rules filter what comes out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlcid.imageio import DEFAULT_MAX_PIXELS
from mlcid.schema import DEFAULT_MAX_AREA_FRAC, DEFAULT_MAX_LAYERS, DEFAULT_MIN_AREA_FRAC
from mlcid.validate import ValidationConfig

# DESIGN.md "Construction pipeline decisions": the paper's order, costly per-object work last.
STAGE_ORDER = ("caption", "detect", "segment", "saliency", "mask_rules", "object_caption", "cutout", "inpaint")
# Kinds that may be switched off (backend None): the global prompt then falls back to the source caption and a
# layer prompt to its detection label. Every other kind is needed to make a sample.
OPTIONAL_KINDS = ("caption", "object_caption")


@dataclass
class PipelineConfig:
    """Everything one shard run needs. Library code receives this object, never argparse namespaces."""

    preset: str = "real"  # model preset for `mlcid.registry.resolve`: "real" (hub ids) or "tiny"
    backends: dict[str, str | None] = field(default_factory=dict)  # stage kind → registered backend
    stage_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind → extra constructor kwargs
    batch_sizes: dict[str, int] = field(default_factory=dict)  # kind → micro-batch size inside the stage
    models: dict[str, str] = field(default_factory=dict)  # registry name → override (hub id or local folder)
    device: str = "auto"  # "auto" → cuda if available else cpu
    dtype: str = "auto"  # "auto" → float16 on cuda, float32 on cpu

    # Input decoding and output size.
    max_side: int = 512  # the shorter side is scaled down to at most this; both sides rounded down to × 8
    min_side: int = 64  # inputs whose shorter side is below this are dropped (`too_small`)
    max_pixels: int = DEFAULT_MAX_PIXELS  # inputs with more pixels are refused before decoding
    decode_threads: int = 4  # threads decoding input images (PIL releases the GIL while decoding)
    chunk_size: int = 32  # items read, decoded and pushed through the stages together

    # Mask rules (Appendix B) and layer limits.
    max_layers: int = DEFAULT_MAX_LAYERS  # background + at most max_layers - 1 foregrounds
    min_saliency_overlap: float = 0.10  # keep a mask m iff |m ∩ s| / |m| > this (s = salient foreground)
    containment: float = 0.90  # drop a mask if ≥ this fraction of it lies inside a larger kept mask
    min_area_frac: float = DEFAULT_MIN_AREA_FRAC
    max_area_frac: float = DEFAULT_MAX_AREA_FRAC

    # Cut-outs.
    dilate_kernel: int = 5  # the paper's 5×5 dilation of the cut-out alpha
    cutout_fill: tuple[int, int, int] = (0, 0, 0)  # RGB outside the dilated alpha

    prefix: str = "mlcid"  # output shards are {prefix}-{shard_id:06d}.tar

    def __post_init__(self) -> None:
        if self.preset not in ("real", "tiny"):
            raise ValueError(f"preset must be 'real' or 'tiny', got {self.preset!r}")
        for kind in STAGE_ORDER:
            if self.backends.get(kind) is None and kind not in OPTIONAL_KINDS:
                raise ValueError(f"PipelineConfig.backends needs a backend for stage kind {kind!r}")
        unknown = set(self.backends) - set(STAGE_ORDER)
        if unknown:
            raise ValueError(f"unknown stage kinds {sorted(unknown)}; known: {', '.join(STAGE_ORDER)}")
        if not 2 <= self.max_layers:
            raise ValueError(f"max_layers must be ≥ 2 (background + one foreground), got {self.max_layers}")
        if not (0 < self.min_side <= self.max_side) or self.max_side % 8:
            raise ValueError(f"need 0 < min_side ≤ max_side and max_side % 8 == 0, got {self.min_side}, {self.max_side}")
        if not 0.0 <= self.min_area_frac < self.max_area_frac <= 1.0:
            raise ValueError(f"bad area range {self.min_area_frac}..{self.max_area_frac}")
        if self.dilate_kernel < 1 or self.dilate_kernel % 2 == 0:
            raise ValueError(f"dilate_kernel must be odd and ≥ 1, got {self.dilate_kernel}")

    @property
    def max_foregrounds(self) -> int:
        return self.max_layers - 1

    def validation(self) -> ValidationConfig:
        """The invariants the written shards must meet (same limits the mask rules use)."""
        return ValidationConfig(self.max_layers, self.min_area_frac, self.max_area_frac)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "PipelineConfig":
        """The named profile (`real` or `tiny`) with `overrides` applied (dicts merged one level deep)."""
        if name not in PRESETS:
            raise ValueError(f"unknown pipeline preset {name!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[name]()
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = set(overrides) - fields
        if bad:
            raise TypeError(f"unknown PipelineConfig fields {sorted(bad)}")
        values = base.to_dict()
        for key, value in overrides.items():
            if isinstance(values.get(key), dict) and isinstance(value, dict):
                merged = dict(values[key])
                for k, v in value.items():
                    merged[k] = {**merged[k], **v} if isinstance(merged.get(k), dict) and isinstance(v, dict) else v
                values[key] = merged
            else:
                values[key] = value
        values["cutout_fill"] = tuple(values["cutout_fill"])
        return cls(**values)


def real_preset() -> PipelineConfig:
    """Production profile: the paper's models and Appendix B thresholds (detector score ≥ 0.1)."""
    return PipelineConfig(
        preset="real",
        backends={
            "caption": "instructblip",
            "detect": "owlv2",
            "segment": "sam",
            "saliency": "depth",
            "mask_rules": "appendix_b",
            "object_caption": "instructblip",
            "cutout": "dilate5",
            "inpaint": "sd",
        },
        stage_options={
            "detect": {"score_threshold": 0.1, "max_detections": 20},
        },
        batch_sizes={
            "caption": 16, "detect": 16, "segment": 16, "saliency": 32,
            "mask_rules": 64, "object_caption": 32, "cutout": 64, "inpaint": 8,
        },
    )


def tiny_preset() -> PipelineConfig:
    """Offline profile on the tiny random-weight presets; thresholds chosen so synthetic scenes yield samples."""
    return PipelineConfig(
        preset="tiny",
        backends={
            "caption": "instructblip",
            "detect": "owlv2",
            "segment": "sam",
            "saliency": "classical",
            "mask_rules": "appendix_b",
            "object_caption": "instructblip",
            "cutout": "dilate5",
            "inpaint": "opencv",
        },
        stage_options={
            # Random weights: keep every box (threshold 0) and the top-k; clip SAM masks to their boxes;
            # short captions (a random language model would otherwise babble up to its token cap).
            "detect": {"score_threshold": 0.0, "max_detections": 8},
            "segment": {"clip_to_box": True},
            "caption": {"max_new_tokens": 8},
            "object_caption": {"max_new_tokens": 6},
        },
        batch_sizes={kind: 4 for kind in STAGE_ORDER},
        device="cpu",
        dtype="float32",
        max_side=128,
        decode_threads=2,
        chunk_size=8,
    )


PRESETS = {"real": real_preset, "tiny": tiny_preset}
