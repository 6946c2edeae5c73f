"""Pixel metrics of generated layers against their prompts' labels; never looks at the model (numpy/sklearn only).

For each generated sample (layer images (L, H, W, 3) uint8, masks (L, H, W) 0/255, composite (H, W, 3)) and the
labels its prompts name (foreground colour + shape per layer, background colour):
  colour   the dominant (median) RGB inside the layer's mask, nearest hue among the synthetic palette's colours
           (too grey to name = wrong);
  shape    a small classifier (`ShapeClassifier`, logistic regression on the mask's bounding-box crop resized to
           a fixed grid, plus fill ratio and aspect) fit on ground-truth MLCID masks;
  masks    every foreground mask non-empty (≥ `min_area_frac`) and all masks pairwise disjoint;
  background  the dominant colour of the background layer image is the colour the global prompt names;
  composite   mean |Eq. 4 recomposed from the layers − the composite| in 0-255 units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from mlcid.synthetic_shapes import COLOURS

GRID = 16  # side of the resized bounding-box crop the shape classifier sees


@dataclass(frozen=True)
class LayerLabels:
    """What a sample's prompts name: one (colour, shape) per foreground (back→front) and the background colour."""

    foregrounds: tuple[tuple[str, str], ...]
    background_colour: str | None = None

    @classmethod
    def from_source(cls, source: dict[str, Any]) -> "LayerLabels":
        """From a synthetic sample's `source` (objects back→front: colour, shape; background: colour)."""
        return cls(tuple((o["colour"], o["shape"]) for o in source["objects"]),
                   source.get("background", {}).get("colour"))


