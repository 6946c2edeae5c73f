"""Appendix D / F.2 checked at every denoising step, not only at the end: kept layers are the re-noised originals
after each DDIM step, the edited layers follow the plain DDIM update and are generated in the kept layers'
context; style transfer starts at the strength's step from the noised input; iterative adding keeps the layers
built so far at every step of every round."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from model.sampling import applications as A
from model.sampling.pipeline import CALLBACK_TENSOR_INPUTS

SIZE = 32
PROMPTS = ["the background", "a red ball", "a dog"]
ATOL = 1e-5  # float32 arithmetic: DDIM step + x0 swap vs the closed form below

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread on shared cores


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


@dataclass
class Step:
    step: int
    t: int
    a_prev: torch.Tensor  # ᾱ of the timestep this step lands on (scheduler's final ᾱ after the last)
    latents: torch.Tensor  # (B, L, 8, h, w) after the step
    eps: torch.Tensor  # guided ε the scheduler stepped with
    x0: torch.Tensor  # the scheduler's x̂_0 (before any replacement)


class StepRecorder:
    """`callback_on_step_end` that records every step; a new pipeline call starts a new run at step 0."""

    def __init__(self):
        self.runs: list[list[Step]] = []

    def __call__(self, pipe, step, t, tensors):
        if step == 0:
            self.runs.append([])
        timesteps = [int(x) for x in pipe.scheduler.timesteps]
        k = timesteps.index(t)
        a_prev = (pipe.scheduler.alphas_cumprod[timesteps[k + 1]] if k + 1 < len(timesteps)
                  else pipe.scheduler.final_alpha_cumprod)
        self.runs[-1].append(Step(step, t, a_prev.float(), tensors["latents"].clone(),
                                  tensors["noise_pred"].clone(), tensors["pred_original_sample"].clone()))
        return {}

    kwargs = property(lambda self: dict(callback_on_step_end=self,
                                        callback_on_step_end_tensor_inputs=CALLBACK_TENSOR_INPUTS))


def renoised(x0: torch.Tensor, s: Step) -> torch.Tensor:
    """DDIM (η = 0) landing point of x0 with the step's ε: √ᾱ_prev·x0 + √(1−ᾱ_prev)·ε."""
    return s.a_prev.sqrt() * x0 + (1 - s.a_prev).sqrt() * s.eps


def assert_kept(s: Step, z0: torch.Tensor, layers, channels, final_exact=True, last=False):
    """Kept (layers, channels) are the originals re-noised with this step's ε (exactly z0 after the last step)."""
    got = s.latents[:, layers][:, :, channels]
    if last and final_exact:
        assert torch.equal(got, z0[:, layers][:, :, channels].expand_as(got)), f"step {s.step}: not exactly z0"
    else:
        want = renoised(z0.expand_as(s.latents), s)[:, layers][:, :, channels]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"step {s.step}: kept layers not re-noised z0")


def assert_generated(s: Step, z0: torch.Tensor, layers, channels):
    """Free (layers, channels) follow the model's own DDIM update and are not pinned to z0."""
    got = s.latents[:, layers][:, :, channels]
    torch.testing.assert_close(got, renoised(s.x0, s)[:, layers][:, :, channels], atol=ATOL, rtol=0)
    pinned = renoised(z0.expand_as(s.latents), s)[:, layers][:, :, channels]
    assert (got - pinned).abs().max() > 1e-3, f"step {s.step}: free layers look pinned to the originals"


SLICE_IMG, SLICE_MASK, SLICE_ALL = slice(0, 4), slice(4, 8), slice(0, 8)


def test_layer_inpaint_keeps_layers_at_every_step(pipe, source):
    rec = StepRecorder()
    out = A.layer_inpaint(pipe, source, {1: "a blue cube"}, num_inference_steps=4, generator=gen(),
                          output_type="latent", **rec.kwargs)
    z0 = A.encode_layers(pipe, source.images, source.masks, (SIZE, SIZE))  # (1, 3, 8, h, w)
    (run,) = rec.runs
    assert [s.step for s in run] == [0, 1, 2, 3]
    for s in run:
        last = s.step == 3
        assert_kept(s, z0, [0, 2], SLICE_IMG, last=last)  # image latents: x0 replaced at every step
        if s.step < A.MASK_HOLD_STEPS:
            assert_kept(s, z0, [0, 2], SLICE_MASK)  # masks held for k = 1 step ...
        else:
            assert_generated(s, z0, [0, 2], SLICE_MASK)  # ... then adapt to the new layer
        assert_generated(s, z0, [1], SLICE_ALL)  # the target is generated
    assert torch.equal(out.latents, run[-1].latents)


