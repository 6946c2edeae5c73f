"""Appendix B mask rules: salient overlap, containment, area range, disjoint paint order, at most N foregrounds.

Each rule is a pure function over boolean (H, W) masks; `MaskRules` (stage `mask_rules`, backend `appendix_b`)
chains them on `item.masks` / `item.detections` / `item.saliency` and fills `item.objects` in paint order.

Definitions (the paper states the rules in words; these make them exact):
- Saliency overlap of mask m with salient foreground s: |m ∩ s| / |m| (the fraction of the object that is
  salient; 0 for an empty mask). Kept iff it EXCEEDS `min_saliency_overlap` (paper: 10%).
- Area fraction: |m| / (H·W); kept iff min_area_frac ≤ a ≤ max_area_frac (paper: 1%–80%).
- Containment of a in b: |a ∩ b| / |a|. A mask is dropped when containment ≥ `containment` (0.9) in a mask
  ranked before it by (area, score) descending — i.e. a larger one (an equal-area near-duplicate loses to
  the higher score).
- Paint order back→front: larger original area behind; the front mask wins every overlapping pixel, so each
  mask becomes its pixels minus the union of the masks in front of it.
- Selection: candidates are taken by detector score (highest first); one is accepted iff, after resolving the
  overlaps of the accepted set plus it, EVERY mask of the set is still inside the area range (the area is
  re-checked after resolving). At most `max_foregrounds` are accepted.

Order: saliency → area → containment → selection with overlap resolution. The area rule runs BEFORE
containment (DESIGN.md lists it after): otherwise a > 80% mask ("room", "table") would first remove every object
inside it and then be dropped itself, losing the sample. Masks that fail the area rule remove nothing.

Drop reasons: `no_mask` (nothing to filter), `no_salient_mask` (all removed by the saliency rule),
`area_out_of_range` (all remaining removed by the area rule), `no_valid_foreground` (nothing survived otherwise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from mlcid.schema import DEFAULT_MAX_AREA_FRAC, DEFAULT_MAX_LAYERS, DEFAULT_MIN_AREA_FRAC
from pipelines.base import Item, ObjectLayer, alive, register_stage

DEFAULT_MIN_SALIENCY_OVERLAP = 0.10  # Appendix B: more than 10% of the mask is salient
DEFAULT_CONTAINMENT = 0.90  # Appendix B: a mask 90% inside a larger one is dropped

NO_MASK = "no_mask"
NO_SALIENT_MASK = "no_salient_mask"
AREA_OUT_OF_RANGE = "area_out_of_range"
NO_VALID_FOREGROUND = "no_valid_foreground"


# -- measures -------------------------------------------------------------------------------------------------
def saliency_overlap(mask: np.ndarray, saliency: np.ndarray) -> float:
    """|m ∩ s| / |m|; 0.0 for an empty mask."""
    area = int(np.count_nonzero(mask))
    return float(np.count_nonzero(mask & saliency)) / area if area else 0.0


def area_fraction(mask: np.ndarray) -> float:
    return float(np.count_nonzero(mask)) / mask.size


def containment(inner: np.ndarray, outer: np.ndarray) -> float:
    """|inner ∩ outer| / |inner|: the fraction of `inner` lying inside `outer` (0.0 if inner is empty)."""
    area = int(np.count_nonzero(inner))
    return _intersection(inner, outer) / area if area else 0.0


def _intersection(a: np.ndarray, b: np.ndarray) -> int:
    """|a ∩ b|, counted only inside the overlap of the two masks' bounding boxes."""
    ba, bb = _bbox(a), _bbox(b)
    if ba is None or bb is None:
        return 0
    y0, y1, x0, x1 = max(ba[0], bb[0]), min(ba[1], bb[1]), max(ba[2], bb[2]), min(ba[3], bb[3])
    if y0 >= y1 or x0 >= x1:
        return 0
    return int(np.count_nonzero(a[y0:y1, x0:x1] & b[y0:y1, x0:x1]))


