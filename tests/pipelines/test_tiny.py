"""The tiny pipeline presets: built offline, deterministic, loadable through each library's own loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.tiny import BUILDERS, build_tiny_models, clip_tokenizer, main


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_models(root)
    return root


def test_builds_every_preset_folder(root):
    assert set(BUILDERS) == {"instructblip", "owlv2", "grounding-dino", "sam", "depth-saliency"}
    for name in ("instructblip", "owlv2", "grounding-dino", "depth-saliency"):
        assert (root / name / "config.json").is_file() and (root / name / "model.safetensors").is_file()
    assert (root / "sam" / "sam.pth").is_file() and (root / "sam" / "sam_config.json").is_file()


def test_deterministic(root, tmp_path):
    build_tiny_models(tmp_path, only=["owlv2"])
    a, b = load_file(root / "owlv2" / "model.safetensors"), load_file(tmp_path / "owlv2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clip_tokenizer_is_the_real_bpe():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_depth_saliency_loads_with_auto_classes(root):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(root / "depth-saliency")
    model = AutoModelForDepthEstimation.from_pretrained(root / "depth-saliency").eval()
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    with torch.inference_mode():
        depth = model(**processor(images=[image, image], return_tensors="pt")).predicted_depth
    assert depth.ndim == 3 and depth.shape[0] == 2 and torch.isfinite(depth).all()


def test_tiny_preset_resolves_through_registry(root, monkeypatch):
    from pipelines.caption import GlobalCaption
    from pipelines.detect import GroundingDinoDetector, Owlv2Detector
    from pipelines.devices import ModelStageConfig
    from pipelines.segment import SamSegmenter

    monkeypatch.setenv("LAYERDIFF_TINY_MODELS", str(root))
    tiny = ModelStageConfig(preset="tiny", device="cpu")
    assert Owlv2Detector(tiny).model_id == str(root / "owlv2")
    assert GroundingDinoDetector(tiny).model_id == str(root / "grounding-dino")
    assert GlobalCaption(tiny).model_id == str(root / "instructblip")
    seg = SamSegmenter(tiny)
    seg.setup()
    assert seg.predictor.model.image_encoder.img_size == 64
    # an explicit override wins over the preset
    assert Owlv2Detector(ModelStageConfig(preset="tiny", model_overrides={"owlv2": "/x/y"})).model_id == "/x/y"


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out
    main(["--out", str(tmp_path), "--only", "sam"])
    assert (tmp_path / "sam" / "sam.pth").is_file() and not (tmp_path / "owlv2").exists()
    with pytest.raises(KeyError, match="unknown tiny preset"):
        build_tiny_models(tmp_path, only=["nope"])
