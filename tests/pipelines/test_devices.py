"""The shared model-stage config: device/dtype choice (bf16 where the GPU has it) and model locations."""

from __future__ import annotations

import pytest
import torch

from pipelines.devices import ModelStageConfig, device_and_dtype, half_dtype


def test_auto_dtype_prefers_bf16_on_gpus_that_have_it(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert half_dtype(cuda) == torch.bfloat16 and device_and_dtype("cuda", "auto") == (cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. T4, V100
    assert device_and_dtype("cuda", "auto") == (cuda, torch.float16)
    assert device_and_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert device_and_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    with pytest.raises(ValueError, match="unknown torch dtype"):
        device_and_dtype("cpu", "float33")


def test_model_location_order(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERDIFF_TINY_MODELS", str(tmp_path))
    (tmp_path / "owlv2").mkdir()
    assert ModelStageConfig(preset="tiny").location("owlv2") == str(tmp_path / "owlv2")
    assert ModelStageConfig(preset="tiny", model_overrides={"owlv2": "/o"}).location("owlv2") == "/o"
    assert ModelStageConfig(preset="tiny", model="/m", model_overrides={"owlv2": "/o"}).location("owlv2") == "/m"
    assert ModelStageConfig().location("owlv2") == "google/owlv2-base-patch16-ensemble"
    with pytest.raises(ValueError, match="preset must be one of real, tiny"):
        ModelStageConfig(preset="huge")
    with pytest.raises(ValueError, match="batch_size"):
        ModelStageConfig(batch_size=-1)
