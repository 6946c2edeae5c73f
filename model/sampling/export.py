"""Layered output folders: PNG layers + masks + composite + `layers.json`, a layered PSD and an OpenRaster file.

A folder written by `save_output` holds, for L layers in paint order (index 0 = background, then back→front):

    layers.json      global prompt, per-layer prompts/names/files, paint order, seed, scales, guidance, model, size
    layerNN.png      RGBA: RGB = the generated layer image (kept under alpha 0 too), alpha = its binary mask;
                     layer00 (the background) is fully opaque
    maskNN.png       8-bit L, 0/255: the one-hot output masks (mask00 = background = complement of the others)
    composite.png    Eq. 4 with the binary masks: I = m_b·B + Σ m_i·F_i
    layers.psd       layered Photoshop file, one named pixel layer per layer ("00 the background", "01 a red ball")
    layers.ora       OpenRaster (GIMP, Krita, MyPaint): same layers, `mergedimage.png` = the composite

Painting the RGBA layers bottom-up with straight alpha gives exactly `composite.png`. The folder appears by
rename (written under a temp name beside it first), so a reader never sees half an output.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from mlcid.imageio import decode_gray, decode_rgb, decode_rgba, encode_png
from mlcid.layered import LayeredImage
from mlcid.schema import BACKGROUND_PROMPT

log = logging.getLogger(__name__)

FORMAT = "layerdiff-output/1"
META_FILE = "layers.json"
COMPOSITE_FILE = "composite.png"
PSD_FILE = "layers.psd"
ORA_FILE = "layers.ora"
ORA_MIMETYPE = "image/openraster"
THUMBNAIL_MAX = 256  # OpenRaster: thumbnail at most 256 px on its long side
MAX_LAYER_NAME = 120  # characters of the prompt kept in PSD / ORA layer names (the full prompt is in layers.json)


def layer_file(index: int) -> str:
    return f"layer{index:02d}.png"


def mask_file(index: int) -> str:
    return f"mask{index:02d}.png"


def layer_name(index: int, prompt: str) -> str:
    """Name of layer `index` in the PSD / ORA files: "00 the background", "01 a red ball" (one line, capped)."""
    text = " ".join(str(prompt).split())
    if len(text) > MAX_LAYER_NAME:
        text = text[: MAX_LAYER_NAME - 1] + "…"
    return f"{index:02d} {text}".rstrip()


# ----------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OutputMeta:
    """How an output was made (the prompts travel with the `LayeredImage`). Stored in `layers.json`."""

    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    smg_scale: float | None = None
    guidance: str | None = None  # "cfg", "cfg+smg", "cfg+sag"
    model: str | None = None  # run folder or hub id
    extra: dict[str, Any] = field(default_factory=dict)  # anything else (application name, source folder, …)


def _meta_document(meta: OutputMeta, image: LayeredImage) -> dict[str, Any]:
    layers = []
    for i, prompt in enumerate(image.layer_prompts):
        entry = {"index": i, "prompt": prompt, "name": layer_name(i, prompt), "image": layer_file(i),
                 "mask": mask_file(i), "area_frac": round(float((image.masks[i] > 0).mean()), 6)}
        layers.append(entry)
    doc = {"format": FORMAT, "global_prompt": image.global_prompt, **asdict(meta)}
    doc.update(width=image.width, height=image.height, num_layers=image.num_layers, paint_order=list(range(image.num_layers)),
               layers=layers, files={"composite": COMPOSITE_FILE, "psd": PSD_FILE, "ora": ORA_FILE})
    return doc


# ----------------------------------------------------------------------------------------------------------
# PSD and OpenRaster
# ----------------------------------------------------------------------------------------------------------


def write_psd(path: str | os.PathLike, rgba: list[np.ndarray], names: list[str]) -> None:
    """A layered PSD (psd-tools): one full-canvas pixel layer per RGBA array, bottom first, alpha as layer
    transparency; the stored flattened preview is regenerated from the layers on save."""
    from psd_tools import PSDImage

    h, w = rgba[0].shape[:2]
    psd = PSDImage.new("RGBA", (w, h))
    for arr, name in zip(rgba, names):
        layer = psd.create_pixel_layer(Image.fromarray(arr, "RGBA"), name="layer")  # appended on top
        layer.name = name  # Unicode name block ('luni'); the legacy MacRoman name falls back to "?" if needed
    psd.save(str(path))


def write_ora(path: str | os.PathLike, rgba: list[np.ndarray], names: list[str], merged: np.ndarray) -> None:
    """An OpenRaster file: `mimetype` first and stored, `stack.xml` (top layer first, as the spec orders it),
    `data/layerNN.png`, `mergedimage.png` and `Thumbnails/thumbnail.png`."""
    h, w = rgba[0].shape[:2]
    root = ElementTree.Element("image", version="0.0.5", w=str(w), h=str(h))
    stack = ElementTree.SubElement(root, "stack")
    for i in reversed(range(len(rgba))):  # ORA lists the topmost layer first
        ElementTree.SubElement(stack, "layer", name=names[i], src=f"data/{layer_file(i)}", x="0", y="0",
                               opacity="1.0", visibility="visible", **{"composite-op": "svg:src-over"})
    stack_xml = ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
    thumb = Image.fromarray(merged)
    thumb.thumbnail((THUMBNAIL_MAX, THUMBNAIL_MAX))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo("mimetype"), ORA_MIMETYPE, compress_type=zipfile.ZIP_STORED)
        archive.writestr("stack.xml", stack_xml, compress_type=zipfile.ZIP_DEFLATED)
        for i, arr in enumerate(rgba):
            archive.writestr(f"data/{layer_file(i)}", encode_png(arr), compress_type=zipfile.ZIP_STORED)
        archive.writestr("mergedimage.png", encode_png(merged), compress_type=zipfile.ZIP_STORED)
        buf = io.BytesIO()
        thumb.save(buf, format="PNG")
        archive.writestr("Thumbnails/thumbnail.png", buf.getvalue(), compress_type=zipfile.ZIP_STORED)


def read_ora(path: str | os.PathLike) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """Layers of an OpenRaster file as [(name, RGBA (H, W, 4))] bottom first, and its merged image (H, W, 3).

    Only full-canvas layers at (0, 0) (what `write_ora` writes) are supported; others raise ValueError.
    """
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not names or names[0] != "mimetype" or archive.read("mimetype").decode() != ORA_MIMETYPE:
            raise ValueError(f"{path} is not an OpenRaster file: `mimetype` must come first and say {ORA_MIMETYPE}")
        root = ElementTree.fromstring(archive.read("stack.xml"))
        layers = []
        for node in root.iter("layer"):
            if (node.get("x", "0"), node.get("y", "0")) != ("0", "0"):
                raise ValueError(f"{path}: layer {node.get('name')!r} is offset; only full-canvas layers are read")
            layers.append((node.get("name", ""), decode_rgba(archive.read(node.get("src")))))
        merged = decode_rgb(archive.read("mergedimage.png"))
    return layers[::-1], merged


# ----------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------


def save_output(folder: str | os.PathLike, image: LayeredImage, meta: OutputMeta | None = None, *,
                overwrite: bool = False, psd: bool = True, ora: bool = True) -> Path:
    """Write one layered image to `folder` (see the module docstring for the files); returns the folder.

    `image` must carry one prompt per layer; `meta` says how it was made. Everything is written in a temp
    folder beside `folder` and renamed into place; an existing `folder` is an error unless `overwrite=True`.
    """
    # 1. Check inputs before touching the disk.
    if not isinstance(image, LayeredImage):
        raise TypeError(f"save_output takes a LayeredImage, got {type(image).__name__} "
                        "(a pipeline output gives one per batch item: `output.layered(i)`)")
    meta = meta or OutputMeta()
    if len(image.layer_prompts) != image.num_layers:
        raise ValueError(f"{image.num_layers} layers but {len(image.layer_prompts)} layer prompts")
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    names = [layer_name(i, p) for i, p in enumerate(image.layer_prompts)]
    rgba, composite = image.rgba(), image.composite

    # 2. Write everything into a temp folder beside the target.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for i, (layer, mask) in enumerate(zip(rgba, image.masks)):
            (tmp / layer_file(i)).write_bytes(encode_png(layer))
            (tmp / mask_file(i)).write_bytes(encode_png(mask))
        (tmp / COMPOSITE_FILE).write_bytes(encode_png(composite))
        if psd:
            write_psd(tmp / PSD_FILE, rgba, names)
        if ora:
            write_ora(tmp / ORA_FILE, rgba, names, composite)
        doc = _meta_document(meta, image)
        doc["files"] = {k: v for k, v in doc["files"].items() if (tmp / v).exists()}
        (tmp / META_FILE).write_text(json.dumps(doc, ensure_ascii=False, indent=2), encoding="utf-8")

        # 3. Swap into place: old folder aside, new one in, old one removed.
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / "x")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("wrote %d-layer output to %s", image.num_layers, folder)
    return folder


@dataclass
class LoadedOutput:
    """An output folder read back: its layers with their prompts, how they were made, and the raw `layers.json`."""

    folder: Path
    image: LayeredImage
    meta: OutputMeta
    document: dict[str, Any]


def load_output(folder: str | os.PathLike) -> LoadedOutput:
    """Read a folder written by `save_output` (layers.json, layerNN.png, maskNN.png; composite recomputed
    by Eq. 4 and checked against composite.png)."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a LayerDiff output folder: {META_FILE} is missing")
    doc = json.loads(meta_path.read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {doc.get('format')!r}, want {FORMAT!r}")
    layers = sorted(doc["layers"], key=lambda e: e["index"])
    if [e["index"] for e in layers] != list(range(len(layers))) or doc.get("paint_order") != list(range(len(layers))):
        raise ValueError(f"{meta_path}: layer indices / paint order are not 0..{len(layers) - 1}")
    images, masks = [], []
    for entry in layers:
        for key, expected in (("image", layer_file(entry["index"])), ("mask", mask_file(entry["index"]))):
            if entry[key] != expected:  # names are fixed: never follow a path from the JSON
                raise ValueError(f"{meta_path}: layer {entry['index']} {key} is {entry[key]!r}, want {expected!r}")
        images.append(decode_rgba((folder / entry["image"]).read_bytes())[..., :3])
        masks.append(decode_gray((folder / entry["mask"]).read_bytes()))
    image = LayeredImage.from_arrays(images, masks, doc["global_prompt"], [e["prompt"] for e in layers],
                                     {"source": str(folder)})
    stored = decode_rgb((folder / COMPOSITE_FILE).read_bytes())
    if not np.array_equal(stored, image.composite):
        raise ValueError(f"{folder / COMPOSITE_FILE} differs from the composite of its layers (Eq. 4)")
    if (doc.get("width"), doc.get("height")) != (image.width, image.height):
        raise ValueError(f"{meta_path}: size {doc.get('width')}x{doc.get('height')} but layers are "
                         f"{image.width}x{image.height}")
    meta = OutputMeta(**{k: doc.get(k) for k in ("seed", "num_inference_steps", "guidance_scale", "smg_scale",
                                                 "guidance", "model")},
                      extra=dict(doc.get("extra") or {}))
    return LoadedOutput(folder=folder, image=image, meta=meta, document=doc)


def load_layers(folder: str | os.PathLike) -> LayeredImage:
    """The `LayeredImage` of an output folder (prompts included), e.g. as the source of an edit."""
    return load_output(folder).image


def default_layer_prompts(foreground_prompts: Sequence[str]) -> list[str]:
    """Layer prompts with the background first: ["the background", *foreground_prompts]."""
    return [BACKGROUND_PROMPT, *foreground_prompts]
