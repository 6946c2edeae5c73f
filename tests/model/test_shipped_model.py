"""The shipped trained model (model.pretrained.SHAPES64) does what it says, judged by the learn-bench metric code
(`model.evaluation.layer_fidelity`, which never sees the model) — not only that the mechanics run:
  the files are those its card lists; sampled foregrounds have the prompted colour and shape, and backgrounds
  the prompted colour, more often than chance; layer inpainting "a red circle" → "a blue square" changes that layer's colour and shape and leaves the
  other layers' latents exactly as they were; iterative adding puts the new object on a new layer.

The folder must exist (no skip: the lead commits it with `layerdiff ship-model`). LAYERDIFF_SHIPPED_MODEL=DIR runs
these tests on a candidate folder before it is committed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from model.evaluation.layer_fidelity import LayerLabels, ShapeClassifier, dominant_colour, score_sample
from model.pretrained import SHAPES64
from model.sampling import applications as A
from model.sampling.showcase import Vocabulary, free_box, random_scenes
from model.ship import read_card, verify_checksums

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = Path(os.environ.get("LAYERDIFF_SHIPPED_MODEL") or SHAPES64)
STEPS = 10  # DDIM steps of every sample here (CFG 3 + self-mask guidance 3, the pipeline's defaults)
SAMPLES = 12  # prompts of test (a), alternating one and two foregrounds
EDITS = 8  # sources of the inpainting and iterative tests (one batch)
# Thresholds: rates over the foreground layers of these samples (chance: colour 1/4, shape 1/3), set below the rates
# measured on the committed model (CPU, one thread, these seeds; `pytest -s` prints them) with room for float
# differences between machines:
SAMPLE_COLOUR_MIN = 0.60  # measured: 0.78 of 18 layers (chance 0.25; the model before the VAE fix: 0.39)
SAMPLE_SHAPE_MIN = 0.75  # measured: 0.89 of 18 layers
SAMPLE_BACKGROUND_MIN = 0.65  # the background layer named the prompted colour; measured: 0.83 of 12 (chance 0.25;
# the model before the VAE fix: 0.50)
INPAINT_COLOUR_MIN = 0.75  # layer 1 named "blue" after the edit; measured: 1.00 of 8
INPAINT_SHAPE_MIN = 0.35  # layer 1 classified "square" after the edit; measured: 0.50 of 8 (changed: 1.00; chance
# 1/3): this model's weak point, its inpainted masks are blobby (0.88 before the VAE fix)
ADDED_COLOUR_MIN = 0.75  # the added "blue square" layer named blue; measured: 1.00 of 8
ADDED_NONEMPTY_MIN = 0.90  # the added layer's mask covers ≥ 0.5 % of the image; measured: 1.00 of 8
MIN_AREA_FRAC = 0.005  # score_sample's default: a mask below this is empty


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def shipped():
    """(pipeline, vocabulary, shape classifier fit on ground-truth synthetic masks of the card's vocabulary)."""
    from mlcid.synthetic import SceneConfig, make_scene
    from model.sampling.pipeline import LayerDiffPipeline

    assert MODEL.is_dir(), (f"the shipped model {MODEL} is missing: write it with `layerdiff ship-model --bench "
                            f".work/learn-bench --out {MODEL}` and commit it")
    pipe = LayerDiffPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    voc = Vocabulary.of_model(MODEL)
    size = int(read_card(MODEL)[0]["training_resolution"])
    cfg = SceneConfig(size=size, min_foregrounds=1, max_foregrounds=2, colours=voc.colours, shapes=voc.shapes,
                      background_colours=voc.background_colours)
    scenes = [make_scene(cfg, 123, i) for i in range(150)]  # ground truth only: never the model's output
    clf = ShapeClassifier(seed=0).fit([m > 127 for s in scenes for m in s.masks],
                                      [o["shape"] for s in scenes for o in s.source["objects"]])
    return pipe, voc, clf


def test_shipped_files_match_the_card_and_load_as_float32(shipped):
    assert verify_checksums(MODEL) == []
    pipe = shipped[0]
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float32}
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= 10_000_000


def test_sampled_layers_have_the_prompted_colour_shape_and_background(shipped):
    pipe, voc, clf = shipped
    colour, shape, background = [], [], []
    for i, scene in enumerate(random_scenes(voc, SAMPLES, seed=5)):
        out = pipe(scene.global_prompt, scene.layer_prompts, num_inference_steps=STEPS, generator=gen(i),
                   output_type="np")
        labels = LayerLabels(scene.objects, scene.background)
        r = score_sample(out.layer_images[0], out.masks[0], out.composites[0], labels, clf)
        colour += r.colour_ok
        shape += r.shape_ok
        background.append(r.background_ok)
    print(f"measured: sampled colour {np.mean(colour):.2f}, shape {np.mean(shape):.2f} on {len(colour)} layers, "
          f"background {np.mean(background):.2f} of {len(background)}")
    assert np.mean(background) > SAMPLE_BACKGROUND_MIN, f"background right on {np.mean(background):.2f}"
    assert np.mean(colour) > SAMPLE_COLOUR_MIN, f"colour right on {np.mean(colour):.2f} of {len(colour)} layers"
    assert np.mean(shape) > SAMPLE_SHAPE_MIN, f"shape right on {np.mean(shape):.2f} of {len(shape)} layers"