def _hue_sat(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and HSV saturation in [0, 1] of RGB rows (..., 3) in 0-255."""
    x = np.asarray(rgb, np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    d = np.where(mx > mn, mx - mn, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return np.where(mx > mn, h, 0.0), np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)


def nearest_colour(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]] = COLOURS,
                   min_saturation: float = 0.2) -> str | None:
    """Palette name of the nearest hue to `rgb` (3,), or None when it is too grey to name (saturation below
    `min_saturation`). Hue, not RGB distance: shading and pastel tints of a named colour keep its hue."""
    names = list(palette)
    hue, sat = _hue_sat(np.asarray(rgb, np.float32))
    if float(sat) < min_saturation:
        return None
    ref_h, _ = _hue_sat(np.asarray([palette[n] for n in names], np.float32))  # (K,)
    dist = np.abs((ref_h - float(hue) + 180.0) % 360.0 - 180.0)
    return names[int(np.argmin(dist))]


BACKGROUND_MIN_SATURATION = 0.1  # backgrounds are pale tints (a pattern's light tone has saturation ≈ 0.16)


def dominant_colour(image: np.ndarray, mask: np.ndarray | None = None, min_saturation: float = 0.2) -> str | None:
    """Nearest palette name of the median RGB of `image` (H, W, 3) inside `mask` (H, W) bool; None if empty
    or too grey (`min_saturation`)."""
    pixels = image.reshape(-1, 3) if mask is None else image[mask]  # (N, 3)
    if len(pixels) == 0:
        return None
    return nearest_colour(np.median(pixels.astype(np.float32), axis=0), min_saturation=min_saturation)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (H, W); an empty mask stays empty."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def shape_features(mask: np.ndarray) -> np.ndarray | None:
    """(GRID² + 3,) features of a bool mask (H, W): its largest component's bbox crop resized to GRID×GRID,
    fill ratio (area / bbox area), log aspect ratio, area fraction. None for an empty mask."""
    comp = largest_component(np.asarray(mask, bool))
    if not comp.any():
        return None
    ys, xs = np.nonzero(comp)
    crop = comp[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]  # (h, w)
    grid = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((GRID, GRID), Image.Resampling.BILINEAR),
                      np.float32) / 255.0  # (GRID, GRID)
    h, w = crop.shape
    extra = [crop.mean(), np.log(h / w), comp.mean()]
    return np.concatenate([grid.ravel(), np.asarray(extra, np.float32)])


class ShapeClassifier:
    """Shape name of a binary mask: standardised `shape_features` → multinomial logistic regression."""

    def __init__(self, c: float = 1.0, seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, random_state=seed))
        self.classes: list[str] = []

    def fit(self, masks: Sequence[np.ndarray], shapes: Sequence[str]) -> "ShapeClassifier":
        feats = [shape_features(m) for m in masks]
        keep = [i for i, f in enumerate(feats) if f is not None]
        if len(set(shapes[i] for i in keep)) < 2:
            raise ValueError(f"need non-empty masks of ≥ 2 shapes to fit, got {sorted(set(shapes))}")
        self.model.fit(np.stack([feats[i] for i in keep]), [shapes[i] for i in keep])
        self.classes = list(self.model.classes_)
        return self

    def predict(self, masks: Sequence[np.ndarray]) -> list[str | None]:
        """One shape name per mask; None for an empty mask."""
        if not self.classes:
            raise RuntimeError("ShapeClassifier.predict before fit")
        feats = [shape_features(m) for m in masks]
        keep = [i for i, f in enumerate(feats) if f is not None]
        out: list[str | None] = [None] * len(masks)
        if keep:
            for i, name in zip(keep, self.model.predict(np.stack([feats[i] for i in keep]))):
                out[i] = str(name)
        return out

    def accuracy(self, masks: Sequence[np.ndarray], shapes: Sequence[str]) -> float:
        pred = self.predict(masks)
        return float(np.mean([p == s for p, s in zip(pred, shapes)])) if len(shapes) else float("nan")


def composite_eq4(layers: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Eq. 4 from layer images (L, H, W, 3) and 0/255 masks (L, H, W): m_b·B + Σ m_i·F_i, float (H, W, 3)."""
    m = (masks > 127).astype(np.float32)[..., None]  # (L, H, W, 1)
    m[0] = 1.0 - np.clip(m[1:].sum(0), 0, 1)  # background weight = complement of the foregrounds' union
    return (m * layers.astype(np.float32)).sum(0)


@dataclass
class SampleFidelity:
    """Per-sample results; lists run over foreground layers back→front."""

    colour_ok: list[bool]
    shape_ok: list[bool]
    nonempty: list[bool]
    disjoint: bool
    background_ok: bool | None
    composite_mae: float
    predicted: list[tuple[str | None, str | None]] = field(default_factory=list)


def score_sample(images: np.ndarray, masks: np.ndarray, composite: np.ndarray, labels: LayerLabels,
                 classifier: ShapeClassifier, min_area_frac: float = 0.005) -> SampleFidelity:
    """Fidelity of one generated sample: images (L, H, W, 3), masks (L, H, W) 0/255 (layer 0 = background)."""
    L = images.shape[0]
    if L != len(labels.foregrounds) + 1 or masks.shape[0] != L:
        raise ValueError(f"{L} layer images / {masks.shape[0]} masks for {len(labels.foregrounds)} labelled "
                         "foregrounds + background")
    binary = masks > 127  # (L, H, W)
    fg = binary[1:]
    colours = [dominant_colour(images[i], binary[i]) for i in range(1, L)]
    shapes = classifier.predict(list(fg))
    nonempty = [bool(m.mean() >= min_area_frac) for m in fg]
    disjoint = bool((fg.sum(0) <= 1).all())
    bg = dominant_colour(images[0], min_saturation=BACKGROUND_MIN_SATURATION)  # None (grey) counts as wrong
    mae = float(np.abs(composite_eq4(images, masks) - composite.astype(np.float32)).mean())
    return SampleFidelity(
        colour_ok=[ne and c == want for c, ne, (want, _) in zip(colours, nonempty, labels.foregrounds)],
        shape_ok=[ne and s == want for s, ne, (_, want) in zip(shapes, nonempty, labels.foregrounds)],
        nonempty=nonempty, disjoint=disjoint,
        background_ok=None if labels.background_colour is None else bg == labels.background_colour,
        composite_mae=mae, predicted=list(zip(colours, shapes)),
    )


def summarize(results: Sequence[SampleFidelity]) -> dict[str, float]:
    """Means over samples (colour/shape/non-empty over all foreground layers); `both` = colour and shape right."""
    if not results:
        return {"n": 0}
    flat = lambda key: [v for r in results for v in getattr(r, key)]  # noqa: E731
    both = [c and s for r in results for c, s in zip(r.colour_ok, r.shape_ok)]
    bgs = [r.background_ok for r in results if r.background_ok is not None]
    return {
        "n": len(results), "layers": len(flat("colour_ok")),
        "colour_acc": float(np.mean(flat("colour_ok"))), "shape_acc": float(np.mean(flat("shape_ok"))),
        "both_acc": float(np.mean(both)), "nonempty": float(np.mean(flat("nonempty"))),
        "disjoint": float(np.mean([r.disjoint for r in results])),
        "background_acc": float(np.mean(bgs)) if bgs else float("nan"),
        "composite_mae": float(np.mean([r.composite_mae for r in results])),
    }


class SceneFeatures:
    """Image features for a Fréchet distance that needs no pretrained network: the hidden layer (ReLU) of a small
    MLP fit to tell a synthetic scene's attributes (colours, shapes, textures: multi-label strings) from its
    pixels, downscaled to `size`² RGB. Like Inception features for FID, they are what a classifier of this
    domain finds worth telling apart; they never see the generator."""

    def __init__(self, hidden: int = 32, size: int = 32, seed: int = 0, max_iter: int = 300) -> None:
        from sklearn.neural_network import MLPClassifier

        self.size = size
        self.model = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed,
                                   early_stopping=False)
        self.labels: list[str] = []

    def _inputs(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) → (N, size²·3 + (size/2)²·3) float32: the RGB image area-downscaled to size² in
        [-1, 1], and the local edge energy (mean |horizontal| + |vertical| pixel differences per channel at full
        resolution, area-pooled to (size/2)²), so fine texture is seen even where downscaling would average it."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
        x = images.astype(np.float32) / 127.5 - 1.0  # (N, H, W, 3)
        edges = np.zeros_like(x)
        edges[:, :, 1:] += np.abs(np.diff(x, axis=2))
        edges[:, 1:] += np.abs(np.diff(x, axis=1))
        return np.concatenate([_area(x, self.size), 2.0 * _area(edges, self.size // 2)], axis=1)

    def _targets(self, labels: Sequence[Sequence[str]]) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.labels)}
        y = np.zeros((len(labels), len(self.labels)), np.int64)
        for n, names in enumerate(labels):
            y[n, [index[x] for x in names if x in index]] = 1
        return y

    def fit(self, images: np.ndarray, labels: Sequence[Sequence[str]]) -> "SceneFeatures":
        """images (N, H, W, 3) uint8 with their attribute strings (N lists)."""
        if len(images) != len(labels) or len(images) < 2:
            raise ValueError(f"need ≥ 2 images with one label list each, got {len(images)} and {len(labels)}")
        self.labels = sorted({x for names in labels for x in names})
        if len(self.labels) < 2:
            raise ValueError(f"need ≥ 2 distinct labels to fit, got {self.labels}")
        self.model.fit(self._inputs(images), self._targets(labels))
        return self

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, hidden) float64: ReLU(x·W₀ + b₀) of the fitted MLP."""
        if not self.labels:
            raise RuntimeError("SceneFeatures.features before fit")
        x = self._inputs(images).astype(np.float64)
        return np.maximum(x @ self.model.coefs_[0] + self.model.intercepts_[0], 0.0)

    def label_accuracy(self, images: np.ndarray, labels: Sequence[Sequence[str]]) -> float:
        """Share of (image, label) decisions right — how well the features know the domain."""
        return float((self.model.predict(self._inputs(images)) == self._targets(labels)).mean())


def _area(x: np.ndarray, size: int) -> np.ndarray:
    """Area-average (N, H, W, C) to (N, size, size, C) (H, W multiples of size) → flattened (N, size²·C)."""
    n, h, w, c = x.shape
    if h % size or w % size:
        raise ValueError(f"image size {h}×{w} is not a multiple of {size}")
    pooled = x.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))  # (N, size, size, C)
    return pooled.reshape(n, -1)


def scene_attributes(source: dict[str, Any]) -> list[str]:
    """Attribute strings of a synthetic scene's `source`: background colour and pattern; each object's colour,
    shape and texture (what `SceneFeatures` learns to tell)."""
    bg = source.get("background", {})
    out = [f"bg:{bg.get('colour')}", f"bg-pattern:{bg.get('pattern')}"]
    for o in source["objects"]:
        out += [f"colour:{o['colour']}", f"shape:{o['shape']}",
                f"texture:{o.get('pattern', {}).get('pattern', 'plain')}"]
    return sorted(set(out))


def frechet_feature_distance(features: SceneFeatures, images: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between the features of `images` and of `reference` (both (N, H, W, 3) uint8)."""
    from model.evaluation.metrics import FeatureStats, frechet_distance_stats

    return frechet_distance_stats(FeatureStats.from_features(features.features(images)),
                                  FeatureStats.from_features(features.features(reference)))
