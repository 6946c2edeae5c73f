"""benchmarks.sample (`make bench-sample`) on a tiny geometry: every row runs, the table prints, and `--json` writes
ratio_vs_sd keyed by sampler and layer count, atomically."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import sample as bench


def test_bench_sample_rows_table_and_json(tmp_path, capsys):
    before = torch.get_num_threads()
    out = tmp_path / "bench" / "sample.json"
    try:
        assert bench.main(["--layers", "2", "--steps", "1", "--size", "64", "--threads", "1", "--tiny",
                           "--mask-interval", "2", "--smg-window-start", "0.75", "--window-mask-interval", "3",
                           "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["name"] for r in rows] == [
        "SD 1.5 pipeline, CFG", "LayerDiff CFG, before", "LayerDiff CFG", "LayerDiff CFG+SMG, before",
        "LayerDiff CFG+SMG", "LayerDiff CFG+SMG, masks every 2",
        "LayerDiff CFG+SMG on a window (steps 75%–100%), masks every 3"]
    assert [r["unet_calls"] for r in rows] == [1, 1, 1, 2, 2, 2, 1.25]  # per step; the window: 1 of 4 steps
    assert all(r["seconds"] > 0 and r["peak_mib"] > 0 for r in rows)
    ratios = data["ratio_vs_sd"]
    assert set(ratios) == {"cfg_before_L2", "cfg_L2", "cfg+smg_before_L2", "cfg+smg_L2", "cfg+smg_masks2_L2",
                           "cfg+smg_window_L2"}
    assert abs(ratios["cfg_L2"] - rows[2]["seconds"] / rows[0]["seconds"]) < 1e-3
    assert data["command"].startswith("python -m benchmarks.sample") and not list(out.parent.glob("*.tmp"))
    table = capsys.readouterr().out
    assert "| 2 | 2 | LayerDiff CFG+SMG | 2 |" in table and "SMG step ×SD" in table
    assert (data["config"]["smg_window_start"], data["config"]["smg_window_end"],
            data["config"]["window_mask_interval"]) == (0.75, 1.0, 3)


def test_before_rows_run_the_per_step_text_path_and_restore_it():
    class Pipe:
        cache_text = True

    pipe = Pipe()
    with bench.per_step_text(pipe):
        assert pipe.cache_text is False
    assert pipe.cache_text is True



def test_rows_pick_the_layerdiff_rows_and_refuse_unknown_ones(tmp_path):
    before = torch.get_num_threads()
    out = tmp_path / "sample.json"
    try:
        assert bench.main(["--layers", "2", "--steps", "1", "--size", "64", "--threads", "1", "--tiny",
                           "--rows", "cfg", "cfg+smg_window", "--json", str(out)]) == 0
        with pytest.raises(SystemExit):  # one geometry at a time
            bench.main(["--tiny", "--sd15"])
        with pytest.raises(ValueError, match=r"unknown rows \['cfg_fast'\]"):
            bench.main(["--layers", "2", "--steps", "1", "--size", "64", "--threads", "1", "--tiny",
                        "--rows", "cfg_fast"])
    finally:
        torch.set_num_threads(before)
    data = json.loads(out.read_text())
    assert [r["name"].split(" on ")[0] for r in data["rows"]] == ["SD 1.5 pipeline, CFG", "LayerDiff CFG",
                                                                   "LayerDiff CFG+SMG"]
    assert set(data["ratio_vs_sd"]) == {"cfg_L2", "cfg+smg_window_L2"}

