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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from mlcid.composite import composite as compose_eq4
from mlcid.imageio import decode_gray, decode_rgb, decode_rgba, encode_png
from mlcid.schema import BACKGROUND_PROMPT, MLCIDSample

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
# In-memory forms
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LayeredImage:
    """L layers of one generated (or dataset) image, uint8, all (H, W).

    images     [(H, W, 3)] per layer, index 0 = background; full frames (also outside their masks)
    masks      [(H, W)]    per layer, 0/255, one-hot across layers (mask 0 = complement of the foregrounds)
    composite  (H, W, 3)   Eq. 4 of the above
    """

    images: list[np.ndarray]
    masks: list[np.ndarray]
    composite: np.ndarray

    @property
    def num_layers(self) -> int:
        return len(self.images)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.composite.shape[1]), int(self.composite.shape[0])

    def rgba(self) -> list[np.ndarray]:
        """RGBA layers (H, W, 4) in paint order: opaque background, then each foreground with alpha = its mask."""
        h, w = self.images[0].shape[:2]
        out = [np.dstack([self.images[0], np.full((h, w), 255, np.uint8)])]
        out += [np.dstack([img, mask]) for img, mask in zip(self.images[1:], self.masks[1:])]
        return out

    @classmethod
    def from_arrays(cls, images: Sequence[Any], masks: Sequence[Any]) -> "LayeredImage":
        """Build from per-layer images and masks (numpy / torch / PIL; uint8 or float in [0, 1]); checks them.

        `masks` has one entry per layer (one-hot, background first) or one per foreground (the background
        mask is then the complement of their union). The composite is always recomputed by Eq. 4.
        """
        imgs = [_to_rgb_uint8(x, f"layer {i} image") for i, x in enumerate(images)]
        if len(imgs) < 2:
            raise ValueError(f"need a background and at least one foreground layer, got {len(imgs)} layer(s)")
        shape = imgs[0].shape[:2]
        bad = [i for i, x in enumerate(imgs) if x.shape[:2] != shape]
        if bad:
            raise ValueError(f"layer {bad[0]} image is {imgs[bad[0]].shape[:2]}, layer 0 is {shape}: sizes differ")
        ms = [_to_binary_mask(m, f"mask {i}") for i, m in enumerate(masks)]
        if len(ms) not in (len(imgs), len(imgs) - 1):
            raise ValueError(f"{len(imgs)} layers need {len(imgs)} masks (background first) or {len(imgs) - 1} "
                             f"foreground masks, got {len(ms)}")
        bad = [i for i, m in enumerate(ms) if m.shape != shape]
        if bad:
            raise ValueError(f"mask {bad[0]} is {ms[bad[0]].shape}, layers are {shape}: sizes differ")
        fg_masks = ms[1:] if len(ms) == len(imgs) else ms
        union = np.zeros(shape, dtype=bool)
        for i, m in enumerate(fg_masks, start=1):
            if (union & (m > 0)).any():
                raise ValueError(f"foreground mask {i} overlaps an earlier foreground mask: output masks must be "
                                 "one-hot across layers")
            union |= m > 0
        background = np.where(union, 0, 255).astype(np.uint8)
        if len(ms) == len(imgs) and not np.array_equal(ms[0], background):
            raise ValueError("mask 0 (background) is not the complement of the foreground masks: masks must be "
                             "one-hot across layers")
        composite = compose_eq4(imgs[0], imgs[1:], fg_masks)  # (H, W, 3)
        return cls(images=imgs, masks=[background, *fg_masks], composite=composite)

    @classmethod
    def from_sample(cls, sample: MLCIDSample) -> "LayeredImage":
        """An MLCID sample's layers (background B, foregrounds F_i with their undilated masks m_i)."""
        return cls.from_arrays([sample.background] + [fg[..., :3] for fg in sample.foregrounds], sample.masks)


