"""Shared loading code: SD components (tiny through the real path), prompt encoding, clear refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model.loading import SDComponents, encode_prompts, load_sd_components, resolve_sd
from model.tiny import TinySDConfig, build_sd_pipeline


@pytest.fixture(scope="module")
def sd(tiny_models) -> SDComponents:
    return load_sd_components(resolve_sd("tiny"))


def _config_only_copy(src, dst):
    """Copy an SD folder without weights: config checks must fail before any weight is read."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_resolve_sd(tiny_models):
    assert resolve_sd("tiny") == str(tiny_models / "sd15")
    assert resolve_sd("tiny", name="sd15-inpaint") == str(tiny_models / "sd15-inpaint")
    assert resolve_sd("real") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve_sd("real", "/some/folder") == "/some/folder"
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_sd("huge")


def test_components_match_the_saved_pipeline(sd):
    from diffusers import DDIMScheduler

    assert isinstance(sd.scheduler, DDIMScheduler) and sd.scheduler.config.steps_offset == 1
    assert sd.vae_scale_factor == 8 and sd.latent_scaling == pytest.approx(0.18215)
    fresh = build_sd_pipeline(TinySDConfig())  # same seed -> the weights that were saved
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = sd.tokenizer(["a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = sd.text_encoder(ids)[0]
        torch.testing.assert_close(text, fresh.text_encoder(ids)[0], rtol=0, atol=0)
        t = torch.tensor([10, 500])
        torch.testing.assert_close(sd.unet(latents, t, text).sample, fresh.unet(latents, t, text).sample,
                                   rtol=0, atol=0)
        image = sd.vae.decode(latents).sample  # (2, 3, 64, 64)
        torch.testing.assert_close(image, fresh.vae.decode(latents).sample, rtol=0, atol=1e-5)
    assert image.shape == (2, 3, 64, 64)


def test_dtype_is_applied(tiny_models):
    half = load_sd_components(tiny_models / "sd15", dtype=torch.bfloat16)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16


def test_encode_prompts_pads_and_truncates(sd):
    long = " ".join(["cat"] * 200)
    emb = encode_prompts(sd.tokenizer, sd.text_encoder, ["a photo of a cat", "", long])
    assert emb.shape == (3, 77, 32) and emb.dtype == torch.float32 and not emb.requires_grad
    again = encode_prompts(sd.tokenizer, sd.text_encoder, ["a photo of a cat"])
    torch.testing.assert_close(emb[:1], again)
    assert not torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize("bad, error, match", [
    ([], ValueError, "empty"),
    ("a cat", TypeError, "list of strings"),
    (["a cat", None], TypeError, "every prompt must be a str"),
])
def test_encode_prompts_rejects_bad_input(sd, bad, error, match):
    with pytest.raises(error, match=match):
        encode_prompts(sd.tokenizer, sd.text_encoder, bad)


def test_inpainting_unet_channels(tiny_models):
    comps = load_sd_components(tiny_models / "sd15-inpaint", unet_in_channels=9)
    assert comps.unet.config.in_channels == 9
    with pytest.raises(ValueError, match="in_channels=9, want 4"):
        load_sd_components(tiny_models / "sd15-inpaint", unet_in_channels=4)


def test_non_sd_folder_names_what_is_missing(tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"missing unet/, vae/, text_encoder/, tokenizer/, scheduler/"):
        load_sd_components(tiny_models / "clip")
    folder = _config_only_copy(tiny_models / "sd15", tmp_path / "no-unet")
    shutil.rmtree(folder / "unet")
    with pytest.raises(ValueError, match=r"missing unet/ \(want"):
        load_sd_components(folder)


@pytest.mark.parametrize("part, key, value, match", [
    ("unet", "out_channels", 8, "UNet out_channels=8, want 4"),
    ("unet", "in_channels", 3, "UNet in_channels=3"),
    ("unet", "cross_attention_dim", 64, "cross_attention_dim=64 != text encoder hidden_size=32"),
    ("vae", "latent_channels", 16, "VAE latent_channels=16"),
    ("vae", "block_out_channels", [16, 32], r"VAE downscales ×2, want ×8"),
])
def test_misfit_configs_are_refused_before_weights_load(tiny_models, tmp_path, part, key, value, match):
    folder = _config_only_copy(tiny_models / "sd15", tmp_path / "sd")
    config_path = folder / part / "config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_sd_components(folder)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a local folder.*HF_HUB_OFFLINE=1"):
        load_sd_components("no-such-org/no-such-sd-model")
