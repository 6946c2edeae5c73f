"""The small VAE learn-bench trains: its config guards and its report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model.training.vae_train import MIN_CHANNELS_PER_GROUP, VAETrainConfig, build_vae, evaluate_vae


@pytest.mark.parametrize("widths, groups", [((16, 32, 64, 64), 16), ((32, 64, 64, 64), 16), ((16, 16, 16, 16), 8)])
def test_groups_of_fewer_than_four_channels_are_refused(widths, groups):
    """GroupNorm over 1–2 channels erases a flat region's colour (the learn-bench backgrounds were lost so)."""
    with pytest.raises(ValueError, match="channel\\(s\\) per group .* colour cannot pass the VAE"):
        VAETrainConfig(block_out_channels=widths, norm_num_groups=groups)
    ok = VAETrainConfig(block_out_channels=widths, norm_num_groups=min(widths) // MIN_CHANNELS_PER_GROUP)
    assert min(ok.block_out_channels) // ok.norm_num_groups == MIN_CHANNELS_PER_GROUP


def test_defaults_keep_four_channels_per_group():
    cfg = VAETrainConfig()
    assert min(cfg.block_out_channels) // cfg.norm_num_groups >= MIN_CHANNELS_PER_GROUP


def test_flat_colour_error_measures_flat_frames_of_the_mean_colours():
    """The report's flat-colour error is |decode(encode(flat)) − flat| of each image's mean colour, in 0-255."""
    torch.manual_seed(0)
    vae = build_vae(VAETrainConfig(block_out_channels=(16, 16, 16, 16), norm_num_groups=4, resolution=32))
    images = torch.rand(3, 3, 32, 32) * 2 - 1  # (N, 3, H, W)
    masks = torch.sign(torch.rand(2, 3, 32, 32) - 0.5)
    report = evaluate_vae(vae, images, masks)
    flat = images.mean((2, 3), keepdim=True).expand(images.shape)
    with torch.no_grad():
        rec = vae.decode(vae.encode(flat).latent_dist.mode()).sample.clamp(-1, 1)
    assert report["flat_colour_error"] == pytest.approx(float((rec - flat).abs().mean()) * 127.5, rel=1e-5)
    assert 0 < report["flat_colour_error"] < 255


def test_train_vae_cli_writes_a_loadable_vae_and_refuses_thin_groups(tmp_path, capsys):
    from diffusers import AutoencoderKL

    from cli.main import layerdiff_main
    from tests.builders import write_shards

    data = write_shards(tmp_path / "mlcid", shards=1, per_shard=6, size=32, fg_counts=(1, 2))
    out = tmp_path / "vae"
    assert layerdiff_main(["train-vae", "--data", data, "--out", str(out), "--steps", "2", "--batch-size", "2",
                           "--resolution", "32", "--max-samples", "6", "--block-out-channels", "16,16,16,16",
                           "--norm-num-groups", "4"]) == 0
    vae = AutoencoderKL.from_pretrained(out)
    assert tuple(vae.config.block_out_channels) == (16, 16, 16, 16) and vae.config.norm_num_groups == 4
    assert "held-out PSNR" in capsys.readouterr().out
    assert layerdiff_main(["train-vae", "--data", data, "--out", str(tmp_path / "bad"), "--block-out-channels",
                           "16,16,16,16", "--norm-num-groups", "8"]) == 2
    assert "channel(s) per group" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert layerdiff_main(["train-vae", "--data", data, "--out", str(out)]) == 2  # no --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert layerdiff_main(["train-vae", "--data", data, "--out", str(out), "--overwrite", "--steps", "3",
                           "--batch-size", "2", "--resolution", "32", "--max-samples", "6",
                           "--block-out-channels", "16,16,16,16", "--norm-num-groups", "4"]) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlcid", "vae"]  # no .partial left beside it


def test_the_tiny_vae_presets_keep_four_channels_per_group():
    from benchmarks.sample import SD15, TINY, BenchConfig
    from model.tiny import TinySDConfig

    configs = [TinySDConfig(), *(BenchConfig(**g).sd_config() for g in ({}, TINY, SD15))]
    for c in configs:
        assert min(c.vae_block_out_channels) // c.vae_norm_groups >= MIN_CHANNELS_PER_GROUP, c


def test_an_interrupted_vae_run_leaves_the_old_folder_untouched(tmp_path, monkeypatch):
    """Weights and report reach OUT together, after training: a run stopped while saving leaves OUT as it was."""
    from diffusers import AutoencoderKL

    from model.training import vae_train
    from tests.builders import write_shards

    data = write_shards(tmp_path / "mlcid", shards=1, per_shard=6, size=32, fg_counts=(1, 2))
    config = VAETrainConfig(steps=1, batch_size=2, resolution=32, max_samples=6, block_out_channels=(16,) * 4,
                            norm_num_groups=4)
    out = tmp_path / "vae"
    first = vae_train.train_vae(data, out, config, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "report.json" in before
    real_save = AutoencoderKL.save_pretrained

    def save_then_stop(self, folder, **kwargs):  # the weights are written, the report is not
        real_save(self, folder, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        vae_train.train_vae(data, out, dataclasses.replace(config, steps=2, seed=1), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert vae_train.load_report(out)["steps"] == first.steps == 1
