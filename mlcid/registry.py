"""One table of the models this project loads: the real default (hub id or file) and the tiny preset folder.

Pure data, no model code: `model/` and `pipelines/` look names up here and load what `resolve` returns with
the libraries' own loaders (`from_pretrained`, segment-anything checkpoints, open_clip). The tiny presets are
built by `make tiny-models` (random weights, tiny configs, saved in each library's own format).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PRESETS = ("real", "tiny")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: `real` is what users load by default; `tiny` names its offline test preset."""

    name: str
    library: str  # diffusers | transformers | segment_anything | open_clip | torch_fidelity
    real: str  # hub id, or a local checkpoint file name users point to (env var `env` overrides)
    tiny: str  # folder under the tiny-model root
    env: str | None = None  # environment variable that overrides the real location
    note: str = ""


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("sd15", "diffusers", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"),
        ModelSpec("sd15-inpaint", "diffusers", "stable-diffusion-v1-5/stable-diffusion-inpainting", "sd15-inpaint"),
        ModelSpec("instructblip", "transformers", "Salesforce/instructblip-flan-t5-xl", "instructblip"),
        ModelSpec("instructblip-vicuna", "transformers", "Salesforce/instructblip-vicuna-7b", "instructblip"),
        ModelSpec("owlv2", "transformers", "google/owlv2-base-patch16-ensemble", "owlv2"),
        ModelSpec("grounding-dino", "transformers", "IDEA-Research/grounding-dino-base", "grounding-dino"),
        ModelSpec(
            "depth-saliency", "transformers", "depth-anything/Depth-Anything-V2-Small-hf", "depth-saliency",
            note="monocular depth; its near region stands in for ICON's salient foreground (ICON is not public)",
        ),
        ModelSpec(
            "sam-vit-h", "segment_anything", "sam_vit_h_4b8939.pth", "sam", env="LAYERDIFF_SAM_CHECKPOINT",
            note="segment-anything ViT-H checkpoint file (download it once; set LAYERDIFF_SAM_CHECKPOINT)",
        ),
        ModelSpec(
            "clip-rn50", "open_clip", "RN50", "clip", env="LAYERDIFF_CLIP_RN50",
            note="open_clip RN50 with OpenAI weights from a local file (LAYERDIFF_CLIP_RN50=path/to/RN50.pt)",
        ),
        ModelSpec(
            "fid-inception", "torch_fidelity", "inception-v3-compat", "fid-extractor", env="LAYERDIFF_FID_WEIGHTS",
            note="torch-fidelity Inception weights file (LAYERDIFF_FID_WEIGHTS=path/to/weights-inception-2015-12-05.pth)",
        ),
    ]
}


def tiny_root() -> Path:
    """Folder holding the tiny presets: $LAYERDIFF_TINY_MODELS, else ./.work/tiny-models."""
    return Path(os.environ.get("LAYERDIFF_TINY_MODELS", Path.cwd() / ".work" / "tiny-models"))


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def resolve(name: str, preset: str = "real", override: str | os.PathLike | None = None) -> str:
    """Where to load model `name` from: `override` if given, else the tiny folder or the real id/file."""
    if override:
        return str(override)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    spec = get_spec(name)
    if preset == "tiny":
        path = tiny_root() / spec.tiny
        if not path.exists():
            raise FileNotFoundError(f"tiny preset {path} is missing: run `make tiny-models` first")
        return str(path)
    if spec.env and os.environ.get(spec.env):
        return os.environ[spec.env]
    return spec.real
