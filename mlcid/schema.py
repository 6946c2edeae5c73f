"""The `mlcid/1` sample: dataclasses for a composable image and its layers, and their tar members."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA = "mlcid/1"
BACKGROUND_PROMPT = "the background"
MIN_LAYERS = 2  # background + at least one foreground
DEFAULT_MAX_LAYERS = 4  # background + up to 3 foregrounds (paper §4.3)
DEFAULT_MIN_AREA_FRAC = 0.01  # Appendix B: masks between 1% and 80% of the image
DEFAULT_MAX_AREA_FRAC = 0.80

JSON_MEMBER = "json"
COMPOSITE_MEMBER = "composite.jpg"


def layer_member(index: int) -> str:
    """Tar member suffix of layer `index` (0 = background RGB, ≥1 = foreground RGBA)."""
    return f"layer{index:02d}.png"


def mask_member(index: int) -> str:
    """Tar member suffix of foreground mask `index` (≥1), 8-bit L, values 0/255."""
    return f"mask{index:02d}.png"


@dataclass
class LayerInfo:
    """Per-layer metadata stored in `KEY.json` under `layers` (index 0 is the background)."""

    prompt: str
    box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) in pixels, exclusive end
    score: float | None = None  # detector score; None for the background and synthetic layers
    area_frac: float | None = None  # mask area / image area

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt}
        if self.box is not None:
            out["box"] = [int(v) for v in self.box]
        if self.score is not None:
            out["score"] = float(self.score)
        if self.area_frac is not None:
            out["area_frac"] = float(self.area_frac)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerInfo":
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            raise ValueError(f"layer entry must be an object with a string 'prompt', got {data!r:.200}")
        box = data.get("box")
        if box is not None:
            if not (isinstance(box, (list, tuple)) and len(box) == 4):
                raise ValueError(f"layer box must be 4 numbers, got {box!r:.200}")
            box = tuple(int(v) for v in box)
        return cls(prompt=data["prompt"], box=box, score=data.get("score"), area_frac=data.get("area_frac"))


# Provenance in `source` (every sample; also columns of the builder's outcomes parquet):
#   uid           stable id of the input sample: `sample_uid(input_shard, input_key, url)`
#   url           where the image came from (img2dataset's json `url`), or None
#   caption       the input's original caption (txt member, else json `caption`), or None
#   license       licence-like fields the input carried ({field: value}, e.g. LAION's `LICENSE`), may be {}
#   input_shard, input_key, input_url   which input shard and key the sample was made from
PROVENANCE_FIELDS = ("uid", "url", "caption", "license", "input_shard", "input_key", "input_url")
_LICENSE_NAMES = ("rights", "copyright", "attribution", "usage_terms")


def sample_uid(input_shard: int, input_key: str, url: str | None) -> str:
    """A stable id for an input sample: the same shard id, key and URL always give the same 24 hex digits."""
    text = f"{int(input_shard)}\x1f{input_key}\x1f{url or ''}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def license_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The licence-like fields of an input's json (names containing 'licen', or rights/copyright/…), non-empty."""
    out = {}
    for name, value in meta.items():
        low = str(name).lower()
        if ("licen" in low or low in _LICENSE_NAMES) and value not in (None, "", [], {}):
            out[str(name)] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)
    return out


@dataclass
class MLCIDSample:
    """One composable image: background B, foregrounds F_i (RGBA) and masks m_i, with prompts.

    Arrays are uint8, all of one size (H, W):
      composite   (H, W, 3)   the source image the layers were made from
      background  (H, W, 3)   B, inpainted
      foregrounds [(H, W, 4)] F_i in paint order back→front; alpha = dilated cut-out
      masks       [(H, W)]    m_i, values 0 or 255, undilated, pairwise disjoint
    `layers[0]` describes the background, `layers[i]` foreground i (so len(layers) == 1 + len(foregrounds)).
    """

    key: str
    global_prompt: str
    composite: np.ndarray
    background: np.ndarray
    foregrounds: list[np.ndarray]
    masks: list[np.ndarray]
    layers: list[LayerInfo]
    source: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return 1 + len(self.foregrounds)

    @property
    def height(self) -> int:
        return int(self.composite.shape[0])

    @property
    def width(self) -> int:
        return int(self.composite.shape[1])

    @property
    def layer_prompts(self) -> list[str]:
        return [layer.prompt for layer in self.layers]

    def metadata(self) -> dict[str, Any]:
        """The `KEY.json` document."""
        return {
            "schema": SCHEMA,
            "key": self.key,
            "global_prompt": self.global_prompt,
            "width": self.width,
            "height": self.height,
            "layers": [layer.to_json() for layer in self.layers],
            "source": dict(self.source),
            "pipeline": dict(self.pipeline),
        }

    def replace(self, **changes: Any) -> "MLCIDSample":
        return dataclasses.replace(self, **changes)
