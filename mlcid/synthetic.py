"""Synthetic layered scenes with exact ground truth: raw img2dataset-style shards plus their true MLCID shards.

A scene is a patterned background and 1–3 flat-coloured shapes painted back→front with real occlusions. The
ground truth is what the construction pipeline should ideally recover: B = the full background, m_i = what
stays visible of object i (front wins, so masks are disjoint), F_i = object i's own pixels inside its 5×5-dilated
visible mask (the dilated ring outside the shape holds the composite's pixels, as a cut-out would; outside the
alpha a constant `fill`). Eq. 4 of (B, F_i, m_i) gives back the composite exactly.

Sample `index` of seed `seed` depends on (seed, index) only, so a shard can be regenerated alone and the content
does not depend on how many shards there are. CLI: `python -m mlcid.synthetic --out DIR --samples N --seed S`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mlcid.schema import BACKGROUND_PROMPT, LayerInfo, MLCIDSample
from mlcid.synthetic_shapes import (
    BACKGROUND_PATTERNS,
    COLOURS,
    OBJECT_PATTERNS,
    SHAPES,
    ObjectPattern,
    PlacedShape,
    background_image,
    mask_box,
    paint_layers,
    place_shapes,
    visible_masks,
    with_article,
)
from mlcid.validate import ValidationConfig
from mlcid.writer import ShardWriter

__all__ = [
    "BACKGROUND_PATTERNS", "COLOURS", "SHAPES", "SceneConfig", "prompt_vocabulary", "make_scene", "write_shard", "write_dataset",
    "raw_key", "shard_ranges", "encode_jpeg_444", "default_mlcid_out",
]

log = logging.getLogger(__name__)
GENERATOR = "mlcid.synthetic"
GENERATOR_VERSION = 1
MAX_PER_SHARD = 10_000  # img2dataset keys hold a 4-digit in-shard index
GLOBAL_TEMPLATES = (  # {background} carries its article: "a striped green", "an orange"
    "{objects} on {background} background",
    "{objects} against {background} background",
    "{background} background behind {objects}",
)

Pair = tuple[str, str]  # (colour, shape)


def prompt_vocabulary() -> list[str]:
    """Every word a synthetic caption or layer prompt can hold (templates, joiners, articles, colours, shapes,
    pattern adjectives, the background prompt): what a tokenizer pruned to these prompts must know."""
    phrases = [t.format(objects="", background="") for t in GLOBAL_TEMPLATES]
    phrases += ["a an in front of and", BACKGROUND_PROMPT, *COLOURS, *SHAPES, *BACKGROUND_PATTERNS.values()]
    return sorted({word for phrase in phrases for word in phrase.split()})


@dataclass(frozen=True)
class SceneConfig:
    """What scenes look like. Sizes are fractions of the image side; areas are fractions of the image."""

    size: int = 128
    min_foregrounds: int = 1
    max_foregrounds: int = 3
    count_weights: tuple[float, ...] | None = None  # weights of min..max foreground counts; None = uniform
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    background_patterns: tuple[str, ...] = tuple(BACKGROUND_PATTERNS)
    object_patterns: tuple[str, ...] = ("plain",)  # textures objects carry (OBJECT_PATTERNS); not named in prompts
    background_colours: tuple[str, ...] = tuple(COLOURS)
    allowed_pairs: tuple[Pair, ...] | None = None  # (colour, shape) combos objects may take; None = all
    holdout_pairs: tuple[Pair, ...] = ()  # combos never drawn (e.g. for compositional generalisation tests)
    distinct_colours: bool = True  # objects of one scene have different colours (background too, when possible)
    min_radius: float = 0.12
    max_radius: float = 0.30
    occlusion_prob: float = 0.6  # chance that an object is placed over an earlier one (else uniformly)
    min_visible_frac: float = 0.35  # each object keeps at least this share of its own shape visible
    shade: float = 0.10  # ± relative brightness of an object's linear shading (colour stays recoverable)
    dilation: int = 5  # cut-out dilation kernel (paper: 5×5)
    fill: tuple[int, int, int] = (0, 0, 0)  # foreground RGB outside its alpha
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # mask area limits, max layers
    max_attempts: int = 200  # resamples of a scene whose masks break the limits before giving up

    def __post_init__(self) -> None:
        # Lists (from JSON/YAML) become tuples, so configs stay hashable and compare equal.
        for name in ("count_weights", "colours", "shapes", "background_patterns", "object_patterns",
                     "background_colours", "fill"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("allowed_pairs", "holdout_pairs"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(tuple(p) for p in getattr(self, name)))
        if isinstance(self.validation, dict):
            object.__setattr__(self, "validation", ValidationConfig(**self.validation))
        if self.size < 16:
            raise ValueError(f"size must be ≥ 16, got {self.size}")
        if not (1 <= self.min_foregrounds <= self.max_foregrounds):
            raise ValueError(
                f"need 1 ≤ min_foregrounds ≤ max_foregrounds, got {self.min_foregrounds}..{self.max_foregrounds}"
            )
        if self.max_foregrounds + 1 > self.validation.max_layers:
            raise ValueError(
                f"max_foregrounds {self.max_foregrounds} + background > max_layers {self.validation.max_layers}"
            )
        n_counts = self.max_foregrounds - self.min_foregrounds + 1
        if self.count_weights is not None and (
            len(self.count_weights) != n_counts or min(self.count_weights) < 0 or sum(self.count_weights) <= 0
        ):
            raise ValueError(f"count_weights needs {n_counts} weights ≥ 0 (not all 0), got {self.count_weights}")
        for name, values, known in (
            ("colours", self.colours, COLOURS), ("background_colours", self.background_colours, COLOURS),
            ("shapes", self.shapes, SHAPES), ("background_patterns", self.background_patterns, BACKGROUND_PATTERNS),
            ("object_patterns", self.object_patterns, OBJECT_PATTERNS),
        ):
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise ValueError(f"{name} must be a non-empty subset of {', '.join(known)}; unknown: {unknown}")
        for name, pairs in (("allowed_pairs", self.allowed_pairs or ()), ("holdout_pairs", self.holdout_pairs)):
            bad = [p for p in pairs if len(p) != 2 or p[0] not in COLOURS or p[1] not in SHAPES]
            if bad:
                raise ValueError(f"{name} holds unknown (colour, shape) pairs: {bad}")
        if self.dilation < 1 or self.dilation % 2 == 0:
            raise ValueError(f"dilation must be an odd kernel size ≥ 1, got {self.dilation}")
        if not (0 < self.min_radius <= self.max_radius <= 0.5):
            raise ValueError(f"need 0 < min_radius ≤ max_radius ≤ 0.5, got {self.min_radius}, {self.max_radius}")
        if not (0.0 <= self.min_visible_frac <= 1.0 and 0.0 <= self.occlusion_prob <= 1.0 and 0.0 <= self.shade < 1.0):
            raise ValueError("min_visible_frac and occlusion_prob must lie in [0, 1], shade in [0, 1)")
        pairs = self.object_pairs()
        if not pairs:
            raise ValueError("no (colour, shape) pair is left after allowed_pairs/holdout_pairs")
        if self.distinct_colours and len({c for c, _ in pairs}) < self.max_foregrounds:
            raise ValueError(
                f"distinct_colours needs ≥ {self.max_foregrounds} colours among the allowed pairs, "
                f"got {sorted({c for c, _ in pairs})}"
            )

    def object_pairs(self) -> list[Pair]:
        """The (colour, shape) combos objects are drawn from: allowed (or colours × shapes) minus holdout."""
        base = self.allowed_pairs
        if base is None:
            base = tuple((c, s) for c in self.colours for s in self.shapes)
        keep = set(base) - set(self.holdout_pairs)
        return [(c, s) for c, s in dict.fromkeys(base) if (c, s) in keep and c in self.colours and s in self.shapes]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; stored in every sample's `pipeline["config"]`."""
        return json.loads(_config_text(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SceneConfig":
        """Inverse of `to_json` (e.g. from a sample's `pipeline["config"]`); unknown keys are an error."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SceneConfig keys: {sorted(unknown)}")
        return cls(**data)


@functools.lru_cache(maxsize=16)
def _object_pairs(config: SceneConfig) -> list[Pair]:
    return config.object_pairs()


@functools.lru_cache(maxsize=16)
def _config_text(config: SceneConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


# --- scene layout -------------------------------------------------------------------------------------------------


def _draw_count(rng: np.random.Generator, config: SceneConfig) -> int:
    """The number of foregrounds, drawn once per scene (before layout retries, so `count_weights` hold exactly)."""
    counts = np.arange(config.min_foregrounds, config.max_foregrounds + 1)
    p = None if config.count_weights is None else np.asarray(config.count_weights, float) / sum(config.count_weights)
    return int(rng.choice(counts, p=p))


def _layout_ok(config: SceneConfig, shapes: list[np.ndarray], visible: list[np.ndarray]) -> bool:
    v = config.validation
    for full, vis in zip(shapes, visible):
        area, full_area = float(vis.mean()), float(full.mean())
        if not (v.min_area_frac <= area <= v.max_area_frac) or area < config.min_visible_frac * full_area:
            return False
    return True


# --- prompts ------------------------------------------------------------------------------------------------------


def _global_prompt(
    rng: np.random.Generator, objects: list[PlacedShape], occluders: list[set[int]], background: str
) -> str:
    """'a red circle in front of a blue square on a striped green background' — objects named front to back."""
    order = list(range(len(objects) - 1, -1, -1))  # front → back
    text, named = objects[order[0]].prompt(), {order[0]}
    for i in order[1:]:
        joiner = " in front of " if occluders[i] & named else " and "
        text += joiner + objects[i].prompt()
        named.add(i)
    template = GLOBAL_TEMPLATES[int(rng.integers(len(GLOBAL_TEMPLATES)))]
    return template.format(objects=text, background=background)


# --- one scene ----------------------------------------------------------------------------------------------------


def make_scene(config: SceneConfig, seed: int, index: int, key: str | None = None) -> MLCIDSample:
    """The ground-truth MLCID sample of scene `index` of `seed` (its RNG depends on (seed, index) only).

    `key` defaults to the 9-digit index. Raises RuntimeError if no valid layout is found in `max_attempts`.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be ≥ 0, got {seed}, {index}")
    rng = np.random.default_rng([seed, index])
    size, pairs = config.size, _object_pairs(config)

    # 1. Draw the object count, then lay objects out until every visible mask respects the area limits.
    n = _draw_count(rng, config)
    for _ in range(config.max_attempts):
        radii = (config.min_radius, config.max_radius)
        objects = place_shapes(rng, n, pairs, size, radii, config.occlusion_prob, config.distinct_colours)
        shapes = [o.mask(size) for o in objects]  # [(H, W) bool]
        visible = visible_masks(shapes)
        if _layout_ok(config, shapes, visible):
            break
    else:
        raise RuntimeError(
            f"no valid layout of {n} objects for seed={seed} index={index} in {config.max_attempts} attempts; "
            "widen the radius range or the area limits"
        )

    if config.object_patterns != ("plain",):  # own RNG stream: scenes of plain-object configs stay as they were
        tex_rng = np.random.default_rng([seed, index, 1])
        objects = [dataclasses.replace(o, pattern=ObjectPattern.draw(tex_rng, config.object_patterns, size))
                   for o in objects]

    # 2. Background: pattern and colour (a colour no object uses, when there is one).
    pattern = config.background_patterns[int(rng.integers(len(config.background_patterns)))]
    bg_choices = [c for c in config.background_colours if c not in {o.colour for o in objects}] or list(
        config.background_colours
    )
    bg_colour = bg_choices[int(rng.integers(len(bg_choices)))]
    background, bg_params = background_image(pattern, COLOURS[bg_colour], size, rng)  # (H, W, 3)

    # 3. Paint objects back→front; cut the layers: own pixels in the shape, composite in the ring, `fill` outside.
    image, foregrounds, masks = paint_layers(
        background, objects, shapes, visible, config.shade, config.dilation, config.fill
    )

    # 4. Prompts and metadata.
    occluders = [{j for j in range(i + 1, n) if (shapes[i] & shapes[j]).any()} for i in range(n)]  # front overlaps
    bg_phrase = with_article(f"{BACKGROUND_PATTERNS[pattern]} {bg_colour}")
    global_prompt = _global_prompt(rng, objects, occluders, bg_phrase)
    layers = [LayerInfo(prompt=BACKGROUND_PROMPT)] + [
        LayerInfo(prompt=o.prompt(), box=mask_box(vis), area_frac=float(vis.mean()))
        for o, vis in zip(objects, visible)
    ]
    source = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "index": int(index),
        "url": f"synthetic://{seed}/{index}",
        "caption": global_prompt,
        "background": {"pattern": pattern, "colour": bg_colour, "rgb": list(COLOURS[bg_colour]), **bg_params},
        "objects": [
            o.to_json()
            | {
                "area_frac": float(vis.mean()),
                "full_area_frac": float(full.mean()),
                "occluded_by": sorted(j + 1 for j in occ),  # layer indices of objects covering part of this one
            }
            for o, full, vis, occ in zip(objects, shapes, visible, occluders)
        ],
    }
    pipeline = {"generator": GENERATOR, "version": GENERATOR_VERSION, "config": config.to_json()}
    return MLCIDSample(
        key=key if key is not None else f"{index:09d}",
        global_prompt=global_prompt,
        composite=image,
        background=background,
        foregrounds=foregrounds,
        masks=masks,
        layers=layers,
        source=source,
        pipeline=pipeline,
    )


# --- shards -------------------------------------------------------------------------------------------------------


def raw_key(shard_id: int, offset: int) -> str:
    """img2dataset's 9-digit key: 5-digit shard id then the 4-digit position inside the shard."""
    if not (0 <= offset < MAX_PER_SHARD) or not (0 <= shard_id < 100_000):
        raise ValueError(f"shard {shard_id} / offset {offset} do not fit an img2dataset key")
    return f"{shard_id:05d}{offset:04d}"


def shard_ranges(samples: int, shards: int) -> list[range]:
    """Global sample indices of each shard: contiguous blocks of ceil(samples / shards)."""
    if samples < 1 or not (1 <= shards <= samples):
        raise ValueError(f"need samples ≥ 1 and 1 ≤ shards ≤ samples, got samples={samples} shards={shards}")
    per = -(-samples // shards)
    if per > MAX_PER_SHARD:
        need = -(-samples // MAX_PER_SHARD)
        raise ValueError(f"{per} samples per shard > {MAX_PER_SHARD}; use at least {need} shards")
    return [range(s * per, min((s + 1) * per, samples)) for s in range(shards) if s * per < samples]


_PARQUET_FIELDS = (
    ("key", "string"), ("url", "string"), ("caption", "string"), ("status", "string"), ("error_message", "string"),
    ("width", "int64"), ("height", "int64"), ("original_width", "int64"), ("original_height", "int64"),
    ("exif", "string"), ("sha256", "string"),
)


def encode_jpeg_444(image: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of (H, W, 3) uint8 without chroma subsampling (4:2:0 would smear the saturated shape edges)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: same seed → same bytes
    tar.addfile(info, io.BytesIO(data))


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_shard(
    out: str | os.PathLike,
    mlcid_out: str | os.PathLike,
    shard_id: int,
    indices: Sequence[int] | range,
    seed: int,
    config: SceneConfig = SceneConfig(),
    jpeg_quality: int = 95,
    on_sample: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write raw shard `out/{shard_id:05d}.tar` (+ .parquet, _stats.json) and `mlcid_out/mlcid-{shard_id:06d}.tar`.

    Scene `indices[k]` gets key `raw_key(shard_id, k)` in both. Files appear by rename; each stats file is last.
    Returns {"shard_id", "samples", "written", "layer_counts", "seconds"}.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    start, t_start = time.perf_counter(), time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw_tar, raw_pq, raw_stats = (out / f"{shard_id:05d}{ext}" for ext in (".tar", ".parquet", "_stats.json"))
    raw_stats.unlink(missing_ok=True)  # an old stats file must never vouch for new content
    tmp_tar, tmp_pq = raw_tar.with_name(raw_tar.name + ".tmp"), raw_pq.with_name(raw_pq.name + ".tmp")
    rows: list[dict[str, Any]] = []
    timings: Counter[str] = Counter()
    try:
        with ShardWriter(mlcid_out, shard_id, config=config.validation) as writer, tarfile.open(
            tmp_tar, "w", format=tarfile.PAX_FORMAT
        ) as tar:
            for offset, index in enumerate(indices):
                key = raw_key(shard_id, offset)
                t0 = time.perf_counter()
                sample = make_scene(config, seed, index, key=key)
                t1 = time.perf_counter()
                sample.source.update(shard=raw_tar.name, key=key)
                jpg = encode_jpeg_444(sample.composite, quality=jpeg_quality)
                meta = {
                    "key": key, "url": sample.source["url"], "caption": sample.global_prompt, "status": "success",
                    "error_message": None, "width": sample.width, "height": sample.height,
                    "original_width": sample.width, "original_height": sample.height, "exif": None,
                    "sha256": hashlib.sha256(jpg).hexdigest(),
                }
                _add_member(tar, f"{key}.jpg", jpg)
                _add_member(tar, f"{key}.txt", sample.global_prompt.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                rows.append(meta)
                if not writer.write(sample):
                    raise RuntimeError(f"generated sample {key} failed validation: {dict(writer.dropped)}")
                timings["generate"] += t1 - t0
                timings["encode_write"] += time.perf_counter() - t1
                if on_sample is not None:
                    on_sample()
            for name, seconds in timings.items():
                writer.add_timing(name, seconds)
        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _PARQUET_FIELDS])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_pq)
        _replace_atomically(tmp_tar, raw_tar)
        _replace_atomically(tmp_pq, raw_pq)
    finally:
        tmp_tar.unlink(missing_ok=True)
        tmp_pq.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    stats = {
        "count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
        "duration": round(seconds, 4), "start_time": t_start, "end_time": time.time(),
        "status_dict": {"success": len(rows)}, "generator": GENERATOR, "seed": seed,
        "first_index": int(indices[0]) if len(rows) else None, "last_index": int(indices[-1]) if len(rows) else None,
    }
    tmp_stats = raw_stats.with_name(raw_stats.name + ".tmp")
    tmp_stats.write_text(json.dumps(stats, indent=1))
    _replace_atomically(tmp_stats, raw_stats)
    return {
        "shard_id": shard_id, "samples": len(rows), "written": writer.written,
        "layer_counts": dict(writer.layer_counts), "seconds": seconds,
    }


def _shard_job(args: tuple) -> dict[str, Any]:
    """Process-pool entry: one shard (kept top-level so it pickles)."""
    return write_shard(*args)


def write_dataset(
    out: str | os.PathLike,
    mlcid_out: str | os.PathLike,
    samples: int,
    seed: int = 0,
    shards: int = 1,
    config: SceneConfig = SceneConfig(),
    shard_ids: Sequence[int] | None = None,
    processes: int = 1,
    jpeg_quality: int = 95,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `samples` scenes over `shards` raw + MLCID shard pairs (or only `shard_ids` of that layout).

    Returns a summary: samples, shards written, layer counts, seconds and samples/s.
    """
    from tqdm import tqdm

    ranges = shard_ranges(samples, shards)
    todo = list(range(len(ranges))) if shard_ids is None else sorted(set(shard_ids))
    bad = [s for s in todo if not 0 <= s < len(ranges)]
    if bad:
        raise ValueError(f"shard ids {bad} outside 0..{len(ranges) - 1}")
    total = sum(len(ranges[s]) for s in todo)
    jobs = [(out, mlcid_out, s, ranges[s], seed, config, jpeg_quality) for s in todo]
    start = time.perf_counter()
    with tqdm(total=total, desc="synthetic scenes", unit="scene", disable=not progress, mininterval=0.5) as bar:
        if processes <= 1:
            results = [write_shard(*job, on_sample=lambda: bar.update(1)) for job in jobs]
        else:
            results = []
            with ProcessPoolExecutor(max_workers=processes) as pool:
                for result in pool.map(_shard_job, jobs):
                    results.append(result)
                    bar.update(result["samples"])
    for r in results:
        log.info("shard %d: %d scenes in %.1f s", r["shard_id"], r["written"], r["seconds"])
    seconds = time.perf_counter() - start
    layer_counts: Counter[int] = Counter()
    for r in results:
        layer_counts.update(r["layer_counts"])
    return {
        "raw_dir": str(out), "mlcid_dir": str(mlcid_out), "seed": seed, "size": config.size,
        "samples": total, "written": sum(r["written"] for r in results), "shards": len(ranges), "shard_ids": todo,
        "layer_counts": {str(k): v for k, v in sorted(layer_counts.items())},
        "seconds": round(seconds, 3), "samples_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }


def default_mlcid_out(out: str | os.PathLike) -> Path:
    """`DIR/../<basename>-mlcid` for raw shards in DIR."""
    out = Path(out).resolve()
    return out.parent / f"{out.name}-mlcid"
