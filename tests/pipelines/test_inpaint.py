"""Background inpainting: SD (tiny sd15-inpaint preset) and OpenCV; pixels outside the hole kept exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.base import Item, ObjectLayer
from pipelines.devices import ModelStageConfig
from pipelines.inpaint import (
    OpenCVInpainter,
    OpenCVInpaintOptions,
    SDInpaintOptions,
    StableDiffusionInpainter,
    hole_mask,
    negative_prompt,
    work_size,
)


def sd_stage(model, batch_size=8, **options):
    return StableDiffusionInpainter(ModelStageConfig(model=str(model), device="cpu", batch_size=batch_size),
                                    SDInpaintOptions(**options))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from model.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_models(root, only=("sd15-inpaint",))
    return str(root / "sd15-inpaint")


def _items(n=3):
    rng = np.random.default_rng(3)
    items = []
    for i in range(n):
        h = 40 + 8 * i
        image = rng.integers(0, 255, (h, 48, 3), dtype=np.uint8)
        a = np.zeros((h, 48), bool)
        a[6:18, 8:20] = True
        b = np.zeros((h, 48), bool)
        b[20:30, 25:40] = True
        items.append(Item(key=f"k{i}", image=image, objects=[
            ObjectLayer(a, (8, 6, 20, 18), 0.9, "Cat", prompt="a small cat"),
            ObjectLayer(b, (25, 20, 40, 30), 0.5, "Dog"),
        ]))
    return items


def test_hole_mask_dilation_and_negative_prompt():
    it = _items(1)[0]
    union = it.objects[0].mask | it.objects[1].mask
    np.testing.assert_array_equal(hole_mask(it, 1), union)
    dilated = hole_mask(it, 5)
    assert dilated[union].all() and dilated.sum() > union.sum()
    assert dilated[4, 6] and not dilated[3, 6]  # 2 px ring around a 5×5 kernel
    # The object TERMS (detection labels), not the object captions; "/" alternatives split, duplicates once.
    assert negative_prompt(it) == "cat, dog"
    it.objects.append(ObjectLayer(it.objects[0].mask, (8, 6, 20, 18), 0.3, "Moniter/TV", prompt="a screen"))
    it.objects.append(ObjectLayer(it.objects[0].mask, (8, 6, 20, 18), 0.3, "cat", prompt="another cat"))
    assert negative_prompt(it) == "cat, dog, moniter, tv"
    with pytest.raises(ValueError, match="does not match"):
        it.objects[0].mask = np.zeros((3, 3), bool)
        hole_mask(it, 5)


def test_work_size_multiple_of_8():
    assert work_size(512, 768, 512) == (512, 768)
    assert work_size(40, 48, 64) == (64, 80)
    assert all(v % 8 == 0 for v in work_size(333, 500, 512))


def test_opencv_keeps_outside_and_fills_hole():
    items = OpenCVInpainter(OpenCVInpaintOptions(dilate_kernel=5))(_items())
    for it in items:
        hole = hole_mask(it, 5)
        assert it.background.shape == it.image.shape and it.background.dtype == np.uint8
        np.testing.assert_array_equal(it.background[~hole], it.image[~hole])
        assert (it.background[hole] != it.image[hole]).any()
    with pytest.raises(ValueError, match="odd"):
        OpenCVInpaintOptions(dilate_kernel=4)
    with pytest.raises(ValueError, match="method"):
        OpenCVInpaintOptions(method="magic")


def test_sd_inpaint_shapes_exact_outside_and_batching(sd_dir):
    stage = sd_stage(sd_dir, 3, num_inference_steps=2, resolution=64)
    items = stage(_items())
    for it in items:
        hole = hole_mask(it, 5)
        assert it.background.shape == it.image.shape and it.background.dtype == np.uint8
        np.testing.assert_array_equal(it.background[~hole], it.image[~hole])
        assert (it.background[hole] != it.image[hole]).mean() > 0.5  # the hole was generated, not copied
    stage.batch_size = 1
    single = stage(_items())
    for a, b in zip(items, single):
        np.testing.assert_array_equal(a.background, b.background)


def test_dropped_items_untouched_and_missing_model(tmp_path):
    items = _items(2)
    items[0].drop("no_mask")
    OpenCVInpainter()(items)
    assert items[0].background is None and items[1].background is not None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd_stage(tmp_path / "nope").setup()


def test_item_without_objects_keeps_its_image():
    it = _items(1)[0]
    it.objects = []
    OpenCVInpainter()([it])
    np.testing.assert_array_equal(it.background, it.image)
    assert it.background is not it.image


def test_sd_scheduler_and_steps_are_options(sd_dir):
    """Default: DPM-Solver++ (2M); "default" keeps the checkpoint's scheduler; the steps reach the pipeline."""
    from diffusers import DPMSolverMultistepScheduler

    stage = sd_stage(sd_dir, num_inference_steps=3, resolution=64)
    stage.setup()
    sched = stage.pipe.scheduler
    assert isinstance(sched, DPMSolverMultistepScheduler)
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.solver_order == 2
    items = stage(_items(1))
    assert len(stage.pipe.scheduler.timesteps) == 3 and items[0].background is not None
    own = sd_stage(sd_dir, scheduler="default")
    own.setup()
    assert type(own.pipe.scheduler).__name__ == "DDIMScheduler"  # what the tiny checkpoint ships
    assert SDInpaintOptions().num_inference_steps == 20
    with pytest.raises(ValueError, match="scheduler"):
        SDInpaintOptions(scheduler="magic")
