"""Evaluation driver: prompts by layer count, cached reference statistics, refusals, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import layerdiff_main
from mlcid.layered import LayeredImage
from model.evaluation.config import EvalConfig
from model.evaluation.evaluate import Prompt, collect_prompts, evaluate, score_sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread on shared cores

SIZE = 32  # sampling and eval size in these tests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD 1.5 / CLIP / FID-extractor presets, a LayerDiff run built from the tiny SD, and MLCID test shards."""
    from mlcid.synthetic import SceneConfig, write_dataset
    from model.loading import load_sd_components
    from model.sampling.pipeline import LayerDiffPipeline
    from model.tiny import build_tiny_models
    from model.network.unet import LayerDiffUNet

    root = tmp_path_factory.mktemp("eval")
    build_tiny_models(root / "tiny", only=("sd15", "clip", "fid-extractor"))
    parts = load_sd_components(root / "tiny" / "sd15")
    LayerDiffPipeline(unet=LayerDiffUNet.from_unet(parts.unet), vae=parts.vae, text_encoder=parts.text_encoder,
                      tokenizer=parts.tokenizer, scheduler=parts.scheduler).save_pretrained(root / "run")
    write_dataset(root / "raw", root / "mlcid", samples=24, seed=0, shards=2, config=SceneConfig(size=64),
                  progress=False)
    return {"root": root, "tiny": root / "tiny", "run": root / "run",
            "data": root / "mlcid" / "mlcid-{000000..000001}.tar"}


def _config(tiny, out, **overrides) -> EvalConfig:
    kwargs = dict(model=str(tiny["run"]), data=[str(tiny["data"])], out=str(out), preset="tiny", per_group=2,
                  num_inference_steps=2, size=SIZE, sd_size=SIZE, eval_size=SIZE, batch_size=8, progress=False,
                  sd_model=str(tiny["tiny"] / "sd15"), clip_model=str(tiny["tiny"] / "clip"),
                  fid_weights=str(tiny["tiny"] / "fid-extractor"))
    return EvalConfig(**(kwargs | overrides))


