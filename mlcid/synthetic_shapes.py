"""Drawing for synthetic scenes: vocabulary and its wording, shape masks, occlusion, textures, layer cut-outs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mlcid.composite import dilate  # noqa: F401 (one dilation for the synthetic scenes and the pipeline)
# Saturated, well-separated hues: a dominant-colour classifier tells them apart (nearest-RGB or hue).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "yellow": (240, 210, 30),
    "purple": (135, 55, 190),
    "orange": (245, 130, 25),
    "cyan": (25, 190, 205),
    "pink": (240, 105, 180),
}


@dataclass(frozen=True)
class ShapeSpec:
    """A shape as a unit polygon (vertices at radius ≤ 1 around the origin; None = circle) and its rotation range."""

    vertices: tuple[tuple[float, float], ...] | None
    max_rotation_deg: float  # rotation drawn uniformly in ±this (small for shapes a big turn would rename)


def _regular(n: int, start_deg: float, radius: float = 1.0) -> tuple[tuple[float, float], ...]:
    step = 360.0 / n
    return tuple(
        (radius * math.cos(math.radians(start_deg + k * step)), radius * math.sin(math.radians(start_deg + k * step)))
        for k in range(n)
    )


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    outer = _regular(points, -90.0)
    inner_v = _regular(points, -90.0 + 180.0 / points, inner)
    return tuple(v for pair in zip(outer, inner_v) for v in pair)


_ARM = 0.32  # half-width of a cross arm, in radii
SHAPE_SPECS: dict[str, ShapeSpec] = {
    "circle": ShapeSpec(None, 0.0),
    "square": ShapeSpec(_regular(4, 45.0), 12.0),  # a square turned 45° would read as a diamond
    "triangle": ShapeSpec(_regular(3, -90.0), 20.0),  # point up, y grows downwards
    "star": ShapeSpec(_star(), 36.0),
    "diamond": ShapeSpec(((0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)), 12.0),  # tall rhombus
    "cross": ShapeSpec(
        (
            (-_ARM, -1.0), (_ARM, -1.0), (_ARM, -_ARM), (1.0, -_ARM), (1.0, _ARM), (_ARM, _ARM),
            (_ARM, 1.0), (-_ARM, 1.0), (-_ARM, _ARM), (-1.0, _ARM), (-1.0, -_ARM), (-_ARM, -_ARM),
        ),
        12.0,
    ),
    "hexagon": ShapeSpec(_regular(6, 0.0), 30.0),
}
SHAPES: tuple[str, ...] = tuple(SHAPE_SPECS)

# Background pattern → the adjective used in prompts ("on a striped green background").
BACKGROUND_PATTERNS: dict[str, str] = {
    "plain": "plain",
    "stripes": "striped",
    "checks": "checkered",
    "gradient": "gradient",
    "noise": "speckled",
    "dots": "dotted",
}


def shape_mask(shape: str, size: int, center: tuple[float, float], radius: float, angle_deg: float) -> np.ndarray:
    """Binary (size, size) bool mask of `shape` (no anti-aliasing) centred at (x, y) with the given radius/rotation."""
    spec = SHAPE_SPECS.get(shape)
    if spec is None:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    cx, cy = center
    if spec.vertices is None:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        pts = [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in spec.vertices]
        draw.polygon(pts, fill=255)
    return np.asarray(im) > 0  # (H, W) bool


@dataclass(frozen=True)
class PlacedShape:
    """One object of a scene in pixel units; a scene lists them in paint order back→front."""

    colour: str
    shape: str
    center: tuple[float, float]
    radius: float
    angle: float  # rotation, degrees
    shade_dir: float  # direction of the linear shading, degrees

    def mask(self, size: int) -> np.ndarray:
        """The full (unoccluded) shape, (size, size) bool."""
        return shape_mask(self.shape, size, self.center, self.radius, self.angle)

    def prompt(self) -> str:
        """Its layer prompt: 'a red circle', 'an orange star'."""
        return with_article(f"{self.colour} {self.shape}")

    def to_json(self) -> dict:
        return {
            "colour": self.colour, "shape": self.shape, "rgb": list(COLOURS[self.colour]),
            "center": [round(self.center[0], 3), round(self.center[1], 3)], "radius": round(self.radius, 3),
            "angle": round(self.angle, 3), "shade_dir": round(self.shade_dir, 3),
        }


def with_article(phrase: str) -> str:
    """'orange star' → 'an orange star'; 'red circle' → 'a red circle'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def place_shapes(
    rng: np.random.Generator,
    n: int,
    pairs: list[tuple[str, str]],
    size: int,
    radius_range: tuple[float, float],
    occlusion_prob: float,
    distinct_colours: bool,
) -> list[PlacedShape]:
    """Draw `n` objects (paint order back→front) from (colour, shape) `pairs`, each pair at most once.

    Radii are fractions of `size`; each object lies inside the canvas. With `occlusion_prob` an object is placed
    over a random earlier one (centre distance 0.3–0.8 × the radii sum), so later objects really hide earlier ones.
    """
    s, objects = float(size), []
    for _ in range(n):
        used_colours = {o.colour for o in objects} if distinct_colours else set()
        used_pairs = {(o.colour, o.shape) for o in objects}
        candidates = [pc for pc in pairs if pc[0] not in used_colours and pc not in used_pairs]
        if not candidates:
            raise ValueError(f"no (colour, shape) pair left for object {len(objects) + 1} of {n}")
        colour, shape = candidates[int(rng.integers(len(candidates)))]
        r = float(rng.uniform(*radius_range)) * s
        if objects and rng.random() < occlusion_prob:
            under = objects[int(rng.integers(len(objects)))]
            phi, dist = rng.uniform(0.0, 2 * math.pi), (r + under.radius) * rng.uniform(0.3, 0.8)
            cx, cy = under.center[0] + dist * math.cos(phi), under.center[1] + dist * math.sin(phi)
        else:
            cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
        max_rot = SHAPE_SPECS[shape].max_rotation_deg
        objects.append(
            PlacedShape(
                colour=colour,
                shape=shape,
                center=(float(np.clip(cx, r, s - r)), float(np.clip(cy, r, s - r))),
                radius=r,
                angle=float(rng.uniform(-max_rot, max_rot)),
                shade_dir=float(rng.uniform(0.0, 360.0)),
            )
        )
    return objects