def as_layered(result: Any, index: int | None = None) -> LayeredImage:
    """A `LayeredImage` from a pipeline result, a mapping of arrays, or a `LayeredImage`.

    Accepted: objects or mappings with per-layer `images` (alias `layer_images`) and `masks` (alias
    `layer_masks`). Batched results (a leading batch axis, or a list per batch item) need `index`.
    """
    if isinstance(result, LayeredImage):
        return result
    images, masks = _field(result, ("layer_images", "images")), _field(result, ("layer_masks", "masks"))
    if images is None or masks is None:
        raise TypeError(f"cannot export {type(result).__name__}: need per-layer `images` and `masks` "
                        "(a LayerDiff pipeline output, a mapping, or a LayeredImage)")
    images, masks = _unbatch(images, index, "images"), _unbatch(masks, index, "masks")
    return LayeredImage.from_arrays(images, masks)


def _field(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _is_batched(value: Any, name: str) -> bool:
    """Per-layer images are (L, H, W, C) or a list of (H, W, C); masks (L, [1,] H, W) or a list of (H, W).
    Batched results add one level in front (an axis, or a list per batch item)."""
    def single_mask(ndim: int, shape: tuple[int, ...]) -> bool:  # (H, W), (1, H, W) or (H, W, 1)
        return ndim == 2 or (ndim == 3 and 1 in (shape[0], shape[-1]))

    if isinstance(value, (list, tuple)):
        if not value:
            return False
        first = value[0]
        if isinstance(first, (list, tuple)):
            return True
        ndim = getattr(first, "ndim", None)
        if ndim is None:  # e.g. PIL images: one per layer
            return False
        return ndim == 4 if name == "images" else not single_mask(ndim, tuple(first.shape))
    ndim = getattr(value, "ndim", None)
    if ndim is None:
        raise TypeError(f"{name} must be a list or an array, got {type(value).__name__}")
    if name == "images":
        return ndim == 5  # (B, L, H, W, 3) or (B, L, 3, H, W)
    return ndim == 5 or (ndim == 4 and not single_mask(3, tuple(value.shape[1:])))  # (B, L, [1,] H, W)


def _unbatch(value: Any, index: int | None, name: str) -> Any:
    if not _is_batched(value, name):
        if index not in (None, 0):
            raise ValueError(f"result is not batched; batch index {index} does not exist")
        return value
    if index is None:
        if len(value) != 1:
            raise ValueError(f"result holds a batch of {len(value)} images: pass the batch index to export")
        index = 0
    if not 0 <= index < len(value):
        raise IndexError(f"batch index {index} outside 0..{len(value) - 1}")
    return value[index]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Image.Image):
        return np.asarray(x)
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        x = x.float().numpy() if x.dtype.is_floating_point else x.numpy()
    return np.asarray(x)


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{what} has NaN or infinite values")
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)  # floats are in [0, 1]
    raise ValueError(f"{what} has dtype {arr.dtype}; want uint8, bool or float in [0, 1]")


def _to_rgb_uint8(x: Any, what: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"{what} must be (H, W, 3) RGB, got shape {arr.shape}")
    return np.ascontiguousarray(_to_uint8(arr, what)[..., :3])


