"""Pixel fidelity metrics of `model.evaluation.layer_fidelity` on ground-truth synthetic scenes and broken versions of them."""

from __future__ import annotations

import numpy as np
import pytest

from mlcid.synthetic import SceneConfig, make_scene
from mlcid.synthetic_shapes import COLOURS
from model.evaluation.layer_fidelity import (
    LayerLabels, ShapeClassifier, composite_eq4, dominant_colour, nearest_colour, score_sample, shape_features,
    summarize,
)

SHAPES = ("circle", "square", "triangle")
CFG = SceneConfig(size=64, min_foregrounds=1, max_foregrounds=2, colours=("red", "green", "blue", "yellow"),
                  shapes=SHAPES, background_patterns=("plain",), background_colours=("purple", "orange", "cyan", "pink"),
                  min_radius=0.2, max_radius=0.32)


def _layers(scene):
    """Ground-truth layer images (L, H, W, 3) and 0/255 masks (L, H, W) as the pipeline returns them."""
    images = np.stack([scene.background] + [fg[..., :3] for fg in scene.foregrounds])
    fg = np.stack(scene.masks) > 127
    masks = np.concatenate([np.where(fg.any(0), 0, 255)[None], fg * 255]).astype(np.uint8)
    return images, masks


@pytest.fixture(scope="module")
def classifier():
    masks, shapes = [], []
    for i in range(150):
        s = make_scene(CFG, 0, i)
        masks += [m > 127 for m in s.masks]
        shapes += [o["shape"] for o in s.source["objects"]]
    return ShapeClassifier().fit(masks, shapes)


def test_nearest_colour_names_palette_shaded_and_pastel_colours_and_refuses_grey():
    for name, rgb in COLOURS.items():
        assert nearest_colour(rgb) == name
        assert nearest_colour(np.asarray(rgb) * 0.9) == name  # shading keeps the hue
        assert nearest_colour(np.asarray(rgb) * 0.5 + 127) == name  # pastel background tint
    assert nearest_colour((128, 128, 128)) is None
    assert nearest_colour((0, 0, 0)) is None


def test_dominant_colour_reads_only_inside_the_mask():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = COLOURS["red"]
    image[:, 4:] = COLOURS["blue"]
    mask = np.zeros((8, 8), bool)
    mask[:, 5:] = True
    assert dominant_colour(image, mask) == "blue"
    assert dominant_colour(image, np.zeros((8, 8), bool)) is None


def test_shape_classifier_generalises_to_fresh_ground_truth(classifier):
    masks, shapes = [], []
    for i in range(60):
        s = make_scene(CFG, 7, i)
        masks += [m > 127 for m in s.masks]
        shapes += [o["shape"] for o in s.source["objects"]]
    assert classifier.accuracy(masks, shapes) >= 0.9
    assert classifier.predict([np.zeros((64, 64), bool)]) == [None]
    assert shape_features(np.zeros((64, 64), bool)) is None


def test_shape_classifier_needs_two_shapes():
    s = make_scene(CFG, 0, 0)
    with pytest.raises(ValueError, match="2 shapes"):
        ShapeClassifier().fit([m > 127 for m in s.masks[:1]], ["circle"])


def test_ground_truth_scores_perfect_and_swapped_layers_fail(classifier):
    cfg2 = SceneConfig(**{**CFG.to_json(), "min_foregrounds": 2, "max_foregrounds": 2})
    scene = next(s for s in (make_scene(cfg2, 3, i) for i in range(50))
                 if s.source["objects"][0]["shape"] != s.source["objects"][1]["shape"])
    labels = LayerLabels.from_source(scene.source)
    images, masks = _layers(scene)
    r = score_sample(images, masks, scene.composite, labels, classifier)
    assert r.colour_ok == [True, True] and r.shape_ok == [True, True] and r.disjoint and r.background_ok
    assert r.composite_mae < 1.0
    # The same pixels with the two foreground layers exchanged: both layers now contradict their prompts.
    swapped = score_sample(images[[0, 2, 1]], masks[[0, 2, 1]], scene.composite, labels, classifier)
    assert swapped.colour_ok == [False, False] and swapped.shape_ok == [False, False]
    # Image and mask channels mixed up (image of layer 1 with an empty mask) → empty, wrong, composite off.
    broken = masks.copy()
    broken[1] = 0
    r = score_sample(images, broken, scene.composite, labels, classifier)
    assert r.nonempty[0] is False and r.colour_ok[0] is False and r.shape_ok[0] is False
    overlap = masks.copy()
    overlap[2] = np.maximum(masks[2], masks[1])
    assert not score_sample(images, overlap, scene.composite, labels, classifier).disjoint
    wrong_bg = images.copy()
    wrong_bg[0] = COLOURS["green"]
    assert score_sample(wrong_bg, masks, scene.composite, labels, classifier).background_ok is False


def test_composite_eq4_and_summary(classifier):
    scene = make_scene(CFG, 1, 0)
    images, masks = _layers(scene)
    assert np.abs(composite_eq4(images, masks) - scene.composite).max() <= 1
    labels = LayerLabels.from_source(scene.source)
    good = score_sample(images, masks, scene.composite, labels, classifier)
    bad = score_sample(images, masks, 255 - scene.composite, labels, classifier)
    assert bad.composite_mae > 50
    s = summarize([good, bad])
    assert s["n"] == 2 and s["colour_acc"] == 1.0 and s["background_acc"] == 1.0
    with pytest.raises(ValueError, match="labelled"):
        score_sample(images[:1], masks[:1], scene.composite, labels, classifier)


TEXTURED = SceneConfig(size=64, min_foregrounds=1, max_foregrounds=2, colours=("red", "green", "blue", "yellow"),
                       shapes=SHAPES, background_patterns=("plain", "stripes", "checks"),
                       object_patterns=("plain", "stripes", "checks"),
                       background_colours=("purple", "orange", "cyan", "pink"), min_radius=0.2, max_radius=0.32)


def test_scene_feature_frechet_distance_ranks_real_above_blurred_and_recoloured():
    from PIL import Image, ImageFilter

    from model.evaluation.layer_fidelity import SceneFeatures, frechet_feature_distance, scene_attributes

    fit = [make_scene(TEXTURED, 0, i) for i in range(300)]
    features = SceneFeatures(seed=0).fit(np.stack([s.composite for s in fit]), [scene_attributes(s.source) for s in fit])
    reference = np.stack([make_scene(TEXTURED, 1, i).composite for i in range(150)])
    real = np.stack([make_scene(TEXTURED, 2, i).composite for i in range(60)])
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(2))) for im in real])
    recoloured = real[..., ::-1].copy()  # RGB → BGR: every hue moves
    assert "texture:stripes" in features.labels and "bg-pattern:checks" in features.labels
    labels = [scene_attributes(make_scene(TEXTURED, 2, i).source) for i in range(60)]
    all_absent = 1 - np.mean([len(x) for x in labels]) / len(features.labels)  # accuracy of "no label ever"
    assert features.label_accuracy(real, labels) > all_absent + 0.05
    d_real = frechet_feature_distance(features, real, reference)
    assert frechet_feature_distance(features, blurred, reference) > 1.5 * d_real  # textures concealed: worse
    assert frechet_feature_distance(features, recoloured, reference) > 1.5 * d_real
    with pytest.raises(RuntimeError, match="before fit"):
        SceneFeatures().features(real)
