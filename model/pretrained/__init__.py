"""Models shipped inside the package: `SHAPES64`, a small LayerDiff trained by learn-bench on synthetic shapes.

    from model.pretrained import SHAPES64
    pipe = LayerDiffPipeline.from_pretrained(SHAPES64)

Its folder is written by `layerdiff ship-model --bench .work/learn-bench --out model/pretrained/shapes64`; the
model card (README.md there) says how it was trained, what it can draw, and the sha256 of every file.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES64 = HERE / "shapes64"