@pytest.fixture(scope="module")
def red_circles(shipped):
    """EDITS two-layer samples of "a red circle" (one batch): the sources of the edit tests."""
    pipe = shipped[0]
    out = pipe("a red circle on a plain cyan background", ["the background", "a red circle"],
               num_inference_steps=STEPS, num_images=EDITS, generator=gen(100), output_type="np")
    return [out.layered(i) for i in range(EDITS)]


def test_inpainting_changes_layer_1_and_keeps_the_other_layers_latents(shipped, red_circles):
    pipe, _, clf = shipped
    colour, shape, changed = [], [], []
    for i, src in enumerate(red_circles):
        out = A.layer_inpaint(pipe, src, {1: "a blue square"}, global_prompt="a blue square on a plain cyan background",
                              num_inference_steps=STEPS, generator=gen(200 + i), output_type="np")
        z0 = A.encode_layers(pipe, src.images, src.masks, (src.height, src.width))  # (1, L, 8, h, w)
        c = pipe.latent_channels
        assert torch.equal(out.latents[:, 0, :c], z0[:, 0, :c].to(out.latents)), "background image latents changed"
        r = score_sample(out.layer_images[0], out.masks[0], out.composites[0], LayerLabels((("blue", "square"),)), clf)
        before = (dominant_colour(src.images[1], src.masks[1] > 127), clf.predict([src.masks[1] > 127])[0])
        colour += r.colour_ok
        shape += r.shape_ok
        changed.append(r.predicted[0] != before)
    print(f"measured: inpainted blue {np.mean(colour):.2f}, square {np.mean(shape):.2f}, changed "
          f"{np.mean(changed):.2f} on {len(colour)} edits")
    assert np.mean(colour) > INPAINT_COLOUR_MIN, f"layer 1 blue on {np.mean(colour):.2f} of {len(colour)} edits"
    assert np.mean(shape) > INPAINT_SHAPE_MIN, f"layer 1 square on {np.mean(shape):.2f} of {len(shape)} edits"
    assert np.mean(changed) >= 0.5, f"layer 1 (colour, shape) changed on {np.mean(changed):.2f} of the edits"


def test_inpainting_with_masks_held_keeps_every_other_latent_exactly(shipped, red_circles):
    pipe = shipped[0]
    src = red_circles[0]
    out = A.layer_inpaint(pipe, src, {1: "a blue square"}, mask_hold_steps=STEPS, num_inference_steps=STEPS,
                          generator=gen(300), output_type="latent")
    z0 = A.encode_layers(pipe, src.images, src.masks, (src.height, src.width))
    assert torch.equal(out.latents[:, 0], z0[:, 0].to(out.latents))  # image AND mask latents of layer 0
    assert not torch.allclose(out.latents[:, 1], z0[:, 1].to(out.latents), atol=1e-2)  # layer 1 regenerated


def test_iterative_adding_puts_the_new_object_on_a_new_layer(shipped, red_circles):
    pipe = shipped[0]
    colour, nonempty = [], []
    for i, src in enumerate(red_circles):
        res = A.iterative_generation(pipe, "a blue square and a red circle on a plain cyan background",
                                     ["a blue square"], boxes=[free_box(src)], start=src,
                                     num_inference_steps=STEPS, generator=gen(400 + i))
        layers = res.layers
        assert layers.num_layers == src.num_layers + 1 and layers.layer_prompts[-1] == "a blue square"
        assert all(np.array_equal(a, b) for a, b in zip(layers.images[:2], src.images))  # old layers as they were
        new = layers.masks[-1] > 127
        nonempty.append(new.mean() >= MIN_AREA_FRAC)
        colour.append(bool(nonempty[-1]) and dominant_colour(layers.images[-1], new) == "blue")
    print(f"measured: added layer non-empty {np.mean(nonempty):.2f}, blue {np.mean(colour):.2f} on {len(colour)}")
    assert np.mean(nonempty) >= ADDED_NONEMPTY_MIN, f"added layer non-empty on {np.mean(nonempty):.2f}"
    assert np.mean(colour) > ADDED_COLOUR_MIN, f"added layer blue on {np.mean(colour):.2f} of {len(colour)}"
