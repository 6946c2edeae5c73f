"""A run folder that fits diffusers and the Hugging Face Hub: model card, custom-pipeline entry, upload file set.

`write_run_files(folder, info)` (called by `LayerDiffPipeline.save_pretrained` and the trainer's final save) adds:
  - `README.md`: a model card with YAML front matter (library_name, pipeline_tag, base_model, tags, training
    data, steps, resolution, metrics when known) and the one true way to load the folder;
  - `pipeline.py`: diffusers' documented custom-pipeline entry. `model_index.json` names the class as
    `["pipeline", "LayerDiffPipeline"]`, so a plain `DiffusionPipeline.from_pretrained(run)` stops with diffusers'
    "contains custom code in pipeline.py … pass trust_remote_code=True" error instead of a missing attribute; with
    `trust_remote_code=True` it runs this two-line file, which only imports the installed package (no code from
    the network). `LayerDiffPipeline.from_pretrained(run)` never executes it.
  - `training_resolution` in `model_index.json` (the pipeline's default sampling size).
`HUB_ALLOW_PATTERNS` is the file set to upload (`huggingface_hub.upload_folder(folder_path=run, repo_id=…,
allow_patterns=HUB_ALLOW_PATTERNS)`): the pipeline parts, card and entry; never checkpoints, optimizer pickles or logs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RUN_CLASS_NAME = ["pipeline", "LayerDiffPipeline"]  # model_index.json "_class_name", diffusers' custom form
ENTRY_FILE = "pipeline.py"
CARD_FILE = "README.md"
INDEX_FILE = "model_index.json"
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HUB_ALLOW_PATTERNS = [CARD_FILE, INDEX_FILE, ENTRY_FILE, *(f"{p}/*" for p in PIPELINE_PARTS)]
TAGS = ["layerdiff", "layered-image-generation", "text-to-image", "image-layers", "diffusers"]

ENTRY_SOURCE = '''"""LayerDiff pipeline folder (layered text-to-image). Load it with the installed `layerdiff` package:

    from model.sampling.pipeline import LayerDiffPipeline
    pipe = LayerDiffPipeline.from_pretrained("path/to/this/folder")

diffusers' custom-pipeline route, DiffusionPipeline.from_pretrained(folder, trust_remote_code=True), runs this
file: it only imports that installed package (no code is downloaded).
"""

from model.sampling.pipeline import LayerDiffPipeline  # noqa: F401
'''


@dataclass
class ModelCardInfo:
    """What the model card says about a run (fields left None are omitted)."""

    base_model: str | None = None  # SD hub id or folder the run started from
    training_data: list[str] = field(default_factory=list)  # shard specs / URLs
    steps: int | None = None
    resolution: int | None = None  # training crop size, px
    max_layers: int | None = None
    batch_size: int | None = None  # global batch × accumulation
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. final training loss, FID when evaluated
    extra_tags: list[str] = field(default_factory=list)


def _is_hub_id(name: str | None) -> bool:
    """'org/name' that is not an existing local path (the Hub validates base_model against its repos)."""
    return bool(name) and name.count("/") == 1 and "://" not in name and not os.path.exists(name)


def card_metadata(info: ModelCardInfo) -> dict[str, Any]:
    """The YAML front matter."""
    meta: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": "text-to-image",
                            "tags": TAGS + [t for t in info.extra_tags if t not in TAGS]}
    if _is_hub_id(info.base_model):
        meta["base_model"] = info.base_model
    optional = {"training_data": info.training_data or None, "training_steps": info.steps,
                "training_resolution": info.resolution, "max_layers": info.max_layers,
                "batch_size": info.batch_size, "metrics": dict(info.metrics) or None}
    meta.update({k: v for k, v in optional.items() if v is not None})
    return meta


def model_card(info: ModelCardInfo) -> str:
    """README.md text: front matter, what the model is, how to load and sample it, how it was trained."""
    front = yaml.safe_dump(card_metadata(info), sort_keys=False, allow_unicode=True)
    size = f", {info.resolution}×{info.resolution} px" if info.resolution else ""
    trained = [f"- base model: `{info.base_model}`" if info.base_model else "- base model: unknown"]
    trained += [f"- training data: `{d}`" for d in info.training_data]
    trained += [f"- {k}: {v}" for k, v in (("optimiser steps", info.steps), ("layers per image", info.max_layers),
                                           ("batch (global × accumulation)", info.batch_size)) if v is not None]
    trained += [f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in info.metrics.items()]
    body = f"""# LayerDiff

