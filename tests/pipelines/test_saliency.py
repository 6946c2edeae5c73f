"""Saliency backends: classical maps find planted objects; the depth backend loads a tiny transformers model."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.base import Item, build_stage
from pipelines.devices import ModelStageConfig
from pipelines.saliency import DepthSaliencyOptions, centre_prior, classical_saliency, depth_work_size, otsu_mask


def scene(obj_box: tuple[int, int, int, int], size: tuple[int, int] = (96, 128), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.clip(np.array([60, 120, 70]) + rng.normal(0, 6, (*size, 3)), 0, 255).astype(np.uint8)  # grassy
    x0, y0, x1, y1 = obj_box
    img[y0:y1, x0:x1] = (220, 40, 60)  # red object
    return img


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, (a | b).sum())


@pytest.mark.parametrize("box", [(48, 32, 80, 64), (8, 10, 40, 40), (90, 55, 124, 92)])
def test_classical_finds_planted_object(box):
    img = scene(box)
    sal = classical_saliency(img)
    truth = np.zeros(img.shape[:2], bool)
    truth[box[1] : box[3], box[0] : box[2]] = True
    assert sal.shape == truth.shape and sal.dtype == bool
    assert iou(sal, truth) > 0.5
    assert (sal & truth).sum() / truth.sum() > 0.8  # most of the object is salient (feeds the > 10% rule)


def test_flat_image_has_no_salient_pixels():
    assert not classical_saliency(np.full((64, 64, 3), 128, np.uint8)).any()
    assert not otsu_mask(np.ones((8, 8))).any()


def test_bad_input_named():
    with pytest.raises(ValueError, match="uint8"):
        classical_saliency(np.zeros((8, 8), np.float32))


def test_centre_prior_peaks_in_the_middle():
    p = centre_prior(33, 65)
    assert p[16, 32] == pytest.approx(p.max()) and p[0, 0] == pytest.approx(p.min())
    assert p.min() >= 0.7 - 1e-6  # (1 - weight) floor


def test_otsu_picks_near_region_of_inverse_depth():
    inv = np.ones((40, 40))  # far
    inv[10:25, 5:20] = 9.0  # near object: large inverse depth
    inv += np.random.default_rng(0).normal(0, 0.2, inv.shape)
    near = otsu_mask(inv)
    truth = np.zeros((40, 40), bool)
    truth[10:25, 5:20] = True
    assert (near == truth).all()


def test_classical_stage_sets_saliency_on_alive_items_only():
    stage = build_stage("saliency", "classical")
    stage.setup()
    a, b = Item("a", scene((48, 32, 80, 64))), Item("b", scene((8, 10, 40, 40)))
    b.drop("earlier")
    stage([a, b])
    assert a.saliency is not None and a.saliency.shape == (96, 128) and b.saliency is None


def test_depth_stage_batches_by_shape_and_matches_one_by_one(tiny_models):
    """The tiny `depth-saliency` preset (random Depth Anything) loads through the registry and batches exactly."""
    model = ModelStageConfig(preset="tiny", device="cpu", dtype="float32", batch_size=2)
    stage = build_stage("saliency", "depth", model, DepthSaliencyOptions())
    assert stage.model_id == str(tiny_models / "depth-saliency")
    stage.setup()
    items = [Item(f"k{i}", scene((20 + 5 * i, 20, 60, 60), size=s, seed=i))
             for i, s in enumerate([(96, 128), (64, 64), (96, 128), (96, 128)])]
    stage(items)
    for it in items:
        assert it.saliency.shape == it.image.shape[:2] and it.saliency.dtype == bool
    inv = stage.inverse_depth([it.image for it in items])
    for it, d in zip(items, inv):
        alone = stage.inverse_depth([it.image])[0]
        assert np.allclose(d, alone, atol=1e-4)  # batching changes nothing
        assert (otsu_mask(d) == it.saliency).all()


def test_depth_work_size_buckets_nearby_aspect_ratios():
    assert depth_work_size(512, 512, 518, 56) == (518, 518)
    assert depth_work_size(512, 680, 518, 56) == depth_work_size(512, 688, 518, 56) == (518, 686)  # 4:3-ish
    assert depth_work_size(768, 512, 518, 56) == (798, 518)  # portrait 2:3: the long side is the height
    assert depth_work_size(512, 680, 518, 0) == (512, 680)  # step 0: the image's own shape
    with pytest.raises(ValueError, match="size_step"):
        DepthSaliencyOptions(size_step=-1)


def test_depth_stage_batches_nearby_sizes_in_one_pass(tiny_models):
    """Different shapes of one working size share a model pass; each item gets what it gets alone."""
    model = ModelStageConfig(preset="tiny", device="cpu", dtype="float32", batch_size=8)
    shapes = [(96, 128), (96, 126), (94, 128), (64, 64)]  # three ≈ 4:3 shapes and a square
    passes = {}
    for step in (56, 0):
        stage = build_stage("saliency", "depth", model, DepthSaliencyOptions(size_step=step))
        stage.setup()
        calls = []
        stage.model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["pixel_values"].shape[0]),
                                              with_kwargs=True)
        items = [Item(f"k{i}", scene((20, 20, 60, 60), size=s, seed=i)) for i, s in enumerate(shapes)]
        stage(items)
        passes[step] = sorted(calls)
        assert len({stage.bucket_key(it) for it in items}) == (2 if step else 4)
        for it in items:
            assert it.saliency.shape == it.image.shape[:2]
            alone = stage.inverse_depth([it.image])[0]
            assert (otsu_mask(alone) == it.saliency).all()
    assert passes == {56: [1, 3], 0: [1, 1, 1, 1]}


def test_depth_stage_missing_model_is_clear(tmp_path):
    stage = build_stage("saliency", "depth", ModelStageConfig(
        model_overrides={"depth-saliency": str(tmp_path / "nope")}, device="cpu"), DepthSaliencyOptions())
    with pytest.raises(FileNotFoundError, match="make tiny-models"):
        stage.setup()
