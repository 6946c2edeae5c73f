"""The pipeline GPU benchmark: its tiny CPU run works end to end; its full-size models have the real sizes."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.pipeline_gpu import BenchConfig, instructblip, main, owlv2, run, sam, sd_inpaint


def test_tiny_run_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--tiny", "--stages", "segment", "detect", "--samples", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["stage"] for r in report["stages"]] == ["segment", "detect"]
    assert all(r["s_per_sample"] > 0 and r["samples"] == 2 for r in report["stages"])
    total = sum(r["s_per_sample"] for r in report["stages"])
    assert report["gpu_hours_per_total_samples"] == pytest.approx(total * 2_000_000 / 3600)
    assert "GPU-hours for 2,000,000 samples" in capsys.readouterr().out
    assert report["device"] == "cpu" and report["tiny"] is True


@pytest.mark.slow
def test_tiny_run_every_stage():
    report = run(BenchConfig.tiny_profile(samples=2))
    assert [r["stage"] for r in report["stages"]] == ["caption", "detect", "segment", "object_caption", "inpaint"]
    assert all(r["s_per_sample"] > 0 for r in report["stages"])


def test_tiny_caption_generates_a_fixed_number_of_tokens(monkeypatch):
    """The benchmark times a fixed amount of decoding: every caption is exactly `caption_tokens` long."""
    from transformers import InstructBlipForConditionalGeneration

    real_generate, lengths = InstructBlipForConditionalGeneration.generate, []

    def recording_generate(self, *args, **kwargs):
        out = real_generate(self, *args, **kwargs)  # (B, T) token ids
        lengths.append(out.shape[-1])
        return out

    monkeypatch.setattr(InstructBlipForConditionalGeneration, "generate", recording_generate)
    per_run = {}
    for tokens in (5, 9):
        lengths.clear()
        report = run(BenchConfig.tiny_profile(stages=("caption",), samples=2, caption_tokens=tokens))
        assert report["stages"][0]["stage"] == "caption" and report["stages"][0]["dropped"] == 0
        assert len(set(lengths)) == 1, lengths  # warm-up and timed batches decode the same length
        per_run[tokens] = lengths[0]
    assert per_run[9] - per_run[5] == 4  # the output grows token for token with the setting (offsets cancel)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_architectures_have_the_real_sizes():
    """Built on the meta device (no memory, no weights): parameter counts of the published checkpoints."""
    cfg, meta = BenchConfig(), torch.device("meta")
    blip, processor = instructblip(cfg, meta)
    assert 3.9e9 < _params(blip) < 4.1e9  # InstructBLIP Flan-T5-XL ≈ 4.0B
    # the offline processor fits the model: its ids are in range and `<image>` is the model's image token
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == blip.config.image_token_index
    assert len(processor.tokenizer) <= blip.config.text_config.vocab_size
    assert len(processor.qformer_tokenizer) <= blip.config.qformer_config.vocab_size
    assert processor.num_query_tokens == blip.config.num_query_tokens == 32
    assert processor.image_processor.size == {"height": 224, "width": 224} == {
        "height": blip.config.vision_config.image_size, "width": blip.config.vision_config.image_size}
    owl, processor = owlv2(cfg, meta)
    assert 150e6 < _params(owl) < 160e6 and owl.config.vision_config.image_size == 960  # OWLv2-B/16 ≈ 155M
    assert processor.image_processor.size == {"height": 960, "width": 960}
    assert 630e6 < _params(sam(cfg, meta)) < 645e6  # SAM ViT-H ≈ 641M
    pipe = sd_inpaint(cfg, meta)
    assert pipe.unet.config.in_channels == 9
    assert round(_params(pipe.unet) / 1e6, 1) == 859.5  # SD 1.5 UNet (inpainting: 9 input channels)
    assert round(_params(pipe.vae) / 1e6, 1) == 83.7
    assert round(_params(pipe.text_encoder) / 1e6, 1) == 123.1  # CLIP ViT-L/14 text encoder