def _bbox(m: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) exclusive bounds of a mask's set pixels, None when empty."""
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box (x0, y0, x1, y1) of a non-empty mask, exclusive end."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("mask_box of an empty mask")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# -- rules: each returns the indices (into `masks`) that survive ----------------------------------------------
def keep_salient(masks: list[np.ndarray], saliency: np.ndarray, min_overlap: float) -> list[int]:
    """Indices of masks whose saliency overlap exceeds `min_overlap`."""
    return [i for i, m in enumerate(masks) if saliency_overlap(m, saliency) > min_overlap]


def keep_area(masks: list[np.ndarray], min_frac: float, max_frac: float) -> list[int]:
    """Indices of masks whose area fraction lies in [min_frac, max_frac]."""
    return [i for i, m in enumerate(masks) if min_frac <= area_fraction(m) <= max_frac]


def drop_contained(masks: list[np.ndarray], scores: list[float], ratio: float) -> list[int]:
    """Indices of masks NOT contained (≥ `ratio`) in a mask ranked before them by (area, score) descending."""
    areas = [int(np.count_nonzero(m)) for m in masks]
    rank = sorted(range(len(masks)), key=lambda i: (-areas[i], -scores[i], i))
    kept: list[int] = []
    for pos, i in enumerate(rank):
        inside = any(areas[i] and _intersection(masks[i], masks[j]) >= ratio * areas[i] for j in rank[:pos])
        if not inside:
            kept.append(i)
    return sorted(kept)


def paint_order(masks: list[np.ndarray]) -> list[int]:
    """Indices back→front: larger area behind (ties: earlier index behind)."""
    return sorted(range(len(masks)), key=lambda i: (-int(np.count_nonzero(masks[i])), i))


