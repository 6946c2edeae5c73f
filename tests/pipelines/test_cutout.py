"""Cut-outs: exact 5×5 dilation of the alpha, source RGB inside, constant fill outside, masks left undilated."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.base import Item, ObjectLayer, build_stage
from pipelines.cutout import cutout_rgba, dilate


def test_single_pixel_dilates_to_exact_5x5_square():
    m = np.zeros((11, 11), bool)
    m[5, 5] = True
    d = dilate(m, 5)
    expected = np.zeros((11, 11), bool)
    expected[3:8, 3:8] = True
    assert (d == expected).all()
    assert (dilate(m, 1) == m).all()


def test_dilation_matches_brute_force_and_clips_at_border():
    rng = np.random.default_rng(0)
    m = rng.random((20, 23)) > 0.93
    m[0, 0] = m[19, 22] = True
    d = dilate(m, 5)
    ref = np.zeros_like(m)
    for y, x in zip(*np.nonzero(m)):
        ref[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] = True  # the 5×5 square, clipped to the image
    assert (d == ref).all()


def test_even_kernel_rejected():
    with pytest.raises(ValueError, match="odd"):
        dilate(np.zeros((4, 4), bool), 4)


def test_rgba_content():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    m = np.zeros((16, 16), bool)
    m[6:9, 6:10] = True
    rgba = cutout_rgba(img, m, 5, fill=(7, 8, 9))
    alpha = rgba[..., 3] > 0
    assert set(np.unique(rgba[..., 3])) == {0, 255}
    assert (alpha == dilate(m, 5)).all() and alpha.sum() == 7 * 8
    assert (rgba[alpha][:, :3] == img[alpha]).all()  # source pixels inside the dilated alpha
    assert (rgba[~alpha][:, :3] == (7, 8, 9)).all()  # constant fill outside


def test_stage_keeps_masks_undilated_and_disjoint():
    img = np.full((20, 20, 3), 100, np.uint8)
    a = np.zeros((20, 20), bool)
    a[2:8, 2:8] = True
    b = np.zeros((20, 20), bool)
    b[8:14, 2:8] = True  # touches `a`: dilated alphas overlap, masks must not
    item = Item("k", img)
    item.objects = [ObjectLayer(a.copy(), (2, 2, 8, 8), 0.5, "x"), ObjectLayer(b.copy(), (2, 8, 8, 14), 0.5, "y")]
    stage = build_stage("cutout", "dilate5")
    stage.setup()
    stage([item])
    assert (item.objects[0].mask == a).all() and (item.objects[1].mask == b).all()
    assert not (item.objects[0].mask & item.objects[1].mask).any()
    alphas = [o.rgba[..., 3] > 0 for o in item.objects]
    assert (alphas[0] & alphas[1]).any()  # only the RGBA alpha is dilated
    assert all(o.rgba.shape == (20, 20, 4) and o.rgba.dtype == np.uint8 for o in item.objects)


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        cutout_rgba(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5), bool))
