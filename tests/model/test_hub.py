"""A run folder that fits diffusers and the Hub: wrong classes fail loudly, the custom-pipeline route loads offline,
a model card, the upload file set, the training resolution as the default size, and output.save()."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from model.hub import HUB_ALLOW_PATTERNS, RUN_CLASS_NAME, ModelCardInfo, card_info_from_training, hub_files
from model.sampling.pipeline import LayerDiffPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["the background", "a red ball", "a dog"]
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny LayerDiff run folder saved with a 32 px training resolution (random new modules)."""
    from tests.builders import make_run

    root = make_run(tmp_path_factory.mktemp("hub"))
    pipe = LayerDiffPipeline.from_pretrained(root)
    pipe.register_to_config(training_resolution=32)
    pipe.save_pretrained(root)
    return root


def test_plain_diffusers_classes_fail_loudly(run_dir: Path) -> None:
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    with pytest.raises(ValueError, match=r"(?s)custom code in pipeline\.py.*trust_remote_code"):
        DiffusionPipeline.from_pretrained(run_dir)
    with pytest.raises(OSError, match="diffusion_pytorch_model"):  # no silent random-weight SD UNet
        UNet2DConditionModel.from_pretrained(run_dir, subfolder="unet")
    index = json.loads((run_dir / "model_index.json").read_text())
    assert index["_class_name"] == RUN_CLASS_NAME and index["training_resolution"] == 32


def test_custom_pipeline_route_loads_offline(run_dir: Path) -> None:
    """diffusers' documented route runs the folder's pipeline.py, which only imports the installed package."""
    from diffusers import DiffusionPipeline

    source = (run_dir / "pipeline.py").read_text()
    assert re.findall(r"^(?:from|import) .*$", source, re.M) == [
        "from model.sampling.pipeline import LayerDiffPipeline  # noqa: F401"]
    via_diffusers = DiffusionPipeline.from_pretrained(run_dir, trust_remote_code=True)
    ours = LayerDiffPipeline.from_pretrained(run_dir)
    assert type(via_diffusers).__name__ == "LayerDiffPipeline" and via_diffusers.default_size == 32
    for a, b in zip(via_diffusers.unet.state_dict().values(), ours.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_model_card_and_upload_layout(run_dir: Path) -> None:
    text = (run_dir / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert "layerdiff" in front["tags"] and front["training_resolution"] == 32 and front["max_layers"] == 4
    from huggingface_hub import ModelCard

    assert ModelCard.load(run_dir / "README.md").data.library_name == "diffusers"  # the Hub's own parser
    # what upload_folder(allow_patterns=HUB_ALLOW_PATTERNS) pushes: the pipeline, its card and entry — no clutter
    (run_dir / "checkpoint-000003" / "unet").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoint-000003" / "optimizer.pt").write_bytes(b"x")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    files = hub_files(run_dir)
    assert {"README.md", "model_index.json", "pipeline.py", "unet/config.json",
            "unet/diffusion_pytorch_model.layerdiff.safetensors", "vae/config.json", "scheduler/scheduler_config.json",
            "text_encoder/config.json"} <= set(files)
    assert {f.split("/")[0] for f in files} <= {"README.md", "model_index.json", "pipeline.py", "unet", "vae",
                                               "text_encoder", "tokenizer", "scheduler"}
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert weights and all(f.endswith(".safetensors") for f in weights)
    assert "README.md" in HUB_ALLOW_PATTERNS


def test_card_info_from_a_training_run(tmp_path: Path) -> None:
    from model.hub import model_card
    from model.training.config import TrainConfig

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in (1, 2, 4)))
    cfg = TrainConfig(preset="real", batch_size=4, grad_accum=2)
    info = card_info_from_training(cfg, "s3://bucket/mlcid-{000000..000009}.tar extra/", 3, tmp_path)
    assert info.training_data == ["s3://bucket/mlcid-{000000..000009}.tar", "extra/"] and info.steps == 3
    assert info.metrics["final_train_loss"] == 0.25 and info.batch_size == 8 and info.resolution == 256
    front = yaml.safe_load(model_card(info).split("---")[1])
    assert front["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # a hub id: the Hub links it
    assert front["training_steps"] == 3 and front["metrics"]["final_train_loss"] == 0.25
    local = yaml.safe_load(model_card(ModelCardInfo(base_model=str(tmp_path))).split("---")[1])
    assert "base_model" not in local  # a local folder is no Hub id; the card's text still names it


def test_default_size_is_the_training_resolution(run_dir: Path) -> None:
    pipe = LayerDiffPipeline.from_pretrained(run_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a dog with a red ball", PROMPTS, num_inference_steps=1, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.layer_images.shape == (1, 3, 32, 32, 3) and out.settings["height"] == 32


def test_empty_global_prompt_is_refused(run_dir: Path, tmp_path: Path, caplog) -> None:
    pipe = LayerDiffPipeline.from_pretrained(run_dir)
    with pytest.raises(ValueError, match="global_prompt must be a non-empty string"):
        pipe("  ", PROMPTS, num_inference_steps=1)
    from cli.main import layerdiff_main

    assert layerdiff_main(["sample", "--model", str(run_dir), "--prompt", "", "--layers", "the background|a dog",
                           "--out", str(tmp_path / "o")]) == 2
    assert "--prompt is empty" in caplog.text


def test_overwrite_is_checked_before_sampling(run_dir: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    import model.sampling.sample as sample

    (tmp_path / "o").mkdir()
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before the check"))
    from cli.main import layerdiff_main

    assert layerdiff_main(["sample", "--model", str(run_dir), "--prompt", "p", "--layers", "the background|a dog",
                           "--out", str(tmp_path / "o")]) == 2
    assert "pass --overwrite to replace it" in caplog.text


def test_output_save_and_readme_quickstart(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The README's quick-start, run as written with the tiny run folder in place of runs/x."""
    from model.sampling.export import load_output

    text = README.read_text()
    block = re.search(r"## Quick start in Python\n.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 5
    monkeypatch.chdir(tmp_path)
    code = block.replace('"runs/x"', repr(str(run_dir)))
    exec(compile(code, "README quick-start", "exec"), {})  # noqa: S102 (our own README)
    loaded = load_output(tmp_path / "out" / "dog")
    assert loaded.image.layer_prompts == ["the background", "a red ball", "a dog"]  # prompts from the output
    assert loaded.meta.num_inference_steps == 50 and loaded.meta.guidance == "cfg+smg"  # settings from the output
    assert (loaded.image.width, loaded.image.height) == (32, 32)  # the run's training resolution
    assert loaded.meta.extra["height"] == 32 and np.asarray(loaded.image.composite).shape == (32, 32, 3)