def resolve_overlaps(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Masks already in paint order back→front → disjoint masks: each minus the union of those in front of it."""
    out: list[np.ndarray] = [np.zeros_like(m, dtype=bool) for m in masks]
    front = np.zeros_like(masks[0], dtype=bool) if masks else None
    for k in range(len(masks) - 1, -1, -1):  # front-most first
        out[k] = np.logical_and(masks[k], ~front)
        front |= masks[k]
    return out


def select_foregrounds(
    masks: list[np.ndarray], scores: list[float], max_count: int, min_frac: float, max_frac: float
) -> list[tuple[int, np.ndarray]]:
    """Greedy by score: accept a candidate iff the resolved set still meets the area range. → [(index, mask)]
    back→front, disjoint."""
    accepted: list[int] = []
    resolved: list[tuple[int, np.ndarray]] = []
    for i in sorted(range(len(masks)), key=lambda i: (-scores[i], i)):
        if len(accepted) >= max_count:
            break
        trial = accepted + [i]
        order = [trial[k] for k in paint_order([masks[j] for j in trial])]
        disjoint = resolve_overlaps([masks[j] for j in order])
        if all(min_frac <= area_fraction(m) <= max_frac for m in disjoint):
            accepted, resolved = trial, list(zip(order, disjoint))
    return resolved


@dataclass
class RuleResult:
    """The surviving (index, disjoint mask) pairs back→front, or the reason nothing survived."""

    layers: list[tuple[int, np.ndarray]]
    reason: str | None = None
    detail: str = ""


def apply_rules(
    masks: list[np.ndarray],
    scores: list[float],
    saliency: np.ndarray | None,
    *,
    min_saliency_overlap: float = DEFAULT_MIN_SALIENCY_OVERLAP,
    containment_ratio: float = DEFAULT_CONTAINMENT,
    min_area_frac: float = DEFAULT_MIN_AREA_FRAC,
    max_area_frac: float = DEFAULT_MAX_AREA_FRAC,
    max_foregrounds: int = DEFAULT_MAX_LAYERS - 1,
) -> RuleResult:
    """All Appendix B rules in order (see the module docstring)."""
    if len(masks) != len(scores):
        raise ValueError(f"{len(masks)} masks but {len(scores)} scores")
    if not masks:
        return RuleResult([], NO_MASK, "no masks to filter")
    shape = masks[0].shape
    if any(m.shape != shape for m in masks) or (saliency is not None and saliency.shape != shape):
        raise ValueError(f"masks/saliency of different shapes: {[m.shape for m in masks]}, saliency "
                         f"{None if saliency is None else saliency.shape}")
    masks = [np.asarray(m, dtype=bool) for m in masks]
    idx = list(range(len(masks)))
    # 1. Salient overlap > threshold (skipped only when no threshold is set).
    if min_saliency_overlap > 0:
        if saliency is None:
            raise ValueError("mask rules need item.saliency when min_saliency_overlap > 0")
        sal = np.asarray(saliency, dtype=bool)
        idx = [idx[k] for k in keep_salient([masks[i] for i in idx], sal, min_saliency_overlap)]
        if not idx:
            return RuleResult([], NO_SALIENT_MASK, f"{len(masks)} masks, none > {min_saliency_overlap:.0%} salient")
    # 2. Area range.
    n = len(idx)
    idx = [idx[k] for k in keep_area([masks[i] for i in idx], min_area_frac, max_area_frac)]
    if not idx:
        return RuleResult([], AREA_OUT_OF_RANGE, f"{n} masks, none with area in [{min_area_frac}, {max_area_frac}]")
    # 3. Masks contained in larger ones.
    idx = [idx[k] for k in drop_contained([masks[i] for i in idx], [scores[i] for i in idx], containment_ratio)]
    # 4. Greedy selection with overlap resolution and area re-check.
    chosen = select_foregrounds([masks[i] for i in idx], [scores[i] for i in idx], max_foregrounds,
                                min_area_frac, max_area_frac)
    layers = [(idx[k], m) for k, m in chosen]
    if not layers:
        return RuleResult([], NO_VALID_FOREGROUND, "no mask survived overlap resolution")
    return RuleResult(layers)


@dataclass(frozen=True)
class MaskRulesOptions:
    """The Appendix B thresholds. All are `PipelineConfig` fields (the validator reads the same limits)."""

    PIPELINE_FIELDS: ClassVar[dict[str, str]] = {
        "min_saliency_overlap": "min_saliency_overlap", "containment": "containment",
        "min_area_frac": "min_area_frac", "max_area_frac": "max_area_frac", "max_foregrounds": "max_foregrounds",
    }

    min_saliency_overlap: float = DEFAULT_MIN_SALIENCY_OVERLAP
    containment: float = DEFAULT_CONTAINMENT
    min_area_frac: float = DEFAULT_MIN_AREA_FRAC
    max_area_frac: float = DEFAULT_MAX_AREA_FRAC
    max_foregrounds: int = DEFAULT_MAX_LAYERS - 1

    def __post_init__(self) -> None:
        if self.max_foregrounds < 1:
            raise ValueError(f"max_foregrounds must be ≥ 1, got {self.max_foregrounds}")


@register_stage("mask_rules", "appendix_b", MaskRulesOptions)
class MaskRules:
    """Stage: `item.masks` (+ detections, saliency) → `item.objects` back→front, or drop with the rule's reason."""

    def __init__(self, options: MaskRulesOptions = MaskRulesOptions()) -> None:
        params = asdict(options)
        params["containment_ratio"] = params.pop("containment")
        self.params = params

    def setup(self) -> None:
        pass

    def __call__(self, batch: list[Item]) -> list[Item]:
        for item in alive(batch):
            if len(item.masks) != len(item.detections):
                raise ValueError(f"{item.key}: {len(item.masks)} masks for {len(item.detections)} detections")
            result = apply_rules(item.masks, [d.score for d in item.detections], item.saliency, **self.params)
            if result.reason is not None:
                item.drop(result.reason, result.detail)
                continue
            item.objects = [
                ObjectLayer(mask=m, box=mask_box(m), score=float(item.detections[i].score),
                            label=item.detections[i].label)
                for i, m in result.layers
            ]
        return batch
