"""Layered output folders: PNG/JSON round trip, PSD and OpenRaster files reopened by their own readers."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from mlcid.composite import alpha_over
from mlcid.composite import composite as eq4
from mlcid.layered import LayeredImage
from model.sampling.export import ORA_MIMETYPE, OutputMeta, layer_name, load_output, read_ora, save_output
from model.sampling.pipeline import LayerDiffPipelineOutput

H, W = 40, 48
PROMPTS = ["the background", "a red ball <script>alert(1)</script>", "ein grüner Würfel 🟩 — 緑の立方体"]


def _layers(seed: int = 0, num_layers: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random layer images and one-hot masks (arg-max of random scores, like the pipeline's output masks)."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(num_layers)]
    scores = rng.random((num_layers, H, W))
    scores[0] += 0.3  # background wins more often
    winner = scores.argmax(0)  # (H, W)
    masks = [np.where(winner == i, 255, 0).astype(np.uint8) for i in range(num_layers)]
    return images, masks


GLOBAL = "a red ball & a green cube <b>on</b> grass — ünïcödé"


def _image(images, masks, layer_prompts=PROMPTS) -> LayeredImage:
    return LayeredImage.from_arrays(images, masks, GLOBAL, layer_prompts)


def _meta(**overrides) -> OutputMeta:
    meta = dict(seed=7, num_inference_steps=2, guidance_scale=3.0, smg_scale=3.0, guidance="cfg+smg",
                model="runs/tiny", extra={"application": "sample"})
    return OutputMeta(**(meta | overrides))


def test_folder_round_trip(tmp_path):
    images, masks = _layers()
    out = save_output(tmp_path / "out", _image(images, masks), _meta())
    names = sorted(p.name for p in out.iterdir())
    assert names == ["composite.png", "layer00.png", "layer01.png", "layer02.png", "layers.json", "layers.ora",
                     "layers.psd", "mask00.png", "mask01.png", "mask02.png"]

    loaded = load_output(out)
    for i in range(3):
        np.testing.assert_array_equal(loaded.image.images[i], images[i])
        np.testing.assert_array_equal(loaded.image.masks[i], masks[i])
    expected = eq4(images[0], images[1:], masks[1:])
    np.testing.assert_array_equal(loaded.image.composite, expected)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "composite.png").convert("RGB")), expected)
    # background layer opaque; foreground alpha = mask; RGB kept under alpha 0
    bg = np.asarray(Image.open(out / "layer00.png"))
    assert bg.shape == (H, W, 4) and (bg[..., 3] == 255).all()
    fg = np.asarray(Image.open(out / "layer02.png"))
    np.testing.assert_array_equal(fg[..., 3], masks[2])
    np.testing.assert_array_equal(fg[..., :3], images[2])
    # the RGBA stack painted bottom-up is the composite
    stack = [np.asarray(Image.open(out / f"layer{i:02d}.png")) for i in range(3)]
    np.testing.assert_array_equal(alpha_over(stack), expected)

    assert loaded.meta == _meta()
    assert loaded.image.global_prompt == GLOBAL and loaded.image.layer_prompts == PROMPTS
    doc = json.loads((out / "layers.json").read_text(encoding="utf-8"))
    assert doc["paint_order"] == [0, 1, 2] and (doc["width"], doc["height"]) == (W, H)
    assert [layer["prompt"] for layer in doc["layers"]] == PROMPTS
    assert doc["layers"][1]["name"] == "01 a red ball <script>alert(1)</script>"
    assert doc["layers"][2]["area_frac"] == pytest.approx((masks[2] > 0).mean(), abs=1e-6)


def test_psd_layers_names_pixels_and_composite(tmp_path):
    from psd_tools import PSDImage

    images, masks = _layers(1)
    out = save_output(tmp_path / "out", _image(images, masks), _meta())
    psd = PSDImage.open(out / "layers.psd")
    layers = list(psd)  # bottom first
    assert [layer.name for layer in layers] == [layer_name(i, p) for i, p in enumerate(PROMPTS)]
    assert layers[0].name == "00 the background"
    assert layers[2].name == "02 ein grüner Würfel 🟩 — 緑の立方体"
    for i, layer in enumerate(layers):
        assert layer.bbox == (0, 0, W, H) and layer.kind == "pixel"
        rgba = np.asarray(layer.topil())
        np.testing.assert_array_equal(rgba[..., :3], images[i])
        np.testing.assert_array_equal(rgba[..., 3], 255 if i == 0 else masks[i])
    composite_png = np.asarray(Image.open(out / "composite.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(psd.composite(ignore_preview=True))[..., :3], composite_png)
    np.testing.assert_array_equal(np.asarray(psd.topil())[..., :3], composite_png)  # stored flattened preview


def test_ora_zip_layout_layers_and_merged(tmp_path):
    images, masks = _layers(2)
    out = save_output(tmp_path / "out", _image(images, masks), _meta())
    with zipfile.ZipFile(out / "layers.ora") as archive:
        infos = archive.infolist()
        assert infos[0].filename == "mimetype" and infos[0].compress_type == zipfile.ZIP_STORED
        assert archive.read("mimetype") == ORA_MIMETYPE.encode()
        assert {"stack.xml", "mergedimage.png", "Thumbnails/thumbnail.png"} <= set(archive.namelist())
        assert sorted(n for n in archive.namelist() if n.startswith("data/")) == [
            "data/layer00.png", "data/layer01.png", "data/layer02.png"]
        stack_xml = archive.read("stack.xml").decode()
        thumb = Image.open(archive.open("Thumbnails/thumbnail.png"))
        assert max(thumb.size) <= 256
    assert "<script>" not in stack_xml and "&lt;script&gt;" in stack_xml  # XML-escaped
    assert stack_xml.index("02 ein") < stack_xml.index("00 the background")  # ORA: top layer first
    layers, merged = read_ora(out / "layers.ora")
    assert [name for name, _ in layers] == [layer_name(i, p) for i, p in enumerate(PROMPTS)]
    for i, (_, rgba) in enumerate(layers):
        np.testing.assert_array_equal(rgba[..., :3], images[i])
        np.testing.assert_array_equal(rgba[..., 3], 255 if i == 0 else masks[i])
    composite_png = np.asarray(Image.open(out / "composite.png").convert("RGB"))
    np.testing.assert_array_equal(merged, composite_png)
    np.testing.assert_array_equal(alpha_over([rgba for _, rgba in layers]), composite_png)


def test_pipeline_output_gives_one_layered_image_per_batch_item(tmp_path):
    images, masks = _layers(3, num_layers=2)
    other_images, other_masks = _layers(4, num_layers=2)
    out = LayerDiffPipelineOutput(latents=np.zeros((2, 2, 8, 5, 6)), layer_images=np.stack([images, other_images]),
                                  masks=np.stack([masks, other_masks]), global_prompt=GLOBAL,
                                  layer_prompts=PROMPTS[:2])  # (B, L, H, W, 3), (B, L, H, W)
    second = out.layered(1)
    assert second.layer_prompts == PROMPTS[:2] and second.global_prompt == GLOBAL
    np.testing.assert_array_equal(second.images[1], other_images[1])
    np.testing.assert_array_equal(second.masks[0], other_masks[0])
    with pytest.raises(IndexError, match="batch index 2"):
        out.layered(2)
    with pytest.raises(ValueError, match="latents only"):
        LayerDiffPipelineOutput(latents=np.zeros((1, 2, 8, 5, 6))).layered(0)
    folder = save_output(tmp_path / "b1", second)
    np.testing.assert_array_equal(load_output(folder).image.composite, eq4(other_images[0], other_images[1:],
                                                                          other_masks[1:]))


def test_bad_inputs_are_refused_before_writing(tmp_path):
    images, masks = _layers()
    target = tmp_path / "out"
    overlapping = [masks[0], masks[1], np.maximum(masks[1], masks[2])]
    with pytest.raises(ValueError, match="overlaps"):
        save_output(target, _image(images, overlapping[1:]), _meta())
    with pytest.raises(ValueError, match="not the complement"):
        save_output(target, _image(images, [np.full((H, W), 255, np.uint8), *masks[1:]]), _meta())
    with pytest.raises(ValueError, match="3 layers need 3 layer prompts"):
        save_output(target, _image(images, masks, PROMPTS[:2]), _meta())
    with pytest.raises(ValueError, match="sizes differ"):
        save_output(target, _image([images[0], images[1][:-1], images[2]], masks), _meta())
    with pytest.raises(ValueError, match="NaN"):
        save_output(target, _image([np.full((H, W, 3), np.nan)] * 3, masks), _meta())
    with pytest.raises(TypeError, match="takes a LayeredImage"):
        save_output(target, {"images": images, "masks": masks}, _meta())
    with pytest.raises(ValueError, match="3 layers but 0 layer prompts"):
        save_output(target, LayeredImage.from_arrays(images, masks), _meta())
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_writing_is_atomic_and_overwrite_is_explicit(tmp_path, monkeypatch):
    images, masks = _layers()
    target = save_output(tmp_path / "out", _image(images, masks), _meta())
    with pytest.raises(FileExistsError):
        save_output(target, _image(images, masks), _meta())

    # a failure half-way (while writing the OpenRaster file) leaves the old folder intact and no temp folder
    import model.sampling.export as export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_ora", broken)
    images2, masks2 = _layers(5)
    with pytest.raises(OSError, match="disk full"):
        save_output(target, _image(images2, masks2), _meta(seed=99), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert load_output(target).meta.seed == 7
    monkeypatch.undo()

    save_output(target, _image(images2, masks2), _meta(seed=99), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    loaded = load_output(target)
    assert loaded.meta.seed == 99
    np.testing.assert_array_equal(loaded.image.images[1], images2[1])


def test_load_refuses_tampered_folders(tmp_path):
    images, masks = _layers()
    out = save_output(tmp_path / "out", _image(images, masks), _meta())
    doc = json.loads((out / "layers.json").read_text(encoding="utf-8"))
    doc["layers"][1]["image"] = "../../etc/passwd"
    (out / "layers.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="want 'layer01.png'"):
        load_output(out)
    with pytest.raises(FileNotFoundError, match="not a LayerDiff output folder"):
        load_output(tmp_path)

    out2 = save_output(tmp_path / "out2", _image(images, masks), _meta())
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(out2 / "composite.png")
    with pytest.raises(ValueError, match="differs from the composite"):
        load_output(out2)


def test_from_mlcid_sample(tmp_path):
    from mlcid.synthetic import SceneConfig, make_scene

    sample = make_scene(SceneConfig(size=48), seed=0, index=3)
    image = LayeredImage.from_sample(sample)
    np.testing.assert_array_equal(image.composite, eq4(sample.background, sample.foregrounds, sample.masks))
    out = save_output(tmp_path / "s", image)
    assert load_output(out).image.layer_prompts == sample.layer_prompts