def _to_binary_mask(x: Any, what: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[:2] if arr.shape[-1] == 1 else arr.shape[1:])  # (H, W, 1) / (1, H, W) -> (H, W)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be (H, W), got shape {arr.shape}")
    arr = _to_uint8(arr, what)
    return np.where(arr > 127, 255, 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OutputMeta:
    """What produced an output: prompts (layer 0 = background) and sampling settings. Stored in `layers.json`."""

    global_prompt: str
    layer_prompts: list[str]
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    smg_scale: float | None = None
    guidance: str | None = None  # "cfg", "cfg+smg", "cfg+sag"
    model: str | None = None  # run folder or hub id
    extra: dict[str, Any] = field(default_factory=dict)  # anything else (application name, source folder, …)

    def __post_init__(self) -> None:
        if not isinstance(self.global_prompt, str):
            raise TypeError(f"global_prompt must be a str, got {type(self.global_prompt).__name__}")
        if isinstance(self.layer_prompts, str) or not all(isinstance(p, str) for p in self.layer_prompts):
            raise TypeError("layer_prompts must be a list of strings (background first)")
        self.layer_prompts = list(self.layer_prompts)

    @classmethod
    def coerce(cls, meta: "OutputMeta | Mapping[str, Any]") -> "OutputMeta":
        """Accept an `OutputMeta` or a mapping with its field names (unknown keys go to `extra`)."""
        if isinstance(meta, OutputMeta):
            return meta
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be an OutputMeta or a mapping, got {type(meta).__name__}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = {"global_prompt", "layer_prompts"} - set(meta)
        if missing:
            raise ValueError(f"meta is missing {sorted(missing)}")
        extra = dict(meta.get("extra") or {}) | {k: v for k, v in meta.items() if k not in known | {"extra"}}
        return cls(**{k: v for k, v in meta.items() if k in known}, extra=extra)


def _meta_document(meta: OutputMeta, image: LayeredImage) -> dict[str, Any]:
    width, height = image.size
    layers = []
    for i, prompt in enumerate(meta.layer_prompts):
        entry = {"index": i, "prompt": prompt, "name": layer_name(i, prompt), "image": layer_file(i),
                 "mask": mask_file(i), "area_frac": round(float((image.masks[i] > 0).mean()), 6)}
        layers.append(entry)
    doc = {"format": FORMAT, **{k: v for k, v in asdict(meta).items() if k != "layer_prompts"}}
    doc.update(width=width, height=height, num_layers=image.num_layers, paint_order=list(range(image.num_layers)),
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


def save_output(folder: str | os.PathLike, result: Any, meta: OutputMeta | Mapping[str, Any], *,
                index: int | None = None, overwrite: bool = False, psd: bool = True, ora: bool = True) -> Path:
    """Write one layered image to `folder` (see the module docstring for the files); returns the folder.

    `result`: a LayerDiff pipeline output (batch item `index`), a mapping of `images`/`masks`, or a
    `LayeredImage`. `meta`: an `OutputMeta` or a mapping of its fields; it must name one prompt per layer.
    Everything is written in a temp folder beside `folder` and renamed into place; an existing `folder` is
    an error unless `overwrite=True`.
    """
    # 1. Check inputs before touching the disk.
    image = as_layered(result, index)
    meta = OutputMeta.coerce(meta)
    if len(meta.layer_prompts) != image.num_layers:
        raise ValueError(f"{image.num_layers} layers but {len(meta.layer_prompts)} layer prompts")
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    names = [layer_name(i, p) for i, p in enumerate(meta.layer_prompts)]
    rgba = image.rgba()

    # 2. Write everything into a temp folder beside the target.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for i, (layer, mask) in enumerate(zip(rgba, image.masks)):
            (tmp / layer_file(i)).write_bytes(encode_png(layer))
            (tmp / mask_file(i)).write_bytes(encode_png(mask))
        (tmp / COMPOSITE_FILE).write_bytes(encode_png(image.composite))
        if psd:
            write_psd(tmp / PSD_FILE, rgba, names)
        if ora:
            write_ora(tmp / ORA_FILE, rgba, names, image.composite)
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
    """An output folder read back: its layers and metadata (`document` is the raw `layers.json`)."""

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
    image = LayeredImage.from_arrays(images, masks)
    stored = decode_rgb((folder / COMPOSITE_FILE).read_bytes())
    if not np.array_equal(stored, image.composite):
        raise ValueError(f"{folder / COMPOSITE_FILE} differs from the composite of its layers (Eq. 4)")
    if (doc.get("width"), doc.get("height")) != image.size:
        raise ValueError(f"{meta_path}: size {doc.get('width')}x{doc.get('height')} but layers are "
                         f"{image.size[0]}x{image.size[1]}")
    meta = OutputMeta(global_prompt=doc["global_prompt"], layer_prompts=[e["prompt"] for e in layers],
                      **{k: doc.get(k) for k in ("seed", "num_inference_steps", "guidance_scale", "smg_scale",
                                                 "guidance", "model")},
                      extra=dict(doc.get("extra") or {}))
    return LoadedOutput(folder=folder, image=image, meta=meta, document=doc)


def default_layer_prompts(foreground_prompts: Sequence[str]) -> list[str]:
    """Layer prompts with the background first: ["the background", *foreground_prompts]."""
    return [BACKGROUND_PROMPT, *foreground_prompts]
