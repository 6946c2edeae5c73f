"""ShardProcessor end to end on small raw shards: validation, bookkeeping, resume, atomicity, stage errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlcid.reader import iter_shard_samples
from mlcid.schema import MLCIDSample
from mlcid.shard_check import validate_shard
from mlcid.writer import read_stats, shard_name, stats_name
from pipelines.config import PipelineConfig
from pipelines.runner import ShardProcessor, outcomes_name
from tests.builders import BG, classical_config, input_records, jpeg, write_input_shard
import tests.stages  # noqa: F401 — registers the test-* stage backends named below


# -- tests ----------------------------------------------------------------------------------------------------
def test_end_to_end_classical(tmp_path):
    recs = input_records(6)
    recs.insert(2, ("000000098", {"jpg": b"", "txt": b"empty"}))  # zero-byte image
    recs.insert(4, ("000000099", {"jpg": jpeg(np.broadcast_to(BG, (80, 80, 3)).copy()), "txt": b"blank"}))
    url = write_input_shard(tmp_path / "00007.tar", recs)
    out = tmp_path / "out"
    proc = ShardProcessor(classical_config()).setup()
    stats = proc.process(url, str(out))

    assert stats["shard_id"] == 7 and not stats["skipped"]
    assert stats["read"] == 8 == stats["written"] + sum(stats["dropped"].values())
    assert stats["dropped"].get("undecodable_image") == 1
    assert stats["written"] >= 4
    assert {"saliency", "mask_rules", "cutout", "inpaint", "decode_wait", "write"} <= set(stats["timings"])
    valid, bad = validate_shard(str(out / shard_name(7)))
    assert valid == stats["written"] and not bad
    # Per-sample outcomes: one row per input key, reasons match the stats.
    table = pq.read_table(out / outcomes_name(7, "mlcid")).to_pylist()
    assert len(table) == 8 and sum(r["kept"] for r in table) == stats["written"]
    assert {r["key"]: r["reason"] for r in table}["000000098"] == "undecodable_image"
    assert all(r["seconds_saliency"] > 0 for r in table if r["kept"])
    # Sample content: source caption used as global prompt, metadata carried, Eq. 4 consistent masks.
    samples = [s for s in iter_shard_samples(str(out / shard_name(7))) if isinstance(s, MLCIDSample)]
    s = samples[0]
    assert s.global_prompt == "two boxes on blue"
    assert s.source["input_shard"] == 7 and s.source["url"].startswith("http://example.com/")
    assert s.pipeline["backends"]["saliency"] == "classical" and "versions" in s.pipeline
    # Caption stages off: every prompt is a fallback, recorded per sample and counted in the stats.
    assert s.pipeline["prompt_sources"] == {"global": "alt_text", "layers": ["label"] * len(s.foregrounds)}
    layers = sum(len(x.foregrounds) for x in samples)
    assert stats["prompt_sources"] == {"global_alt_text": stats["written"], "layer_label": layers}
    for fg, m in zip(s.foregrounds, s.masks):
        assert ((fg[..., 3] == 255) | (m == 0)).all()  # alpha covers the undilated mask
    # Stats file written last: it is newer than the tar and the parquet.
    st = os.stat(out / stats_name(7)).st_mtime_ns
    assert st >= os.stat(out / shard_name(7)).st_mtime_ns
    assert st >= os.stat(out / outcomes_name(7, "mlcid")).st_mtime_ns


def test_resume_skips_complete_shard(tmp_path):
    url = write_input_shard(tmp_path / "00003.tar", input_records(2, seed=1, shard=3))
    proc = ShardProcessor(classical_config()).setup()
    first = proc.process(url, str(tmp_path / "out"))
    tar = tmp_path / "out" / shard_name(3)
    mtime = tar.stat().st_mtime_ns
    again = proc.process(url, str(tmp_path / "out"))
    assert again["skipped"] and again["written"] == first["written"]
    assert tar.stat().st_mtime_ns == mtime
    # Without a stats file the shard is incomplete and gets rebuilt.
    (tmp_path / "out" / stats_name(3)).unlink()
    rebuilt = proc.process(url, str(tmp_path / "out"))
    assert not rebuilt["skipped"] and read_stats(tmp_path / "out", 3)["written"] == first["written"]


def test_stage_error_drops_only_failing_items(tmp_path):
    recs = input_records(4, seed=2)
    recs[1] = ("boom01", recs[1][1])
    url = write_input_shard(tmp_path / "00001.tar", recs)
    proc = ShardProcessor(classical_config(backends={"caption": "test-fail-on-key"})).setup()
    stats = proc.process(url, str(tmp_path / "out"))
    assert stats["dropped"].get("stage_error:caption") == 1
    assert stats["read"] == 4 == stats["written"] + sum(stats["dropped"].values())
    samples = [s for s in iter_shard_samples(str(tmp_path / "out" / shard_name(1))) if isinstance(s, MLCIDSample)]
    assert all(s.global_prompt.startswith("shapes on blue") for s in samples)


def test_interrupted_run_leaves_no_visible_shard(tmp_path):
    url = write_input_shard(tmp_path / "00002.tar", input_records(3, seed=3))
    proc = ShardProcessor(classical_config(backends={"caption": "test-interrupt"})).setup()
    with pytest.raises(KeyboardInterrupt):
        proc.process(url, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == []


def test_unreadable_input_raises_and_writes_nothing(tmp_path):
    proc = ShardProcessor(classical_config()).setup()
    with pytest.raises(Exception, match="unreadable_shard|No such file"):
        proc.process(str(tmp_path / "00004.tar"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / stats_name(4)).exists()
    assert not (tmp_path / "out" / shard_name(4)).exists()


def test_process_requires_setup(tmp_path):
    with pytest.raises(RuntimeError, match="setup"):
        ShardProcessor(classical_config()).process(str(tmp_path / "00000.tar"), str(tmp_path))


def test_unknown_backend_lists_known():
    with pytest.raises(KeyError, match="classical"):
        ShardProcessor(classical_config(backends={"saliency": "icon"})).setup()


def test_cli_builds_and_resumes(tmp_path, capsys):
    from cli.main import mlcid_main

    url = write_input_shard(tmp_path / "00005.tar", input_records(3, seed=4, shard=5))
    argv = ["--shards", url, "--out", str(tmp_path / "out"), "--preset", "tiny", "--log-level", "WARNING",
            "--backend", "caption=none", "--backend", "object_caption=none", "--backend", "detect=test-colour",
            "--backend", "segment=test-box", "--backend", "inpaint=test-fill"]
    assert mlcid_main(["build-local", *argv]) == 0
    totals = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert totals["read"] == 3 and totals["skipped"] == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())  # wids index beside the shards
    assert index["shardlist"] == [{"url": "mlcid-000005.tar", "nsamples": totals["written"],
                                   "filesize": (tmp_path / "out" / "mlcid-000005.tar").stat().st_size}]
    assert mlcid_main(["build-local", *argv]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 1


# -- the full tiny pipeline on synthetic scenes (E1's model-backed stages with random-weight presets) ---------
def test_tiny_preset_on_synthetic_scenes(tmp_path, tiny_models):
    """Random weights decide nothing, yet the tiny profile's thresholds make the synthetic scenes yield samples.

    Models come through `mlcid.registry` from the session's tiny-model folder, as `--preset tiny` loads them.
    """
    from mlcid.synthetic import SceneConfig, write_shard

    write_shard(tmp_path / "raw", tmp_path / "gt", 0, range(6), seed=0, config=SceneConfig(size=128))
    url = str(tmp_path / "raw" / "00000.tar")
    config = PipelineConfig.from_preset("tiny")
    proc = ShardProcessor(config).setup()
    stats = proc.process(url, str(tmp_path / "out"))
    assert stats["read"] == 6 == stats["written"] + sum(stats["dropped"].values())
    assert stats["written"] >= 1, stats["dropped"]
    valid, bad = validate_shard(str(tmp_path / "out" / shard_name(0)))
    assert valid == stats["written"] and not bad
    sample = next(s for s in iter_shard_samples(str(tmp_path / "out" / shard_name(0))) if isinstance(s, MLCIDSample))
    assert sample.pipeline["models"]["detect"] == str(tiny_models / "owlv2")
    assert set(sample.pipeline["backends"]) == {"caption", "detect", "segment", "saliency", "mask_rules",
                                                "object_caption", "cutout", "inpaint"}
    assert {"caption", "detect", "segment", "object_caption", "inpaint"} <= set(stats["timings"])
    counts = stats["prompt_sources"]  # every written sample's global prompt has one recorded source
    assert sum(v for k, v in counts.items() if k.startswith("global_")) == stats["written"]
    assert sample.pipeline["prompt_sources"]["global"] in ("caption", "alt_text")


def test_make_stage_passes_typed_config_and_pipeline_fields():
    """Stages get one ModelStageConfig plus their options dataclass; pipeline-wide fields reach their options."""
    from pipelines.config import make_stage
    from pipelines.cutout import CutoutOptions
    from pipelines.filters import MaskRules
    from pipelines.inpaint import OpenCVInpaintOptions

    cfg = classical_config(max_layers=3, min_area_frac=0.02, dilate_kernel=3, cutout_fill=(9, 9, 9))
    rules = make_stage("mask_rules", cfg)
    assert isinstance(rules, MaskRules)
    assert rules.params == {"min_saliency_overlap": 0.1, "containment_ratio": 0.9, "min_area_frac": 0.02,
                            "max_area_frac": 0.8, "max_foregrounds": 2}
    cut = make_stage("cutout", cfg)
    assert (cut.kernel, cut.fill) == (3, (9, 9, 9))
    assert make_stage("inpaint", classical_config(backends={"inpaint": "opencv"}, dilate_kernel=3)).dilate_kernel == 3
    seg = make_stage("segment", PipelineConfig.from_preset("tiny", models={"sam-vit-h": "/some/sam"},
                                                           batch_sizes={"segment": 3}))
    assert (seg.model_id, seg.batch_size, seg.clip_to_box) == ("/some/sam", 3, True)
    # Options that disagree with a pipeline-wide field are refused, not silently overwritten.
    with pytest.raises(ValueError, match="PipelineConfig.dilate_kernel"):
        classical_config(stage_options={"cutout": CutoutOptions(kernel=3)})
    with pytest.raises(TypeError, match="takes OpenCVInpaintOptions"):
        make_stage("inpaint", classical_config(backends={"inpaint": "opencv"},
                                               stage_options={"inpaint": CutoutOptions()}))
    assert isinstance(OpenCVInpaintOptions(), OpenCVInpaintOptions)


def test_killed_process_leaves_no_visible_shard_and_rerun_completes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    url = write_input_shard(tmp_path / "00006.tar", input_records(24, seed=6, shard=6))
    out = tmp_path / "out"
    script = (
        "import sys; from tests.builders import classical_config; "
        "from pipelines.runner import ShardProcessor; "
        "cfg = classical_config(backends={'inpaint': 'test-slow-fill'}, chunk_size=2); "
        "ShardProcessor(cfg).setup().process(sys.argv[1], sys.argv[2])"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script, url, str(out)], cwd=repo)
    tmp_tar = out / (shard_name(6) + ".tmp")
    deadline = time.monotonic() + 60
    while not (tmp_tar.exists() and tmp_tar.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / shard_name(6)).exists() and not (out / stats_name(6)).exists()
    stats = ShardProcessor(classical_config()).setup().process(url, str(out))
    assert not stats["skipped"] and stats["read"] == 24
    assert validate_shard(str(out / shard_name(6))) == (stats["written"], {})
    assert not tmp_tar.exists()


def test_config_presets_and_overrides():
    real, tiny = PipelineConfig.from_preset("real"), PipelineConfig.from_preset("tiny")
    assert real.backends["saliency"] == "depth" and tiny.backends["saliency"] == "classical"
    assert real.stage_options["detect"].score_threshold == 0.1  # Appendix B
    assert tiny.stage_options["detect"].score_threshold == 0.0  # random weights: keep the top-k
    assert (real.min_saliency_overlap, real.min_area_frac, real.max_area_frac, real.max_foregrounds) == (0.1, 0.01, 0.8, 3)
    # Dict overrides merge one level deep; other keys of the preset stay.
    cfg = PipelineConfig.from_preset("tiny", stage_options={"detect": {"max_detections": 2}}, max_side=64)
    assert (cfg.stage_options["detect"].score_threshold, cfg.stage_options["detect"].max_detections) == (0.0, 2)
    assert cfg.stage_options["segment"].clip_to_box and cfg.max_side == 64
    with pytest.raises(TypeError, match="max_detectionz"):  # options are typed: a typo is an error
        PipelineConfig.from_preset("tiny", stage_options={"detect": {"max_detectionz": 2}})
    # A kind switched to a backend with other options starts from that backend's defaults.
    opencv = PipelineConfig.from_preset("real", backends={"inpaint": "opencv"})
    assert "inpaint" not in opencv.stage_options
    assert cfg.validation().max_layers == 4
    with pytest.raises(TypeError, match="unknown PipelineConfig fields"):
        PipelineConfig.from_preset("tiny", max_sidez=3)
    with pytest.raises(ValueError, match="needs a backend"):
        PipelineConfig.from_preset("tiny", backends={"inpaint": None})
    with pytest.raises(ValueError, match="unknown stage kinds"):
        PipelineConfig.from_preset("tiny", backends={"upscale": "x"})
    with pytest.raises(ValueError, match="multiple of 8|% 8"):
        PipelineConfig.from_preset("tiny", max_side=100)
    with pytest.raises(ValueError, match="unknown pipeline preset"):
        PipelineConfig.from_preset("huge")