def visible_masks(shapes: list[np.ndarray]) -> list[np.ndarray]:
    """What stays visible of each shape (paint order back→front): shape_i minus all later shapes. [(H, W) bool]"""
    visible, covered = [np.empty(0)] * len(shapes), np.zeros_like(shapes[0])
    for i in range(len(shapes) - 1, -1, -1):
        visible[i] = shapes[i] & ~covered
        covered |= shapes[i]
    return visible


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a non-empty (H, W) bool mask, exclusive end."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        raise ValueError("mask_box of an empty mask")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinate grids: xs (1, W), ys (H, 1), broadcastable to (H, W)."""
    r = np.arange(size, dtype=np.float32) + 0.5
    return r[None, :], r[:, None]


def object_texture(
    rgb: tuple[int, int, int],
    box: tuple[int, int, int, int],
    center: tuple[float, float],
    radius: float,
    shade_dir_deg: float,
    shade: float,
) -> np.ndarray:
    """The object's own pixels over `box` = (x0, y0, x1, y1): flat colour times a light linear shading (±`shade`).

    Returns (y1 - y0, x1 - x0, 3) uint8; the caller keeps what lies inside the shape. Shading is linear across the
    object's diameter in direction `shade_dir_deg`, so the mean colour stays the named colour.
    """
    x0, y0, x1, y1 = box
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5  # (1, w)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5  # (h, 1)
    c, s = math.cos(math.radians(shade_dir_deg)), math.sin(math.radians(shade_dir_deg))
    g = np.clip(((xs - center[0]) * c + (ys - center[1]) * s) / max(radius, 1.0), -1.0, 1.0)  # (h, w)
    out = np.asarray(rgb, np.float32)[None, None, :] * (1.0 + shade * g)[..., None]  # (h, w, 3)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def background_tones(rgb: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two light tints of a colour (hue kept, lighter than any object): the pattern's two tones, float32 (3,)."""
    c = np.asarray(rgb, np.float32)
    return 0.55 * c + 0.45 * 255.0, 0.30 * c + 0.70 * 255.0


