"""`mlcid.layered.LayeredImage`: checked construction from any array form, Eq. 4, new foregrounds, sample round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcid.composite import composite as eq4
from mlcid.layered import LayeredImage
from mlcid.synthetic import SceneConfig, make_scene

H, W = 24, 32


def _layers(seed: int = 0, num_layers: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(num_layers)]
    winner = rng.random((num_layers, H, W)).argmax(0)  # (H, W): one layer per pixel
    return images, [np.where(winner == i, 255, 0).astype(np.uint8) for i in range(num_layers)]


def test_torch_floats_pil_and_foreground_only_masks_give_the_same_image():
    from PIL import Image

    images, masks = _layers()
    a = LayeredImage.from_arrays(images, masks, "g", ["the background", "a", "b"])
    as_torch = [torch.from_numpy(im).float().div(255).permute(2, 0, 1) for im in images]  # (3, H, W) in [0, 1]
    b = LayeredImage.from_arrays(as_torch, [torch.from_numpy(m > 0)[None] for m in masks[1:]])  # (1, H, W) bool
    c = LayeredImage.from_arrays([Image.fromarray(im) for im in images], [Image.fromarray(m) for m in masks])
    for x in (b, c):
        for i in range(3):
            np.testing.assert_array_equal(x.images[i], a.images[i])
            np.testing.assert_array_equal(x.masks[i], a.masks[i])
    np.testing.assert_array_equal(a.composite, eq4(images[0], images[1:], masks[1:]))
    assert (a.height, a.width, a.num_layers) == (H, W, 3)
    rgba = a.rgba()
    assert (rgba[0][..., 3] == 255).all() and np.array_equal(rgba[2][..., 3], masks[2])


@pytest.mark.parametrize("bad, match", [
    (lambda im, m: (im[:1], m[:1]), "at least one foreground"),
    (lambda im, m: (im, [m[0], m[1], np.maximum(m[1], m[2])]), "overlaps"),
    (lambda im, m: (im, [np.full((H, W), 255, np.uint8), *m[1:]]), "not the complement"),
    (lambda im, m: ([im[0], im[1][:-1], im[2]], m), "sizes differ"),
    (lambda im, m: (im, m[:1]), "need 3 masks"),
    (lambda im, m: ([np.full((H, W, 3), np.nan)] * 3, m), "NaN"),
    (lambda im, m: ([x[..., 0] for x in im], m), "must be \\(H, W, 3\\)"),
])
def test_bad_layers_are_refused_with_the_reason(bad, match):
    images, masks = bad(*_layers())
    with pytest.raises(ValueError, match=match):
        LayeredImage.from_arrays(images, masks)
    with pytest.raises(ValueError, match="3 layers need 3 layer prompts"):
        LayeredImage.from_arrays(*_layers(), layer_prompts=["the background", "a"])


def test_a_new_foreground_goes_in_front_and_keeps_masks_one_hot():
    images, masks = _layers(num_layers=2)
    image = LayeredImage.from_arrays(images, masks, "g", ["the background", "a"])
    new_mask = np.zeros((H, W), np.uint8)
    new_mask[4:12, 4:20] = 255
    new_rgb = np.full((H, W, 3), 7, np.uint8)
    out = image.with_foreground(new_rgb, new_mask, "b")
    assert out.layer_prompts == ["the background", "a", "b"] and out.num_layers == 3
    assert (out.masks[2] == new_mask).all() and not (out.masks[1][new_mask > 0]).any()  # front wins
    assert (np.stack(out.masks).astype(int).sum(0) == 255).all()  # one-hot, background = complement
    assert (out.composite[4:12, 4:20] == 7).all()
    assert image.num_layers == 2  # the original is unchanged


def test_mlcid_sample_round_trip_and_training_fill():
    sample = make_scene(SceneConfig(size=48), seed=0, index=3)
    image = LayeredImage.from_sample(sample)
    assert image.layer_prompts == sample.layer_prompts and image.global_prompt == sample.global_prompt
    np.testing.assert_array_equal(image.composite, eq4(sample.background, sample.foregrounds, sample.masks))
    filled = LayeredImage.from_sample(sample, fill=128)
    outside = sample.foregrounds[0][..., 3] == 0
    assert outside.any() and (filled.images[1][outside] == 128).all()
    back = image.to_sample("k")
    np.testing.assert_array_equal(back.masks[0], sample.masks[0])
    np.testing.assert_array_equal(back.composite, image.composite)
    assert back.layer_prompts == sample.layer_prompts
