"""`make bench-gpu DRY=1`: the one GPU command runs every section on CPU with tiny models and merges one JSON."""

from __future__ import annotations

import json
import time

import pytest

from benchmarks.gpu import SECTIONS, GpuRun, run
from benchmarks.unit_costs import from_bench_gpu


@pytest.mark.slow  # ~45 s on an idle 2-core machine (four subprocesses each importing torch + diffusers)
def test_dry_run_every_section(tmp_path):
    out = tmp_path / "bench_gpu.json"
    t0 = time.perf_counter()
    report = run(GpuRun(dry=True, out=out))
    assert time.perf_counter() - t0 < 180
    saved = json.loads(out.read_text())
    assert saved["dry"] is True and saved["device"] == "cpu"
    assert saved["status"] == {name: "ok" for name in SECTIONS}, report["sections"]
    stages = [r["stage"] for r in saved["pipeline"]["stages"]]
    assert stages == ["caption", "detect", "segment", "object_caption", "inpaint"]
    assert [r["stage"] for r in saved["pipeline"]["extra_stages"]] == ["inpaint_batch1"]
    assert saved["pipeline"]["extra_stages"][0]["batch_size"] == 1
    assert any(r["model"] == "layerdiff" or r["model"] == "plain" for r in saved["train"])
    assert saved["sample"]["rows"]
    with pytest.raises(ValueError, match="DRY"):  # the cost model refuses tiny numbers
        from_bench_gpu(saved)


def test_failed_section_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    import benchmarks.gpu as gpu

    monkeypatch.setitem(gpu.DRY_LIMITS, "train", 1)  # far too short: the section times out
    report = run(GpuRun(dry=True, sections=("train",), out=tmp_path / "r.json"))
    assert report["status"]["train"].startswith("timeout")
    assert json.loads((tmp_path / "r.json").read_text())["train"] is None