def background_image(
    pattern: str, rgb: tuple[int, int, int], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Render a full background of `pattern` in tints of `rgb`. Returns ((H, W, 3) uint8, pattern parameters)."""
    a, b = background_tones(rgb)
    xs, ys = _coords(size)
    params: dict = {}
    if pattern == "plain":
        t = np.zeros((size, size), np.float32)
    elif pattern in ("stripes", "checks", "dots"):
        period = int(rng.integers(max(4, size // 16), max(6, size // 4) + 1))
        params["period"] = period
        if pattern == "stripes":
            angle = float(rng.choice([0.0, 45.0, 90.0, 135.0]))
            params["angle"] = angle
            u = xs * math.cos(math.radians(angle)) + ys * math.sin(math.radians(angle))  # (H, W)
            t = (np.floor(u / (period / 2.0)) % 2).astype(np.float32)
        elif pattern == "checks":
            t = ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float32)
        else:
            dx, dy = xs % period - period / 2.0, ys % period - period / 2.0
            t = ((dx * dx + dy * dy) < (0.3 * period) ** 2).astype(np.float32)
    elif pattern == "gradient":
        angle = float(rng.uniform(0.0, 360.0))
        params["angle"] = round(angle, 3)
        u = (xs - size / 2.0) * math.cos(math.radians(angle)) + (ys - size / 2.0) * math.sin(math.radians(angle))
        t = np.clip(u / size + 0.5, 0.0, 1.0).astype(np.float32)
    elif pattern == "noise":
        t = np.clip(rng.normal(0.5, 0.25, (size, size)), 0.0, 1.0).astype(np.float32)
    else:
        raise ValueError(f"unknown background pattern {pattern!r}; known: {', '.join(BACKGROUND_PATTERNS)}")
    levels = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None]  # (256, 1)
    lut = np.clip(np.rint(a[None, :] * (1.0 - levels) + b[None, :] * levels), 0, 255).astype(np.uint8)  # (256, 3)
    idx = np.rint(np.broadcast_to(t, (size, size)) * 255.0).astype(np.uint8)  # (H, W) tone level
    return lut[idx], params  # (H, W, 3)


def paint_layers(
    background: np.ndarray,
    objects: list[PlacedShape],
    shapes: list[np.ndarray],
    visible: list[np.ndarray],
    shade: float,
    dilation: int,
    fill: tuple[int, int, int],
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Paint objects back→front over `background` and cut each one's layer.

    background (H, W, 3) uint8; shapes / visible: full and visible masks, [(H, W) bool].
    Returns (composite (H, W, 3), foregrounds [(H, W, 4)], masks [(H, W)] 0/255). A foreground's alpha is its
    `dilation`-dilated visible mask; its RGB there is the object's own pixels inside the shape (also where a later
    object hides it) and the composite in the dilated ring outside the shape; `fill` outside the alpha.
    Work happens in each shape's box grown by the dilation radius (the dilated mask cannot leave it).
    """
    size, margin = background.shape[0], dilation // 2
    image, crops = background.copy(), []
    for o, full in zip(objects, shapes):
        bx0, by0, bx1, by1 = mask_box(full)
        box = (max(bx0 - margin, 0), max(by0 - margin, 0), min(bx1 + margin, size), min(by1 + margin, size))
        x0, y0, x1, y1 = box
        tex = object_texture(COLOURS[o.colour], box, o.center, o.radius, o.shade_dir, shade)  # (h, w, 3)
        sel = full[y0:y1, x0:x1]  # (h, w)
        image[y0:y1, x0:x1][sel] = tex[sel]
        crops.append((box, tex))

    foregrounds, masks = [], []
    for ((x0, y0, x1, y1), tex), full, vis in zip(crops, shapes, visible):
        alpha = dilate(vis, dilation)[y0:y1, x0:x1]  # (h, w) bool
        rgb = np.where(full[y0:y1, x0:x1, None], tex, image[y0:y1, x0:x1])  # (h, w, 3)
        fg = np.zeros((size, size, 4), np.uint8)
        fg[..., :3] = fill
        fg_crop = fg[y0:y1, x0:x1]  # view, (h, w, 4)
        fg_crop[alpha, :3] = rgb[alpha]
        fg_crop[alpha, 3] = 255
        foregrounds.append(fg)
        masks.append(np.where(vis, 255, 0).astype(np.uint8))  # (H, W)
    return image, foregrounds, masks
