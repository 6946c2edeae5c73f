"""Sampling speed levers keep their promise: SMG on a window of steps runs SMG exactly there (and is plain CFG
elsewhere), and `make bench-sample` writes its ratios to JSON."""

from __future__ import annotations

import pytest
import torch

from model.sampling.pipeline import CALLBACK_TENSOR_INPUTS
from tests.builders import UNetSpy

PROMPTS = ["the background", "a red ball", "a dog"]
SIZE = 32

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread on shared cores


def per_step_latents(pipe, **kw) -> tuple[list[torch.Tensor], list[int]]:
    """Latents after every step and the UNet batch sizes of the whole call."""
    seen = []
    spy = UNetSpy(pipe)
    try:
        pipe("a dog with a red ball", PROMPTS, num_inference_steps=4, height=SIZE, width=SIZE,
             generator=torch.Generator().manual_seed(0), output_type="latent",
             callback_on_step_end=lambda _p, _i, _t, d: seen.append(d["latents"].clone()) and None,
             callback_on_step_end_tensor_inputs=CALLBACK_TENSOR_INPUTS[:1], **kw)
    finally:
        spy.close()
    return seen, [c[0] for c in spy.calls]


def test_smg_window_runs_smg_only_inside_it(pipe):
    full, full_calls = per_step_latents(pipe, guidance="cfg+smg")
    cfg, _ = per_step_latents(pipe, guidance="cfg")
    early, early_calls = per_step_latents(pipe, guidance="cfg+smg", smg_end=0.5)
    late, late_calls = per_step_latents(pipe, guidance="cfg+smg", smg_start=0.5)
    assert full_calls == [2, 1] * 4
    assert early_calls == [2, 1, 2, 1, 2, 2] and late_calls == [2, 2, 2, 1, 2, 1]
    same = [torch.equal(a, b) for a, b in zip(early, full)]
    assert same == [True, True, False, False]  # SMG steps 0–1 as the full run, then CFG only
    assert [torch.equal(a, b) for a, b in zip(late, cfg)] == [True, True, False, False]
    assert not torch.allclose(late[-1], full[-1], atol=1e-4)
    window_all, _ = per_step_latents(pipe, guidance="cfg+smg", smg_start=0.0, smg_end=1.0)
    assert all(torch.equal(a, b) for a, b in zip(window_all, full))


@pytest.mark.parametrize(("start", "end"), [(0.5, 0.5), (-0.1, 1.0), (0.0, 1.5)])
def test_bad_smg_window_is_refused_before_any_unet_call(pipe, start, end):
    spy = UNetSpy(pipe)
    try:
        with pytest.raises(ValueError, match="smg_start < smg_end"):
            pipe("g", PROMPTS, num_inference_steps=2, height=SIZE, width=SIZE, smg_start=start, smg_end=end)
    finally:
        spy.close()
    assert spy.calls == []


@pytest.mark.slow
def test_compiled_unet_matches_eager():
    """`unet.compile()` (torch.compile in place) is an option: same outputs within 1e-4. Compiling takes ~11 min
    on a loaded 2-core CPU (1.4e-5 max difference measured there)."""
    from model.network.unet import LayerDiffUNet
    from tests.builders import make_inputs, randomize_new_modules, tiny_sd_unet

    model = LayerDiffUNet.from_unet(tiny_sd_unet(), max_layers=4).eval()
    randomize_new_modules(model)
    inputs = make_inputs(B=2, L=3)
    with torch.no_grad():
        eager = model(**inputs).sample
        model.compile()
        compiled = model(**inputs).sample
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- prompts prepared once per call (exact)


@pytest.mark.parametrize("use_prompt_enhancer", [True, False])
def test_prepared_text_gives_the_raw_forward_outputs(use_prompt_enhancer):
    """`forward(..., prepared=prepare_text(...))` = the forward from raw text (padding layers, a slice too)."""
    from tests.model.test_unet import make_inputs, randomize_new_modules, tiny_sd_unet

    from model.network.unet import LayerDiffUNet

    model = LayerDiffUNet.from_unet(tiny_sd_unet(), max_layers=4, use_prompt_enhancer=use_prompt_enhancer).eval()
    randomize_new_modules(model)
    inputs = make_inputs(B=3, L=3)
    valid = torch.tensor([[True, True, False], [True, True, True], [True, False, True]])
    with torch.no_grad():
        raw = model(**inputs, layer_valid=valid).sample
        prepared = model.prepare_text(inputs["global_text"], inputs["layer_text"], valid)
        assert len(prepared.context.intra_kv) == len(model.collab_blocks())
        fast = model(inputs["sample"], inputs["timesteps"], prepared.global_text, prepared.layer_text, valid,
                     prepared=prepared).sample
        part = prepared[slice(1, 3)]
        sliced = model(inputs["sample"][1:], inputs["timesteps"][1:], part.global_text, part.layer_text,
                       part.layer_valid, prepared=part).sample
    torch.testing.assert_close(fast, raw, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sliced, raw[1:], atol=1e-6, rtol=1e-5)


def test_prepared_text_is_refused_with_other_tensors():
    from tests.model.test_unet import make_inputs, tiny_sd_unet

    from model.network.unet import LayerDiffUNet

    model = LayerDiffUNet.from_unet(tiny_sd_unet(), max_layers=4).eval()
    inputs = make_inputs(B=1, L=2)
    prepared = model.prepare_text(inputs["global_text"], inputs["layer_text"])
    with torch.no_grad(), pytest.raises(ValueError, match="`prepared` was made from other tensors"):
        model(inputs["sample"], 10, inputs["global_text"].clone(), inputs["layer_text"], prepared=prepared)


@pytest.fixture
def count_calls():
    """count_calls(module) → a list that grows by one per forward of `module` (hooks removed after the test)."""
    handles = []

    def count(module: torch.nn.Module) -> list:
        calls: list = []
        handles.append(module.register_forward_pre_hook(lambda *_: calls.append(1)))
        return calls

    yield count
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("kw", [dict(guidance="cfg+smg"), dict(guidance="cfg+smg", max_batch=1),
                                dict(guidance="cfg", guidance_scale=1.0)])
def test_text_prepared_once_per_call_same_samples(pipe, count_calls, kw):
    """The sampler prepares the prompts once per call (prompt enhancer: 1 run, each block's intra-layer K/V:
    1 projection) and samples exactly what the per-step text path (`cache_text = False`) samples."""
    enhancer = count_calls(pipe.unet.prompt_enhancer)
    to_k = count_calls(pipe.unet.collab_blocks()[0].collab.intra_attn.to_k)
    n_unet = len(per_step_latents(pipe, **kw)[1])
    cached, _ = per_step_latents(pipe, **kw)
    assert (len(enhancer), len(to_k)) == (2, 2)  # two calls, once each
    pipe.cache_text = False
    try:
        per_step, calls = per_step_latents(pipe, **kw)
    finally:
        pipe.cache_text = True
    assert len(enhancer) == 2 + len(calls) == 2 + n_unet and len(to_k) == len(enhancer)  # once per UNet call
    assert n_unet > 2
    for a, b in zip(cached, per_step, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
