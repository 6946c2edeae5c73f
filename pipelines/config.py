"""`PipelineConfig`: one typed profile for the MLCID construction pipeline, with presets `real` and `tiny`.

A preset is a complete profile (backends, models, thresholds, sizes, batch sizes). `from_preset(name, **overrides)`
starts from it; dict-valued fields given as overrides are merged one level deep, and a stage's options are typed:
`stage_options={"detect": {"score_threshold": 0.2}}` replaces only that field of the preset's `DetectOptions`
(an unknown field is an error). `make_stage(kind, config)` builds a stage from the registry entry of its backend:
model-backed stages get one shared `ModelStageConfig` plus their options dataclass, the others their options.
Pipeline-wide settings (Appendix B thresholds, the dilation kernel, the cut-out fill) are `PipelineConfig` fields
and reach the options named in each options class's `PIPELINE_FIELDS`; options that disagree with them are refused.

Why `tiny` has its own thresholds: the tiny presets carry random weights, so detector scores, SAM logits and
depth maps decide nothing. To make the synthetic scenes (`python -m mlcid.synthetic`) still YIELD SAMPLES through
every real code path, `tiny` keeps every detection (score threshold 0, top-k per image), clips SAM masks to their
boxes (a random decoder's mask is otherwise arbitrary), uses the classical saliency (it sees the plain-coloured
synthetic objects) and inpaints with OpenCV. The area rule keeps Appendix B's 1%–80%. Nothing is faked: each
stage runs its model and the rules filter what comes out.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from mlcid.imageio import DEFAULT_MAX_PIXELS
from mlcid.registry import PRESETS as MODEL_PRESETS
from mlcid.schema import DEFAULT_MAX_AREA_FRAC, DEFAULT_MAX_LAYERS, DEFAULT_MIN_AREA_FRAC
from mlcid.validate import ValidationConfig
from pipelines.base import STAGES, Stage, stage_entry
from pipelines.caption import CaptionOptions, ObjectCaptionOptions
from pipelines.detect import DetectOptions
from pipelines.filters import DEFAULT_CONTAINMENT, DEFAULT_MIN_SALIENCY_OVERLAP
from pipelines.inpaint import SDInpaintOptions
from pipelines.saliency import DepthSaliencyOptions
from pipelines.kinds import MODEL_KINDS, OPTIONAL_KINDS, STAGE_ORDER  # noqa: F401 (pipelines.config's names)
from pipelines.segment import SegmentOptions

log = logging.getLogger(__name__)

# Where the global caption runs (`PipelineConfig.caption_order`): "auto" = "after_rules" unless the detector is
# narrowed by the caption (then "first"); "first" = the paper's Fig. 4 order.
CAPTION_ORDERS = ("auto", "first", "after_rules")


@dataclass
class PipelineConfig:
    """Everything one shard run needs. Library code receives this object, never argparse namespaces."""

    preset: str = "real"  # model preset for `mlcid.registry.resolve`: "real" (hub ids) or "tiny"
    backends: dict[str, str | None] = field(default_factory=dict)  # stage kind → registered backend
    stage_options: dict[str, Any] = field(default_factory=dict)  # kind → its backend's options dataclass
    batch_sizes: dict[str, int] = field(default_factory=dict)  # kind → micro-batch (segment: 0 = from free memory)
    models: dict[str, str] = field(default_factory=dict)  # registry name → override (hub id or local folder)
    device: str = "auto"  # "auto" → cuda if available else cpu
    dtype: str = "auto"  # "auto" → float16 on cuda, float32 on cpu

    # Input decoding and output size.
    max_side: int = 512  # the shorter side is scaled down to at most this; both sides rounded down to × 8
    min_side: int = 64  # inputs whose shorter side is below this are dropped (`too_small`)
    max_pixels: int = DEFAULT_MAX_PIXELS  # inputs with more pixels are refused before decoding
    decode_threads: int = 4  # threads decoding input images (PIL releases the GIL while decoding)
    chunk_size: int = 32  # items read, decoded and pushed through the stages together
    caption_order: str = "auto"  # one of CAPTION_ORDERS (docs/design.md: caption after the mask rules)
    # Kinds whose micro-batches are formed across chunks (`pipelines.flow`): items wait in per-size buckets until
    # a batch is full, at most `max_pending` per kind (then the fullest bucket runs), the rest at the shard's end.
    bucketed_stages: tuple[str, ...] = ("saliency", "caption", "object_caption", "inpaint")
    max_pending: int = 128
    # CPU-only stages (`pipelines.base.runs_on_cpu`) on one thread of their own, off the GPU stages' thread
    # (`pipelines.flow`); False runs every stage on the caller's thread (same outputs, in the same order).
    cpu_stage_thread: bool = True

    # Mask rules (Appendix B) and layer limits.
    max_layers: int = DEFAULT_MAX_LAYERS  # background + at most max_layers - 1 foregrounds
    min_saliency_overlap: float = DEFAULT_MIN_SALIENCY_OVERLAP  # keep m iff |m ∩ s| / |m| > this (s = salient)
    containment: float = DEFAULT_CONTAINMENT  # drop a mask if ≥ this fraction of it lies inside a larger kept mask
    min_area_frac: float = DEFAULT_MIN_AREA_FRAC
    max_area_frac: float = DEFAULT_MAX_AREA_FRAC

    # Cut-outs.
    dilate_kernel: int = 5  # the paper's 5×5 dilation of the cut-out alpha
    cutout_fill: tuple[int, int, int] = (0, 0, 0)  # RGB outside the dilated alpha

    prefix: str = "mlcid"  # output shards are {prefix}-{shard_id:06d}.tar

    def __post_init__(self) -> None:
        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(MODEL_PRESETS)}, got {self.preset!r}")
        for kind in STAGE_ORDER:
            if self.backends.get(kind) is None and kind not in OPTIONAL_KINDS:
                raise ValueError(f"PipelineConfig.backends needs a backend for stage kind {kind!r}")
        unknown = set(self.backends) - set(STAGE_ORDER)
        if unknown:
            raise ValueError(f"unknown stage kinds {sorted(unknown)}; known: {', '.join(STAGE_ORDER)}")
        if self.caption_order not in CAPTION_ORDERS:
            raise ValueError(f"caption_order must be one of {', '.join(CAPTION_ORDERS)}, got {self.caption_order!r}")
        if self.caption_order == "after_rules" and self.narrows_detection():
            raise ValueError("caption_order='after_rules' but stage_options['detect'].narrow_by_caption is set: the "
                             "detector needs the caption first (use caption_order 'first' or 'auto')")
        self.bucketed_stages = tuple(self.bucketed_stages)
        unknown = set(self.bucketed_stages) - set(STAGE_ORDER)
        if unknown:
            raise ValueError(f"bucketed_stages names unknown stage kinds {sorted(unknown)}; known: "
                             f"{', '.join(STAGE_ORDER)}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be ≥ 1, got {self.max_pending}")
        unknown = set(self.batch_sizes) - set(MODEL_KINDS)
        if unknown:
            raise ValueError(f"batch_sizes for {sorted(unknown)}: only model-backed kinds batch "
                             f"({', '.join(MODEL_KINDS)})")
        if not 2 <= self.max_layers:
            raise ValueError(f"max_layers must be ≥ 2 (background + one foreground), got {self.max_layers}")
        if not (0 < self.min_side <= self.max_side) or self.max_side % 8:
            raise ValueError(f"need 0 < min_side ≤ max_side and max_side % 8 == 0, got {self.min_side}, {self.max_side}")
        if not 0.0 <= self.min_area_frac < self.max_area_frac <= 1.0:
            raise ValueError(f"bad area range {self.min_area_frac}..{self.max_area_frac}")
        if self.dilate_kernel < 1 or self.dilate_kernel % 2 == 0:
            raise ValueError(f"dilate_kernel must be odd and ≥ 1, got {self.dilate_kernel}")
        for kind, options in self.stage_options.items():
            if kind not in STAGE_ORDER:
                raise ValueError(f"stage_options for unknown stage kind {kind!r}; known: {', '.join(STAGE_ORDER)}")
            if not dataclasses.is_dataclass(options) or isinstance(options, type):
                raise TypeError(f"stage_options[{kind!r}] must be an options dataclass instance, got "
                                f"{type(options).__name__} (from_preset turns dicts into the preset's options)")
            for name, attr in getattr(type(options), "PIPELINE_FIELDS", {}).items():
                mine, theirs = getattr(options, name), getattr(self, attr)
                if tuple_if_list(mine) != tuple_if_list(theirs):
                    raise ValueError(f"stage_options[{kind!r}].{name}={mine!r} disagrees with PipelineConfig.{attr}="
                                     f"{theirs!r}; set PipelineConfig.{attr} (one value for the whole pipeline)")

    def narrows_detection(self) -> bool:
        """Whether the detector scores only the names in the global caption (it then needs the caption first)."""
        return bool(getattr(self.stage_options.get("detect"), "narrow_by_caption", False))

    def stage_order(self) -> tuple[str, ...]:
        """The configured kinds in run order: `STAGE_ORDER`, the caption moved after the mask rules unless
        `caption_order` is "first" (or "auto" with a caption-narrowed detector)."""
        first = self.caption_order == "first" or (self.caption_order == "auto" and self.narrows_detection())
        kinds = [k for k in STAGE_ORDER if self.backends.get(k) is not None]
        if not first and "caption" in kinds:
            kinds.remove("caption")
            kinds.insert(kinds.index("mask_rules") + 1, "caption")
        return tuple(kinds)

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
        """The named profile (`real` or `tiny`) with `overrides` applied (dicts merged one level deep; a dict for
        a stage's options replaces those fields of the preset's options dataclass)."""
        if name not in PRESETS:
            raise ValueError(f"unknown pipeline preset {name!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[name]()
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = set(overrides) - fields
        if bad:
            raise TypeError(f"unknown PipelineConfig fields {sorted(bad)}")
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
        for key, value in overrides.items():
            if key == "stage_options":
                continue
            if isinstance(values.get(key), dict) and isinstance(value, dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
        values["cutout_fill"] = tuple(values["cutout_fill"])

        def pipeline_value(attr: str) -> Any:
            return values["max_layers"] - 1 if attr == "max_foregrounds" else values[attr]

        # The preset's options belong to the preset's backends: a kind switched to a backend with another options
        # class starts from that backend's defaults. They follow the (overridden) pipeline-wide fields; options
        # the caller gives do not: if those disagree, `__post_init__` says so.
        kept = {}
        for kind, options in values["stage_options"].items():
            entry = STAGES.get(kind, {}).get(values["backends"].get(kind) or "")
            if values["backends"].get(kind) != base.backends.get(kind) and (
                    entry is None or entry.options is None or not isinstance(options, entry.options)):
                log.info("backend %s/%s: the %s preset's %s do not apply; using the backend's defaults", kind,
                         values["backends"].get(kind), name, type(options).__name__)
                continue
            kept[kind] = mirror_pipeline_fields(options, pipeline_value)
        values["stage_options"] = kept
        if "stage_options" in overrides:
            values["stage_options"] = merge_stage_options(values["stage_options"], overrides["stage_options"],
                                                          values["backends"], pipeline_value)
        return cls(**values)


def tuple_if_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def merge_stage_options(preset: dict[str, Any], overrides: dict[str, Any], backends: dict[str, str | None],
                        pipeline_value: Callable[[str], Any]) -> dict[str, Any]:
    """Preset options with overrides: an options instance replaces; a dict replaces fields of the preset's options
    (or of the backend's defaults when the preset has none); an unknown field is a TypeError."""
    merged = dict(preset)
    for kind, value in overrides.items():
        if not isinstance(value, dict):
            merged[kind] = value
            continue
        base = merged.get(kind)
        if base is None:
            entry = STAGES.get(kind, {}).get(backends.get(kind) or "")
            if entry is None or entry.options is None:
                raise TypeError(f"stage_options[{kind!r}] given as a dict, but backend {backends.get(kind)!r} has no "
                                "registered options class (import its module, or pass the options dataclass)")
            base = mirror_pipeline_fields(entry.options(), pipeline_value)
        try:
            merged[kind] = dataclasses.replace(base, **value)
        except TypeError as e:
            raise TypeError(f"stage_options[{kind!r}]: {e}") from e
    return merged


def mirror_pipeline_fields(options: Any, pipeline_value: Callable[[str], Any]) -> Any:
    """`options` with the fields its class mirrors from `PipelineConfig` (`PIPELINE_FIELDS`) set from it.

    `from_preset` applies it, so overriding e.g. `dilate_kernel` reaches the cut-out and inpaint options too.
    """
    mirrored = getattr(type(options), "PIPELINE_FIELDS", {})
    return dataclasses.replace(options, **{name: pipeline_value(attr) for name, attr in mirrored.items()}) \
        if mirrored else options


def make_stage(kind: str, config: PipelineConfig) -> Stage:
    """Build the configured backend of `kind` from its registry entry (backend modules must be imported)."""
    backend = config.backends.get(kind)
    if backend is None:
        raise ValueError(f"stage kind {kind!r} is switched off in this config")
    entry = stage_entry(kind, backend)
    options = config.stage_options.get(kind)
    if entry.options is None:
        if options is not None:
            log.warning("backend %s/%s takes no options; ignoring stage_options[%r] (%s)", kind, backend, kind,
                        type(options).__name__)
        args: tuple = ()
    else:
        if options is None:
            options = mirror_pipeline_fields(entry.options(), lambda attr: getattr(config, attr))
        elif not isinstance(options, entry.options):
            raise TypeError(f"stage_options[{kind!r}] is a {type(options).__name__}, but backend {backend!r} takes "
                            f"{entry.options.__name__}")
        args = (options,)
    if entry.model_backed:
        from pipelines.devices import ModelStageConfig

        batch = config.batch_sizes.get(kind)
        model = ModelStageConfig(preset=config.preset, model_overrides=dict(config.models), device=config.device,
                                 dtype=config.dtype, **({} if batch is None else {"batch_size": batch}))
        args = (model, *args)
    return entry.cls(*args)


# The paper's backend per stage kind (Appendix B).
PAPER_BACKENDS = {"caption": "instructblip", "detect": "owlv2", "segment": "sam", "saliency": "depth",
                  "mask_rules": "appendix_b", "object_caption": "instructblip", "cutout": "dilate5", "inpaint": "sd"}


def real_preset() -> PipelineConfig:
    """Production profile: the paper's models and Appendix B thresholds (detector score ≥ 0.1)."""
    return PipelineConfig(
        preset="real",
        backends=dict(PAPER_BACKENDS),
        stage_options={
            "detect": DetectOptions(score_threshold=0.1, max_detections=20),
            # DPM-Solver++ at 20 steps (its docstring says why); working sides on a 64-px grid: 25 sizes instead of
            # 115 over LAION's aspect ratios, inpaint batch fill 0.97 vs 0.67 (BENCHMARKS.md, bucket fill).
            "inpaint": SDInpaintOptions(size_step=64),
            # Depth at a 518-px working short side, the long side on a 56-px grid, bucketed across chunks: nearby
            # aspect ratios share a batch (exact shapes filled 0.10 of its batches; BENCHMARKS.md, build cost).
            "saliency": DepthSaliencyOptions(),
        },
        # Segment 0: sized from the free GPU memory at the first call (pipelines.sam_efficient; per GPU class
        # in cluster/configs/ray-cluster.yaml).
        batch_sizes={"caption": 16, "detect": 16, "segment": 0, "saliency": 32, "object_caption": 32, "inpaint": 8},
    )


def tiny_preset() -> PipelineConfig:
    """Offline profile on the tiny random-weight presets; thresholds chosen so synthetic scenes yield samples."""
    return PipelineConfig(
        preset="tiny",
        # The paper's stages, with classical saliency and OpenCV inpainting in place of Depth-Anything and SD.
        backends={**PAPER_BACKENDS, "saliency": "classical", "inpaint": "opencv"},
        stage_options={
            # Random weights: keep every box (threshold 0) and the top-k; clip SAM masks to their boxes;
            # short captions (a random language model would otherwise babble up to its token cap).
            "detect": DetectOptions(score_threshold=0.0, max_detections=8),
            "segment": SegmentOptions(clip_to_box=True),
            "caption": CaptionOptions(max_new_tokens=8),
            "object_caption": ObjectCaptionOptions(max_new_tokens=6),
        },
        batch_sizes={kind: 4 for kind in MODEL_KINDS},
        device="cpu",
        dtype="float32",
        max_side=128,
        decode_threads=2,
        chunk_size=8,
    )


PRESETS = {"real": real_preset, "tiny": tiny_preset}