def test_inpainted_layer_is_generated_in_the_kept_layers_context(pipe, source):
    """Same seed, same target noise, different kept layers → a different prediction for the target layer."""
    other = source.replace(images=[255 - source.images[0], source.images[1], np.roll(source.images[2], 9, axis=1)])
    runs = []
    for src in (source, other):
        rec = StepRecorder()
        seen = []
        hook = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:1].clone()))
        try:
            A.layer_inpaint(pipe, src, {1: "a blue cube"}, num_inference_steps=3, generator=gen(2),
                            guidance="cfg", output_type="latent", **rec.kwargs)
        finally:
            hook.remove()
        runs.append((seen[0], rec.runs[0]))
    (x_a, steps_a), (x_b, steps_b) = runs
    assert torch.equal(x_a[:, 1], x_b[:, 1])  # the target layer starts from the same noise ...
    assert (x_a[:, [0, 2], :4] - x_b[:, [0, 2], :4]).abs().max() > 1e-2  # ... beside different kept layers
    eps_a, eps_b = steps_a[0].eps[:, 1], steps_b[0].eps[:, 1]
    assert (eps_a - eps_b).abs().max() > 1e-3  # the target's first prediction already sees them
    assert (steps_a[-1].latents[:, 1] - steps_b[-1].latents[:, 1]).abs().max() > 1e-3


def test_style_transfer_starts_at_strength_and_keeps_layers_at_every_step(pipe, source):
    steps, strength = 5, A.STYLE_STRENGTH
    rec = StepRecorder()
    first = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, args: first.append((args[0][:1].clone(), args[1])) and None)
    try:
        A.layer_style_transfer(pipe, source, [0], style="in Van Gogh style", num_inference_steps=steps,
                               generator=gen(3), output_type="latent", **rec.kwargs)
    finally:
        hook.remove()
    z0 = A.encode_layers(pipe, source.images, source.masks, (SIZE, SIZE))
    pipe.scheduler.set_timesteps(steps)
    all_t = [int(t) for t in pipe.scheduler.timesteps]
    start = steps - int(steps * strength)  # SDEdit: skip the first 20 % of the steps
    (run,) = rec.runs
    assert [s.t for s in run] == all_t[start:] and len(run) == 4
    # the first UNet call sees every layer noised to that step's level with the generator's noise (Eq. 1)
    x_first, t_first = first[0]  # the conditional half of the first CFG call
    assert int(t_first) == all_t[start]
    noise = torch.randn(z0.shape, generator=gen(3))
    a = pipe.scheduler.alphas_cumprod[all_t[start]]
    torch.testing.assert_close(x_first, a.sqrt() * z0 + (1 - a).sqrt() * noise, atol=ATOL, rtol=0)
    for s in run:
        assert_kept(s, z0, [1, 2], SLICE_ALL, last=s is run[-1])  # image AND mask of non-targets, every step
        assert_generated(s, z0, [0], SLICE_ALL)


def test_iterative_adding_keeps_existing_layers_at_every_step(pipe, source):
    rec = StepRecorder()
    box = (0, 0, 16, 16)
    result = A.iterative_generation(pipe, "a park", ["a cat", "a hat"], boxes=[box, None], start=source,
                                    num_inference_steps=3, height=SIZE, width=SIZE, generator=gen(5), **rec.kwargs)
    assert len(rec.runs) == 2 and all(len(run) == 3 for run in rec.runs)
    # round 1 merges the source into one background; round 2 merges the source + round 1's layer
    after_one = source.with_foreground(result.steps[0].layer_images[0, 1], result.steps[0].masks[0, 1], "a cat")
    rounds = [(source.composite, A.prior_masks(1, SIZE, SIZE, boxes=[box])),
              (after_one.composite, [np.full((SIZE, SIZE), 255, np.uint8), np.zeros((SIZE, SIZE), np.uint8)])]
    for run, (merged, priors) in zip(rec.runs, rounds):
        z0 = A.encode_layers(pipe, [merged, merged], priors, (SIZE, SIZE))  # (1, 2, 8, h, w)
        for s in run:
            assert_kept(s, z0, [0], SLICE_IMG, last=s is run[-1])  # everything built so far, at every step
            (assert_kept if s.step < A.MASK_HOLD_STEPS else assert_generated)(s, z0, [0], SLICE_MASK)
            assert_generated(s, z0, [1], SLICE_ALL)  # the new foreground
    layers = result.layers
    assert layers.layer_prompts == PROMPTS + ["a cat", "a hat"]
    assert all(np.array_equal(layers.images[i], source.images[i]) for i in range(source.num_layers))


def test_unknown_callback_tensor_is_refused(pipe):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("g", PROMPTS, num_inference_steps=1, height=SIZE, width=SIZE, callback_on_step_end=lambda *a: {},
             callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
