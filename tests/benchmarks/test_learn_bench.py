"""`benchmarks.learn_bench`: the held-out split is real, and a tiny end-to-end run (real trainer CLI, real pipeline)
produces the table and grid, then resumes without redoing finished stages."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mlcid.reader import MLCIDReader
from benchmarks import learn_bench as lb


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rolled_prompts_move_every_layer():
    for n in (2, 3, 4):
        prompts = [f"p{i}" for i in range(n)]
        rolled = lb._rolled(prompts)
        assert sorted(rolled) == prompts and all(a != b for a, b in zip(rolled, prompts))


def test_test_groups_use_seen_or_withheld_pairs_only():
    cfg = lb.BenchConfig(per_group=6)
    held = set(cfg.holdout_pairs)
    for group in lb.GROUPS:
        scenes = lb.test_scenes(cfg, group)
        n_fg = int(group[-2]) - 1
        assert len(scenes) == 6 and all(len(s.foregrounds) == n_fg for s in scenes)
        pairs = {(o["colour"], o["shape"]) for s in scenes for o in s.source["objects"]}
        assert (pairs <= held) if group.startswith("heldout") else not (pairs & held)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn-bench")
    torch.set_num_threads(1)
    cfg = lb.BenchConfig.smoke()
    stages = lb.run_bench(cfg, out)
    return cfg, out, stages


def test_smoke_run_trains_through_the_trainer_and_scores_every_condition(smoke_run):
    cfg, out, stages = smoke_run
    # Training data never shows a withheld pair; 2- and 3-layer scenes both present.
    reader = MLCIDReader(str(out / "data" / "mlcid"))
    samples = list(reader)
    assert len(samples) == cfg.train_samples
    assert {s.num_layers for s in samples} == {2, 3}
    assert not {(o["colour"], o["shape"]) for s in samples for o in s.source["objects"]} & set(cfg.holdout_pairs)
    # The VAE is the SD folder's VAE, with the fitted scaling factor; the run folder is the trainer's.
    vae_cfg = json.loads((out / "sd" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(stages["vae"]["scaling_factor"])
    assert json.loads((out / "run" / "model_index.json").read_text())["_class_name"] == ["pipeline", "LayerDiffPipeline"]
    steps = [json.loads(ln)["step"] for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, cfg.train_steps + 1))
    # Samples of every condition and group (sweep points equal to a main condition are not sampled twice);
    # the report covers all of them plus the ground truth.
    conditions = cfg.conditions()
    for condition, spec in conditions.items():
        if cfg.sample_source(condition)[0] != condition:
            assert not (out / "samples" / condition).exists()
            continue
        for group in lb.GROUPS:
            data = np.load(out / "samples" / condition / f"{group}.npz")
            n_layers = int(group[-2])
            assert data["images"].shape == (spec.per_group, n_layers, cfg.size, cfg.size, 3)
            assert data["masks"].shape == (spec.per_group, n_layers, cfg.size, cfg.size)
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"ground-truth", f"ground-truth@{cfg.sweep_per_group}", lb.VAE_ROUNDTRIP,
                                     *conditions}
    # The VAE's ceiling: the true test layers through the VAE, scored like samples (and shown in the report).
    roundtrip = np.load(out / "samples" / lb.VAE_ROUNDTRIP / "seen-2L.npz")
    truth = lb.test_scenes(cfg, "seen-2L")
    assert roundtrip["images"].shape == (cfg.per_group, 2, cfg.size, cfg.size, 3)
    assert not np.array_equal(roundtrip["images"][:, 0], np.stack([s.background for s in truth]))  # really decoded
    assert lb.VAE_ROUNDTRIP in results["machine"]["background_colour"]
    gt = results["table"]["ground-truth"]
    for group in lb.GROUPS:  # the metric itself is right on the truth
        assert gt[group]["colour_acc"] == 1.0 and gt[group]["background_acc"] == 1.0
        assert gt[group]["disjoint"] == 1.0 and gt[group]["composite_mae"] < 1.0
    md = (out / "results.md").read_text()
    assert "| cfg+smg | seen-2L |" in md and f"| {lb.VAE_ROUNDTRIP} | seen-2L |" in md
    assert "Shape classifier accuracy" in md and "flat-colour error" in md
    grid = Image.open(out / "grid.png")
    assert grid.width == 4 * 4 * cfg.size * 2 and grid.height > cfg.size * 2


def test_rerun_skips_finished_stages(smoke_run, caplog):
    cfg, out, _ = smoke_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done.json") if p.name != "report.done.json"}
    metrics = (out / "run" / "metrics.jsonl").read_text()
    with caplog.at_level("INFO", logger="benchmarks.learn_bench"):
        lb.run_bench(cfg, out)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done.json") if p.name != "report.done.json"}
    sampled = [c for c in cfg.conditions() if cfg.sample_source(c)[0] == c]
    assert before == after and len(before) == 6 + len(sampled)  # data vae text sd train roundtrip
    assert (out / "run" / "metrics.jsonl").read_text() == metrics
    assert "stage train: done earlier, skipped" in caplog.text


def test_more_steps_resume_the_run_and_resample(smoke_run):
    cfg, out, _ = smoke_run
    step0 = (out / "sample-step0-cfg.done.json").stat().st_mtime_ns
    longer = lb.BenchConfig.smoke()
    longer.train_steps = cfg.train_steps + 1
    stages = lb.run_bench(longer, out)
    steps = [json.loads(ln)["step"] for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, longer.train_steps + 1)) and stages["train"]["steps"] == longer.train_steps
    assert "--resume" in stages["train"]["command"]
    assert (out / "sample-step0-cfg.done.json").stat().st_mtime_ns == step0  # the step-0 samples stay valid


def test_sweep_points_equal_to_a_main_condition_reuse_its_samples():
    cfg = lb.BenchConfig()
    conditions = cfg.conditions()
    assert cfg.sample_source("smg-default@3") == ("cfg+smg", cfg.sweep_per_group)  # same variant, scale, seeds
    assert cfg.sample_source("cfg@sweep") == ("cfg", cfg.sweep_per_group)  # the sweep's scale 0
    assert cfg.sample_source("smg-inside@3") == ("smg-inside@3", cfg.sweep_per_group)
    assert cfg.sample_source("cfg+smg") == ("cfg+smg", cfg.per_group)
    assert conditions["smg-uncond@5"].smg.needs_uncond and conditions["cfg+smg"].smg == lb.SMG_VARIANTS["default"]
    # the sweep's prompts are the first test prompts of each group (same scenes, same seeds)
    few = lb.test_scenes(cfg, "seen-2L", 3)
    assert [s.global_prompt for s in few] == [s.global_prompt for s in lb.test_scenes(cfg, "seen-2L")[:3]]


def test_machine_readable_results_have_the_issue_shape(smoke_run):
    cfg, out, _ = smoke_run
    data = json.loads((out / "learn_bench_results.json").read_text())
    for condition in ("cfg", "cfg+smg", "step0-cfg", "shuffled-cfg"):
        for group in ("seen_2l", "heldout_2l", "seen_3l", "heldout_3l"):
            entry = data["conditions"][condition][group]
            assert 0.0 <= entry["colour"] <= 1.0 and 0.0 <= entry["shape"] <= 1.0
        assert 0.0 <= data["background_colour"][condition] <= 1.0 and data["fid"][condition] >= 0.0
    assert "cfg+smg-uncond" in data["conditions"]  # the other variants under their own names
    assert data["default_smg"] == dataclasses.asdict(lb.SMG_VARIANTS["default"])
    assert set(data["sweep"]) == set(cfg.sweep_variants)
    for points in data["sweep"].values():
        assert list(points) == ["0"] + [f"{s:g}" for s in cfg.sweep_scales]
        assert points["0"] == data["sweep"]["default"]["0"]  # one CFG baseline for every variant
    # the text encoder LayerDiff keeps frozen is the caption-trained one, not the random preset
    trained = load_file(out / "sd" / "text_encoder" / "model.safetensors")
    saved = load_file(out / "text_encoder" / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in trained.items())
    random = lb._scratch_sd(cfg).text_encoder.state_dict()
    assert any(not torch.allclose(v, random[k]) for k, v in trained.items() if k in random)


def test_vae_from_reuses_a_finished_vae_stage_once(tmp_path):
    import json

    from benchmarks.learn_bench import reuse_vae

    source, out = tmp_path / "src", tmp_path / "out"
    with pytest.raises(ValueError, match="no finished VAE"):
        reuse_vae(source, out)
    (source / "vae").mkdir(parents=True)
    (source / "vae" / "config.json").write_text("{}")
    (source / "vae.done.json").write_text(json.dumps({"steps": 3}))
    out.mkdir()
    reuse_vae(source, out)
    assert (out / "vae" / "config.json").read_text() == "{}"
    assert json.loads((out / "vae.done.json").read_text()) == {"steps": 3, "copied_from": str(source)}
    with pytest.raises(ValueError, match="already has a VAE"):
        reuse_vae(source, out)
