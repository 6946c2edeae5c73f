"""Tiny presets: written in each library's format, deterministic, real CLIP tokenizer, a working SD pipeline."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from cli.main import layerdiff_main
from model.tiny import TinySDConfig, build_sd_pipeline, build_tiny_models
from model.tokenizer import build_clip_tokenizer

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_presets_are_written_in_library_formats(tiny_models):
    for name, cls in [("sd15", "StableDiffusionPipeline"), ("sd15-inpaint", "StableDiffusionInpaintPipeline")]:
        index = json.loads((tiny_models / name / "model_index.json").read_text())
        assert index["_class_name"] == cls
        assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
        for sub in ("unet", "vae"):
            assert (tiny_models / name / sub / "diffusion_pytorch_model.safetensors").is_file()
        assert (tiny_models / name / "text_encoder" / "model.safetensors").is_file()
        assert (tiny_models / name / "tokenizer" / "vocab.json").is_file()
        assert not list((tiny_models / name).rglob("*.bin"))
        unet_cfg = json.loads((tiny_models / name / "unet" / "config.json").read_text())
        assert unet_cfg["in_channels"] == (9 if "inpaint" in name else 4) and unet_cfg["out_channels"] == 4
        sched = json.loads((tiny_models / name / "scheduler" / "scheduler_config.json").read_text())
        assert sched["_class_name"] == "DDIMScheduler" and sched["steps_offset"] == 1
        assert sched["beta_schedule"] == "scaled_linear" and sched["clip_sample"] is False
    assert (tiny_models / "clip" / "open_clip_config.json").is_file()
    assert (tiny_models / "clip" / "open_clip_model.safetensors").is_file()
    assert (tiny_models / "fid-extractor" / "model.safetensors").is_file()
    assert not list(tiny_models.glob(".*.tmp"))


def test_two_builds_give_identical_files(tiny_models, tmp_path):
    build_tiny_models(tmp_path, only=("sd15", "clip", "fid-extractor"))
    files = [p for p in (tmp_path).rglob("*") if p.is_file()]
    assert len(files) >= 12
    for path in files:
        twin = tiny_models / path.relative_to(tmp_path)
        assert path.read_bytes() == twin.read_bytes(), f"{path.relative_to(tmp_path)} differs between builds"


def test_build_leaves_caller_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_models(tmp_path, only=("fid-extractor",))
    assert torch.equal(torch.rand(3), expected)


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny preset.*nope"):
        build_tiny_models(tmp_path, only=("nope",))


def test_cli_logs_one_line_per_preset_and_builds_only_missing_ones(tmp_path, caplog):
    root = tmp_path / "root"
    with caplog.at_level(logging.INFO, logger="cli.tiny_models"):
        assert layerdiff_main(["tiny-models", "--out", str(root), "--only", "clip", "fid-extractor"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "cli.tiny_models"]
    assert len(lines) == 2 and "clip" in lines[0] and "fid-extractor" in lines[1]
    assert (root / "clip" / "open_clip_config.json").is_file()
    weights = next((root / "clip").glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    (root / ".sd15.tmp").mkdir()  # a build interrupted earlier: never taken for a finished preset
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cli.tiny_models"):
        assert layerdiff_main(["tiny-models", "--out", str(root), "--only", "clip", "sd15", "--missing-only"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "cli.tiny_models"]
    assert len(lines) == 1 and "sd15" in lines[0]  # clip existed and was kept as it was
    assert weights.stat().st_mtime_ns == before and not (root / ".sd15.tmp").exists()
    assert (root / "sd15" / "model_index.json").is_file()


def test_clip_tokenizer_is_the_real_one(tiny_models):
    import open_clip
    from transformers import CLIPTokenizer

    built = build_clip_tokenizer()
    saved = CLIPTokenizer.from_pretrained(tiny_models / "sd15", subfolder="tokenizer")
    assert len(built) == len(saved) == 49408
    assert built("a photo of a cat").input_ids == saved("a photo of a cat").input_ids == CAT_IDS
    assert saved.model_max_length == 77 and saved.pad_token_id == 49407
    reference = open_clip.get_tokenizer("RN50")  # open_clip's own BPE implementation
    for text in ["Two dogs, playing in the SNOW!", "a red-brick house at dusk 1984"]:
        ids = saved(text).input_ids
        assert reference([text])[0][: len(ids)].tolist() == ids


def test_unet_is_sd_shaped_with_transformer_blocks():
    pipe = build_sd_pipeline(TinySDConfig())
    unet = pipe.unet
    assert unet.config.in_channels == 4 and unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert any(getattr(b, "has_cross_attention", False) for b in unet.down_blocks)
    assert any(getattr(b, "has_cross_attention", False) for b in unet.up_blocks)
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert sum(p.numel() for p in unet.parameters()) < 3_000_000


def test_pipeline_from_folder_generates(tiny_models):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models / "sd15")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and out.std() > 0
    again = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(out, again)

    inpaint = DiffusionPipeline.from_pretrained(tiny_models / "sd15-inpaint")
    assert type(inpaint).__name__ == "StableDiffusionInpaintPipeline"
    inpaint.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    filled = inpaint("", image=image, mask_image=mask, num_inference_steps=2, height=64, width=64,
                     output_type="np").images
    assert filled.shape == (1, 64, 64, 3) and np.isfinite(filled).all()


def test_pruned_tokenizer_splits_the_synthetic_prompts_like_clip(tmp_path):
    from transformers import CLIPTokenizer

    from mlcid.synthetic import SceneConfig, make_scene, prompt_vocabulary
    from model.tokenizer import write_clip_vocab_files

    vocabulary = prompt_vocabulary()
    full, small = build_clip_tokenizer(), build_clip_tokenizer(texts=vocabulary)
    assert 512 < len(small) < 1000  # bytes, the merges these words use, two specials
    cfg = SceneConfig(size=32, min_foregrounds=1, max_foregrounds=3, background_patterns=("plain", "stripes"))
    prompts = [p for i in range(20) for p in
               [make_scene(cfg, 0, i).global_prompt, *[la.prompt for la in make_scene(cfg, 0, i).layers]]]
    for text in prompts + ["an orange star in front of a cyan hexagon", "the background"]:
        assert small.tokenize(text) == full.tokenize(text), text
    assert small("a red circle").input_ids[0] == small.bos_token_id == len(small) - 2
    assert small("a red circle").input_ids[-1] == small.eos_token_id == len(small) - 1
    unknown = small.tokenize("zebra")  # not in the vocabulary: byte pieces, never an unknown token
    assert "".join(unknown) == "zebra</w>" and len(unknown) > 1 and small.unk_token_id not in small.convert_tokens_to_ids(unknown)
    write_clip_vocab_files(tmp_path, vocabulary)  # the files a pipeline folder carries reload to the same tokenizer
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("a striped green background").input_ids == small("a striped green background").input_ids


def test_tiny_sd_with_a_pruned_vocabulary_sizes_its_text_encoder():
    from mlcid.synthetic import prompt_vocabulary

    pipe = build_sd_pipeline(TinySDConfig(vocabulary=tuple(prompt_vocabulary())))
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) < 1000
    ids = pipe.tokenizer("a yellow triangle", return_tensors="pt").input_ids
    assert pipe.text_encoder(ids).last_hidden_state.shape == (1, ids.shape[1], 32)