Text-guided multi-layer composable image synthesis (LayerDiff): a background and foreground layers, each an RGB
image with a mask and its own prompt{size}.

```python
from model.sampling.pipeline import LayerDiffPipeline  # pip install the layerdiff package (this repository)
pipe = LayerDiffPipeline.from_pretrained("path/to/this/folder")
out = pipe("a dog on the grass", ["the background", "a dog"])
out.save("out/dog")  # layerNN.png (RGBA), maskNN.png, composite.png, layers.json, layers.psd, layers.ora
```

Plain `DiffusionPipeline.from_pretrained` stops with diffusers' custom-code error: `pipeline.py` here only
imports the installed package. `UNet2DConditionModel.from_pretrained(folder, subfolder="unet")` finds no weights
(they are `unet/diffusion_pytorch_model.layerdiff.safetensors`, a LayerDiffUNet, not an SD UNet).

## Training

""" + "\n".join(trained) + "\n"
    return f"---\n{front}---\n\n{body}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_run_files(folder: str | os.PathLike, info: ModelCardInfo | None = None) -> list[str]:
    """Add the card, the entry file and the hub `_class_name` to a saved pipeline folder; `model_index.json` last.

    Returns the names written, in order (a caller that uploads a remote run publishes them in that order)."""
    folder = Path(folder)
    info = info or ModelCardInfo()
    index_path = folder / INDEX_FILE
    index = json.loads(index_path.read_text())
    if info.resolution is None and index.get("training_resolution"):
        info.resolution = int(index["training_resolution"])
    _write_atomic(folder / ENTRY_FILE, ENTRY_SOURCE)
    _write_atomic(folder / CARD_FILE, model_card(info))
    index["_class_name"] = RUN_CLASS_NAME
    if info.resolution is not None:
        index["training_resolution"] = int(info.resolution)
    _write_atomic(index_path, json.dumps(index, indent=2, sort_keys=True))
    return [ENTRY_FILE, CARD_FILE, INDEX_FILE]


def card_info_from_training(config: Any, data: str, step: int, run_dir: str | os.PathLike) -> ModelCardInfo:
    """The card facts of a finished run: its `TrainConfig`, data spec, last step and `metrics.jsonl` (losses)."""
    from mlcid.registry import resolve

    base = config.pretrained or (resolve("sd15", config.preset) if config.preset == "real" else f"sd15 ({config.preset})")
    metrics: dict[str, float] = {}
    log_file = Path(run_dir) / "metrics.jsonl"
    if log_file.is_file():
        lines = [json.loads(ln) for ln in log_file.read_text().splitlines() if ln.strip()]
        losses = [float(r["loss"]) for r in lines if isinstance(r.get("loss"), (int, float))]
        if losses:
            metrics["final_train_loss"] = losses[-1]
            metrics[f"mean_train_loss_last_{min(100, len(losses))}"] = sum(losses[-100:]) / len(losses[-100:])
    return ModelCardInfo(base_model=str(base), training_data=str(data).split(), steps=int(step),
                         resolution=int(config.data.resolution), max_layers=int(config.data.max_layers),
                         batch_size=int(config.batch_size * config.grad_accum), metrics=metrics)


def hub_files(folder: str | os.PathLike) -> list[str]:
    """The files `upload_folder(..., allow_patterns=HUB_ALLOW_PATTERNS)` would push (huggingface_hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(folder)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(names, allow_patterns=HUB_ALLOW_PATTERNS))