def test_prompts_grouped_by_layer_count(tiny, tmp_path):
    from mlcid.reader import MLCIDReader

    prompts = collect_prompts(_config(tiny, tmp_path, per_group=3))
    assert sorted(p.num_layers for p in prompts) == [2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert [p.index for p in prompts] == list(range(9)) and len({p.name for p in prompts}) == 9
    samples = {s.key: s for s in MLCIDReader(str(tiny["data"]))}
    for p in prompts:
        sample = samples[p.key]
        assert (p.global_prompt, p.layer_prompts, p.num_layers) == (
            sample.global_prompt, sample.layer_prompts, sample.num_layers)
        assert p.layer_prompts[0] == "the background"
    with pytest.raises(ValueError, match="too few valid samples"):
        collect_prompts(_config(tiny, tmp_path, per_group=50))


def test_config_refuses_bad_settings(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        _config(tiny, tmp_path, rows=("sd15", "dalle"))
    with pytest.raises(ValueError, match="per_group"):
        _config(tiny, tmp_path, per_group=1)
    with pytest.raises(ValueError, match="smg_scale"):
        _config(tiny, tmp_path, smg_scale=float("nan"))


def test_reference_statistics_are_cached(tiny, tmp_path, monkeypatch):
    import model.evaluation.features as features_mod
    from model.evaluation.features import FidFeatures, reference_stats
    from model.loading import load_fid_extractor

    features = FidFeatures(load_fid_extractor("tiny", tiny["tiny"] / "fid-extractor"), batch_size=8)
    groups = ["2", "3", "4", "all"]
    first = reference_stats(str(tiny["data"]), features, tmp_path, SIZE, groups, progress=False)
    assert first["all"].count == 24 and sum(first[g].count for g in "234") == 24
    assert len(list(tmp_path.glob("ref-*.npz"))) == 4 and len(list(tmp_path.glob("ref-*.json"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("shards were read although the statistics are cached")

    monkeypatch.setattr(features_mod, "MLCIDReader", no_reading)
    again = reference_stats(str(tiny["data"]), features, tmp_path, SIZE, groups, progress=False)
    for g in groups:
        np.testing.assert_array_equal(again[g].mu, first[g].mu)
        np.testing.assert_array_equal(again[g].sigma, first[g].sigma)
    with pytest.raises(AssertionError, match="cached"):  # another size is another key: recomputed
        reference_stats(str(tiny["data"]), features, tmp_path, 48, groups, progress=False)


def test_layer_clip_score_sees_each_foreground_over_the_neutral_fill(tiny):
    from model.evaluation.features import ClipEmbedder
    from model.loading import load_clip_scorer

    clip = ClipEmbedder(load_clip_scorer("tiny", tiny["tiny"] / "clip"))
    seen: list[np.ndarray] = []
    original = clip.images
    clip.images = lambda images: (seen.extend(images), original(images))[1]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(3)]
    m1 = np.zeros((SIZE, SIZE), np.uint8)
    m1[4:12, 4:20] = 255
    m2 = np.zeros_like(m1)
    m2[20:30, 10:30] = 255
    layers = LayeredImage.from_arrays(images, [m1, m2])
    prompt = Prompt(index=0, key="k", num_layers=3, global_prompt="a ball and a cube",
                    layer_prompts=["the background", "a ball", "a cube"])
    config = EvalConfig(model="", data=["x"], out="", layer_fill=(10, 20, 30))
    scores = score_sample(clip, prompt, layers.composite, layers, config)
    assert len(seen) == 3 and len(scores["layer_cs"]) == 2
    np.testing.assert_array_equal(seen[0], layers.composite)
    for img, mask, got in zip(images[1:], (m1, m2), seen[1:]):
        np.testing.assert_array_equal(got[mask > 0], img[mask > 0])
        assert (got[mask == 0] == (10, 20, 30)).all()
    no_layers = score_sample(clip, prompt, layers.composite, None, config)
    assert no_layers["layer_cs"] is None and no_layers["cs"] == pytest.approx(scores["cs"], abs=1e-4)
    assert all(0.0 <= s <= 100.0 for s in [scores["cs"], *scores["layer_cs"]])


def test_refuses_missing_real_weights_offline(tiny, tmp_path, monkeypatch, capsys):
    for var in ("LAYERDIFF_FID_WEIGHTS", "LAYERDIFF_CLIP_RN50"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached Inception weights there
    out = tmp_path / "out"
    args = ["--model", str(tiny["run"]), "--data", str(tiny["data"]), "--out", str(out), "--no-progress"]
    assert layerdiff_main(["eval", *args]) == 2
    assert "LAYERDIFF_FID_WEIGHTS" in capsys.readouterr().err
    # Inception found (here: the tiny extractor folder), CLIP RN50 still missing
    monkeypatch.setenv("LAYERDIFF_FID_WEIGHTS", str(tiny["tiny"] / "fid-extractor"))
    assert layerdiff_main(["eval", *args]) == 2
    assert "LAYERDIFF_CLIP_RN50" in capsys.readouterr().err
    # both scorers found, SD 1.5 is a hub id that cannot load offline
    monkeypatch.setenv("LAYERDIFF_CLIP_RN50", str(tiny["tiny"] / "clip"))
    assert layerdiff_main(["eval", *args]) == 2
    assert "cannot load SD pipeline 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in capsys.readouterr().err
    assert not (out / "rows").exists() and not (out / "cache").exists()  # refused before any work
    assert layerdiff_main(["eval", "--model", str(tmp_path), "--data", str(tiny["data"]), "--out", str(out),
                                  "--preset", "tiny"]) == 2
    assert "not a LayerDiff run" in capsys.readouterr().err


def _check_run(result: dict, out: Path, rows: tuple[str, ...], layer_counts: tuple[int, ...], per_group: int):
    groups = [str(n) for n in layer_counts] + ["all"]
    assert result["groups"] == groups and list(result["rows"]) == [*rows, "real"]
    on_disk = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk["rows"].keys() == result["rows"].keys()
    for name in rows:
        row = result["rows"][name]
        composites = sorted((out / "rows" / name / "composites").glob("*.png"))
        assert len(composites) == per_group * len(layer_counts)
        assert Image.open(composites[0]).size == (SIZE, SIZE)
        for g in groups:
            entry = row["groups"][g]
            assert entry["n"] == (per_group * len(layer_counts) if g == "all" else per_group)
            assert np.isfinite(entry["fid"]) and entry["fid"] >= 0
            assert 0 <= entry["cs"] <= 100
            assert (entry["layer_cs"] is None) == (name == "sd15")
    real = result["rows"]["real"]["groups"]["all"]
    assert real["fid"] is None and real["layer_cs"] is not None
    table = (out / "metrics.md").read_text(encoding="utf-8")
    head = table.splitlines()[0]
    assert head.startswith("| Method |") and head.count("FID") == len(groups) and head.count("Layer CS") == len(groups)
    labels = {"sd15": "| Stable Diffusion V1.5 |", "layerdiff": "| LayerDiff |", "layerdiff+smg": "| LayerDiff+SMG |"}
    for name in rows:
        line = next(line for line in table.splitlines() if line.startswith(labels[name]))
        assert line.count("|") == 2 + 3 * len(groups)
    assert "Preset tiny" in table


def test_evaluate_tiny_end_to_end(tiny, tmp_path):
    rows, counts = ("sd15", "layerdiff+smg"), (2,)
    result = evaluate(_config(tiny, tmp_path / "out", rows=rows, layer_counts=counts, save_layers=True))
    _check_run(result, tmp_path / "out", rows, counts, 2)
    records = [(tmp_path / "out" / "rows" / name / "records.jsonl").read_text() for name in rows]
    keys = [[json.loads(x)["key"] for x in text.splitlines()] for text in records]
    assert keys[0] == keys[1]  # same prompts for every method
    exported = sorted((tmp_path / "out" / "rows" / "layerdiff+smg" / "layers").iterdir())
    assert len(exported) == 2 and (exported[0] / "layers.psd").is_file()
    assert len(list((tmp_path / "out" / "cache").glob("ref-*.npz"))) == 2


class _Checkerboard:
    """A deterministic generator standing in for a method, to test the driver's bookkeeping only."""

    def __init__(self, scale: float):
        self.scale, self.calls = scale, 0

    def settings(self):
        return {"model": "checkerboard", "size": SIZE, "guidance_scale": self.scale}

    def __call__(self, prompt, generator):
        self.calls += 1
        tile = (np.indices((SIZE, SIZE)).sum(0) % 2 * 255).astype(np.uint8)
        return np.dstack([tile] * 3)  # (H, W, 3): a whole-image method, no layers


def test_generate_row_resumes_and_refuses_other_settings(tiny, tmp_path):
    from model.evaluation.evaluate import generate_row
    from model.evaluation.features import ClipEmbedder
    from model.loading import load_clip_scorer

    clip = ClipEmbedder(load_clip_scorer("tiny", tiny["tiny"] / "clip"))
    config = _config(tiny, tmp_path)
    prompts = [Prompt(index=i, key=str(i), num_layers=2, global_prompt=f"scene {i}",
                      layer_prompts=["the background", f"object {i}"]) for i in range(3)]
    method = _Checkerboard(1.0)
    first = generate_row("sd15", method, prompts[:2], config, clip)
    assert method.calls == 2 and sorted(first) == ["2L-00000", "2L-00001"]
    # a crash after the PNG but before the record line: that prompt is redone; finished ones are not
    (tmp_path / "rows" / "sd15" / "composites" / "2L-00001.png").unlink()
    second = generate_row("sd15", method, prompts, config, clip)
    assert method.calls == 4 and sorted(second) == ["2L-00000", "2L-00001", "2L-00002"]
    with pytest.raises(ValueError, match="other settings"):
        generate_row("sd15", _Checkerboard(2.0), prompts, config, clip)


@pytest.mark.slow
def test_evaluate_tiny_table1_all_rows_and_resume(tiny, tmp_path, monkeypatch):
    """All Table 1 rows and layer counts 2, 3, 4 through the CLI; a rerun resumes without generating."""
    out = tmp_path / "out"
    args = ["--model", str(tiny["run"]), "--data", str(tiny["data"]), "--out", str(out), "--preset", "tiny",
            "--per-group", "2", "--steps", "2", "--size", str(SIZE), "--sd-size", str(SIZE), "--eval-size", str(SIZE),
            "--sd-model", str(tiny["tiny"] / "sd15"), "--clip-model", str(tiny["tiny"] / "clip"),
            "--fid-weights", str(tiny["tiny"] / "fid-extractor"), "--no-progress"]
    assert layerdiff_main(["eval", *args]) == 0
    rows = ("sd15", "layerdiff", "layerdiff+smg")
    result = json.loads((out / "metrics.json").read_text())
    _check_run(result, out, rows, (2, 3, 4), 2)
    records = {name: (out / "rows" / name / "records.jsonl").read_text() for name in rows}

    import model.evaluation.evaluate as evaluate_mod

    monkeypatch.setattr(evaluate_mod.LayerDiffMethod, "__call__", lambda *a: pytest.fail("regenerated"))
    monkeypatch.setattr(evaluate_mod.SDBaseline, "__call__", lambda *a: pytest.fail("regenerated"))
    assert layerdiff_main(["eval", *args]) == 0
    again = json.loads((out / "metrics.json").read_text())
    for name in rows:
        assert (out / "rows" / name / "records.jsonl").read_text() == records[name]
        for g in result["groups"]:
            assert again["rows"][name]["groups"][g] == pytest.approx(result["rows"][name]["groups"][g])
