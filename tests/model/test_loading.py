"""Shared loading code: SD components (tiny through the real path), prompt encoding, clear refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
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


# ---- CLIP scorer ------------------------------------------------------------------------------------------


def _clip_embeddings(scorer, image):
    with torch.no_grad():
        pixels = scorer.preprocess(image).unsqueeze(0)  # (1, 3, 64, 64)
        tokens = scorer.tokenizer(["a photo of a cat", "a red square"])  # (2, 77)
        return scorer.model.encode_image(pixels), scorer.model.encode_text(tokens)


@pytest.fixture(scope="module")
def red_image():
    from PIL import Image

    return Image.new("RGB", (96, 80), (200, 20, 20))


def test_tiny_clip_scorer_loads_through_the_real_code(tiny_models, red_image):
    from model.loading import load_clip_scorer

    scorer = load_clip_scorer("tiny")
    assert not scorer.model.training and not any(p.requires_grad for p in scorer.model.parameters())
    assert type(scorer.model.visual).__name__ == "ModifiedResNet"  # RN50's classes
    tokens = scorer.tokenizer(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    image_emb, text_emb = _clip_embeddings(scorer, red_image)
    assert image_emb.shape == (1, 32) and text_emb.shape == (2, 32)
    assert not torch.allclose(text_emb[0], text_emb[1])
    image_again, text_again = _clip_embeddings(load_clip_scorer("tiny"), red_image)
    torch.testing.assert_close(image_emb, image_again, rtol=0, atol=0)
    torch.testing.assert_close(text_emb, text_again, rtol=0, atol=0)


def test_clip_weights_file_path_matches_folder(tiny_models, tmp_path, red_image):
    """The real-RN50 path (arch + a state-dict file, weights_only) gives the folder's outputs."""
    import open_clip
    from safetensors.torch import load_file

    from model.loading import load_clip_scorer

    folder = tiny_models / "clip"
    arch = "layerdiff-test-tiny-clip"
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    weights = tmp_path / "tiny-clip.pt"
    torch.save(load_file(str(folder / "open_clip_model.safetensors")), weights)

    from_file = load_clip_scorer("real", weights, arch=arch)
    image_file, text_file = _clip_embeddings(from_file, red_image)
    image_dir, text_dir = _clip_embeddings(load_clip_scorer("tiny"), red_image)
    torch.testing.assert_close(text_file, text_dir, rtol=0, atol=0)
    torch.testing.assert_close(image_file, image_dir, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_clip_scorer_refusals(tiny_models, tmp_path, monkeypatch):
    from model.loading import load_clip_scorer

    monkeypatch.delenv("LAYERDIFF_CLIP_RN50", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="LAYERDIFF_CLIP_RN50"):
        load_clip_scorer("real")
    with pytest.raises(FileNotFoundError, match="CLIP weights not found"):
        load_clip_scorer("real", tmp_path / "RN50.pt")
    with pytest.raises(ValueError, match="open_clip_config.json is missing"):
        load_clip_scorer("real", tmp_path)
    scripted = torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    scripted.save(str(tmp_path / "RN50.pt"))
    with pytest.raises(ValueError, match="TorchScript archive"):
        load_clip_scorer("real", tmp_path / "RN50.pt")


# ---- FID extractor ----------------------------------------------------------------------------------------


def _gradient_images(folder, n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0  # (64, 64)
    for i in range(n):
        a, b, c = rng.uniform(0, 1, (3, 3))
        img = np.stack([a[k] * xx + b[k] * yy + 0.3 * c[k] for k in range(3)], -1)  # (64, 64, 3)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return str(folder)


def _noise_images(folder, n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return str(folder)


def test_tiny_fid_extractor_with_torch_fidelity(tiny_models, tmp_path):
    import torch_fidelity

    from model.loading import load_fid_extractor

    extractor = load_fid_extractor("tiny")
    assert extractor.name == "layerdiff-conv" and extractor.weights_path == str(tiny_models / "fid-extractor")
    assert load_fid_extractor("tiny") == extractor  # registering twice is fine

    def fid(a, b):
        metrics = torch_fidelity.calculate_metrics(input1=a, input2=b, fid=True, cuda=False, verbose=False,
                                                   cache=False, save_cpu_ram=True, **extractor.metric_kwargs())
        return metrics["frechet_inception_distance"]

    smooth = _gradient_images(tmp_path / "smooth", 24, seed=0)
    smooth_too = _gradient_images(tmp_path / "smooth-too", 24, seed=1)
    noise = _noise_images(tmp_path / "noise", 24, seed=2)
    same, close, far = fid(smooth, smooth), fid(smooth, smooth_too), fid(smooth, noise)
    assert abs(same) < 1e-4
    assert 0 < close < far and far > 0.5


def test_conv_extractor_rejects_float_images(tiny_models):
    from torch_fidelity.utils import create_feature_extractor

    from model.loading import load_fid_extractor

    ext = load_fid_extractor("tiny")
    net = create_feature_extractor(ext.name, ["features"], cuda=False, verbose=False,
                                   feature_extractor_weights_path=ext.weights_path)
    (features,) = net(torch.zeros(2, 3, 48, 48, dtype=torch.uint8))
    assert features.shape == (2, 64)
    with pytest.raises(ValueError, match="expected uint8 images"):
        net(torch.zeros(2, 3, 48, 48))


def test_fid_extractor_refusals(tmp_path, monkeypatch):
    from model.loading import load_fid_extractor

    monkeypatch.delenv("LAYERDIFF_FID_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="LAYERDIFF_FID_WEIGHTS"):
        load_fid_extractor("real")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_fid_extractor("real", tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_fid_extractor("real", tmp_path)
    torch.save({"fc.weight": torch.zeros(2, 2), "note": object.__new__(SDComponents)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        load_fid_extractor("real", tmp_path / "evil.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "inception.pth")
    monkeypatch.setenv("LAYERDIFF_FID_WEIGHTS", str(tmp_path / "inception.pth"))
    real = load_fid_extractor("real")
    assert (real.name, real.weights_path, real.feature_layer) == (
        "inception-v3-compat", str(tmp_path / "inception.pth"), "2048")
