"""model.sampling.applications: layer inpainting, style transfer, mask priors, iterative generation; sources from output
folders, MLCID samples and pipeline outputs; bad input refused before any UNet call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcid.layered import LayeredImage
from mlcid.schema import LayerInfo, MLCIDSample
from model.sampling import applications as A
from model.sampling.export import load_layers, save_output
from model.sampling.pipeline import LayerDiffPipeline
from tests.builders import UNetSpy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread on shared cores

SIZE = 32
PROMPTS = ["the background", "a red ball", "a dog"]


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_sources_from_output_folder_and_pipeline_output(pipe, source, tmp_path):
    assert source.num_layers == 3 and source.layer_prompts == PROMPTS and (source.height, source.width) == (SIZE, SIZE)
    assert (np.stack(source.masks).astype(int).sum(axis=0) == 255).all()
    folder = save_output(tmp_path / "out", source)
    back = load_layers(folder)
    assert back.layer_prompts == PROMPTS and back.global_prompt == "a dog with a red ball"
    assert all(np.array_equal(a, b) for a, b in zip(back.images, source.images))
    assert all(np.array_equal(a, b) for a, b in zip(back.masks, source.masks))
    assert np.array_equal(back.composite, source.composite)


def test_source_from_mlcid_sample():
    h = w = 16
    fg = np.zeros((h, w, 4), np.uint8)
    fg[..., :3] = 200
    fg[2:10, 2:10, 3] = 255  # dilated alpha
    mask = np.zeros((h, w), np.uint8)
    mask[3:9, 3:9] = 255
    bg = np.full((h, w, 3), 30, np.uint8)
    sample = MLCIDSample(key="k", global_prompt="g", composite=bg, background=bg, foregrounds=[fg], masks=[mask],
                         layers=[LayerInfo("the background"), LayerInfo("a box")])
    src = A.source_from_sample(sample)
    assert src.layer_prompts == ["the background", "a box"]
    assert (src.images[1][2:10, 2:10] == 200).all() and (src.images[1][0, 0] == 128).all()  # fill outside alpha
    assert np.array_equal(src.masks[1], mask) and np.array_equal(src.masks[0], 255 - mask)


def test_layer_inpaint_keeps_untouched_layers_exactly(pipe, source):
    spy = UNetSpy(pipe)
    try:
        out = A.layer_inpaint(pipe, source, {1: "a blue cube"}, num_inference_steps=3, generator=gen(),
                              output_type="np")
    finally:
        spy.close()
    z0 = A.encode_layers(pipe, source.images, source.masks, (SIZE, SIZE))
    assert torch.equal(out.latents[:, [0, 2], :4], z0[:, [0, 2], :4])  # image latents end EXACTLY the originals
    assert not torch.allclose(out.latents[:, 1, :4], z0[:, 1, :4], atol=1e-3)  # target regenerated
    assert not torch.allclose(out.latents[:, [0, 2], 4:], z0[:, [0, 2], 4:], atol=1e-3)  # masks free after k = 1
    assert out.layer_prompts == ["the background", "a blue cube", "a dog"]
    two = A.layer_inpaint(pipe, source, {1: "a blue cube"}, num_inference_steps=2, generator=gen(), num_images=2,
                          guidance="cfg", output_type="latent")
    assert torch.equal(two.latents[:, [0, 2], :4], z0[:, [0, 2], :4].expand(2, -1, -1, -1, -1))
    assert not torch.allclose(two.latents[0, 1], two.latents[1, 1])  # two different regenerations
    assert [c[0] for c in spy.calls] == [2, 1] * 3  # CFG pair + SMG pass per step, as in plain sampling


def test_layer_inpaint_start_latents(pipe, source, monkeypatch):
    seen = {}
    real_call = LayerDiffPipeline.__call__

    def spy_call(self, *args, **kwargs):
        seen.update(kwargs)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(LayerDiffPipeline, "__call__", spy_call)
    A.layer_inpaint(pipe, source, {2: "a cat"}, num_inference_steps=2, generator=gen(7), output_type="latent")
    z0 = A.encode_layers(pipe, source.images, source.masks, (SIZE, SIZE))
    noise = torch.randn(z0.shape, generator=gen(7))
    t0 = pipe.prepare_timesteps(2)[0]
    a = pipe.scheduler.alphas_cumprod[t0]
    expected = a.sqrt() * z0 + (1 - a).sqrt() * noise
    start = seen["latents"]
    assert torch.allclose(start[:, :2], expected[:, :2], atol=1e-5)  # non-targets: originals noised to T
    assert torch.equal(start[:, 2], noise[:, 2])  # target: Gaussian
    assert seen["keep"].image_layers == (0, 1) and seen["keep"].mask_steps == 1


def test_style_transfer_keeps_non_targets_on_image_and_mask(pipe, source):
    out = A.layer_style_transfer(pipe, source, [0], style="in Van Gogh style", num_inference_steps=5,
                                 generator=gen(), output_type="np")
    z0 = A.encode_layers(pipe, source.images, source.masks, (SIZE, SIZE))
    assert torch.equal(out.latents[:, 1:], z0[:, 1:])  # image AND mask latents of non-targets
    assert not torch.allclose(out.latents[:, 0, :4], z0[:, 0, :4], atol=1e-3)
    assert out.layer_prompts[0] == "the background, in Van Gogh style" and out.layer_prompts[1:] == PROMPTS[1:]
    assert out.global_prompt == "a dog with a red ball, in Van Gogh style"


def test_style_transfer_runs_80_percent_of_the_steps(pipe, source):
    spy = UNetSpy(pipe)
    try:
        A.layer_style_transfer(pipe, source, [1], style="pixel art", num_inference_steps=5, generator=gen(),
                               guidance="cfg", output_type="latent")
    finally:
        spy.close()
    assert len(spy.calls) == 4  # int(5 · 0.8) steps, one batched CFG call each


def test_mask_prior_latents_are_the_noised_box_encodings(pipe):
    boxes = [(0, 0, 16, 16), (8, 8, 32, 24)]
    latents = A.mask_prior_latents(pipe, A.prior_masks(2, SIZE, SIZE, boxes=boxes), 4, gen(3))
    # independent reference: box images → VAE posterior mode × scaling → Eq. 1 at the first DDIM timestep
    m = np.zeros((3, SIZE, SIZE), np.float32)
    m[1, 0:16, 0:16] = 1
    m[2, 8:24, 8:32] = 1
    m[0] = 1 - np.maximum(m[1], m[2])
    pixels = torch.from_numpy(m * 2 - 1)[:, None].expand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        z = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor  # (3, 4, 4, 4)
    noise = torch.randn(1, 3, 8, SIZE // 8, SIZE // 8, generator=gen(3))
    pipe.scheduler.set_timesteps(4)
    a = pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps[0]]
    assert torch.allclose(latents[0, :, 4:], a.sqrt() * z + (1 - a).sqrt() * noise[0, :, 4:], atol=1e-5)
    assert torch.equal(latents[:, :, :4], noise[:, :, :4])


def test_sample_with_mask_priors_starts_from_them(pipe):
    spy = UNetSpy(pipe)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:1].clone()))
    try:
        out = A.sample_with_mask_priors(pipe, "a dog and a ball", PROMPTS, boxes=[(0, 0, 16, 16), (16, 16, 32, 32)],
                                        num_inference_steps=2, height=SIZE, width=SIZE, generator=gen(4),
                                        guidance="cfg", output_type="np")
    finally:
        hook.remove()
        spy.close()
    expected = A.mask_prior_latents(pipe, A.prior_masks(2, SIZE, SIZE, boxes=[(0, 0, 16, 16), (16, 16, 32, 32)]),
                                    2, gen(4))
    assert torch.allclose(seen[0], expected, atol=1e-6)
    assert out.masks.shape == (1, 3, SIZE, SIZE)


def test_prior_masks_from_masks():
    a = np.zeros((8, 8), np.uint8)
    a[:4] = 255
    priors = A.prior_masks(1, 8, 8, masks=[a])
    assert np.array_equal(priors[1], a) and np.array_equal(priors[0], 255 - a)


def test_iterative_generation_builds_four_layers(pipe):
    boxes = [(0, 0, 16, 32), None, (16, 16, 32, 32)]
    result = A.iterative_generation(pipe, "a park", ["a tree", "a bench", "a dog"], boxes=boxes,
                                    num_inference_steps=2, height=SIZE, width=SIZE, generator=gen(5))
    layers = result.layers
    assert layers.num_layers == 4 and layers.layer_prompts == ["the background", "a tree", "a bench", "a dog"]
    assert len(result.steps) == 3
    LayeredImage.from_arrays(layers.images, layers.masks)  # one-hot, background = complement (checked there)
    first = result.steps[0].layered(0)
    assert np.array_equal(layers.images[0], first.images[0]) and np.array_equal(layers.images[1], first.images[1])
    # the last step's new layer is front-most: its mask is kept whole
    assert np.array_equal(layers.masks[3], result.steps[2].masks[0, 1])
    # each step held the merged image (Eq. 4 of the layers so far) as its background image latent
    assert result.steps[2].layer_prompts == ["the background", "a dog"]
    so_far = first.with_foreground(result.steps[1].layer_images[0, 1], result.steps[1].masks[0, 1], "a bench")
    z_merged = A.encode_layers(pipe, [so_far.composite], [so_far.masks[0]], (SIZE, SIZE))
    assert torch.allclose(result.steps[2].latents[:, 0, :4], z_merged[:, 0, :4], atol=1e-5)  # VAE batch of 1 vs 2


BAD = [
    (lambda p, s: A.sample_with_mask_priors(p, "g", PROMPTS, boxes=[(0, 0, 8, 8)], height=SIZE, width=SIZE),
     "1 boxes for 2 foreground"),
    (lambda p, s: A.sample_with_mask_priors(p, "g", PROMPTS, boxes=[(0, 0, 8, 8), (20, 20, 40, 30)],
                                            height=SIZE, width=SIZE), "outside"),
    (lambda p, s: A.sample_with_mask_priors(p, "g", PROMPTS, boxes=[(0, 0, 8, 8), (5, 5, 5, 9)],
                                            height=SIZE, width=SIZE), "empty"),
    (lambda p, s: A.sample_with_mask_priors(p, "g", [], boxes=[]), "no layer prompts"),
    (lambda p, s: A.layer_inpaint(p, s, {}), "no target layers"),
    (lambda p, s: A.layer_inpaint(p, s, {5: "x"}), "outside the source's layers"),
    (lambda p, s: A.layer_style_transfer(p, s, [1]), "style"),
    (lambda p, s: A.layer_style_transfer(p, s, [1], style="x", strength=1.5), "strength"),
    (lambda p, s: A.iterative_generation(p, "g", ["a", "b"], boxes=[None]), "1 boxes for 2"),
    (lambda p, s: A.iterative_generation(p, "g", []), "no foreground prompts"),
    (lambda p, s: A.layer_inpaint(p, s.to_sample(), {1: "x"}), "must be a LayeredImage"),
    (lambda p, s: A.layer_style_transfer(p, s.replace(layer_prompts=[]), [1], style="x"), "0 layer prompts"),
]


@pytest.mark.parametrize(("call", "message"), BAD)
def test_bad_input_refused_before_any_unet_call(pipe, source, call, message):
    spy = UNetSpy(pipe)
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            call(pipe, source)
    finally:
        spy.close()
    assert spy.calls == []


def test_applications_cli(pipe, source, tmp_path):
    from cli.main import layerdiff_main
    from model.sampling.export import load_output

    run_dir = tmp_path / "run"
    pipe.save_pretrained(run_dir)
    src = save_output(tmp_path / "src", source)
    common = ["--model", str(run_dir), "--steps", "2", "--device", "cpu"]
    assert layerdiff_main(["inpaint", "--source", str(src), "--layer", "1=a blue cube", "--out", str(tmp_path / "a"),
                           *common]) == 0
    edited = load_output(tmp_path / "a")
    assert edited.image.layer_prompts == ["the background", "a blue cube", "a dog"]
    assert edited.meta.extra["application"] == "inpaint"
    assert layerdiff_main(["iterative", "--prompt", "a park", "--add", "a tree", "--boxes", "0,0,16,32",
                           "--source", str(src), "--out", str(tmp_path / "b"), *common]) == 0
    assert load_output(tmp_path / "b").image.layer_prompts == PROMPTS + ["a tree"]
    assert layerdiff_main(["inpaint", "--source", str(src), "--layer", "cat", "--out", str(tmp_path / "c"),
                           *common]) == 2
    assert not (tmp_path / "c").exists()
