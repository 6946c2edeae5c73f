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
