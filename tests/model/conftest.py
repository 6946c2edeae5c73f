"""Fixtures of the sampling tests: a tiny LayerDiff pipeline (new modules randomised) and one layered sample of it."""

from __future__ import annotations

import pytest
import torch

from tests.builders import make_run

SIZE = 32  # px → 4×4 latents
PROMPTS = ["the background", "a red ball", "a dog"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """One tiny `LayerDiffPipeline` per test module, loaded back from its saved run folder."""
    from model.sampling.pipeline import LayerDiffPipeline

    p = LayerDiffPipeline.from_pretrained(make_run(tmp_path_factory.mktemp("layerdiff")))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def source(pipe):
    """A 3-layer `LayeredImage` sampled from `pipe` (2 steps, seed 0) — the input of the editing tests."""
    out = pipe("a dog with a red ball", PROMPTS, num_inference_steps=2, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.layered(0)
