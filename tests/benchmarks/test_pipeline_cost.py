"""The cost model's accounting on a tiny run of the real pipeline: counts add up, fills are fills, keys exist."""

from __future__ import annotations

import json

import pytest

from benchmarks.laion_mix import LaionMix, write_laion_shard
from benchmarks.pipeline_cost import DEFAULT_SURVIVAL, CostConfig, main, reaccount, run
from benchmarks.unit_costs import PUBLISHED, UnitCost, from_bench_gpu

SMALL_MIX = LaionMix(short_side=96)
SURVIVAL = DEFAULT_SURVIVAL | {"detect": 0.8, "mask_rules": 0.6}


def tiny_cost(**kw) -> CostConfig:
    return CostConfig(samples=kw.pop("samples", 12), mix=SMALL_MIX, survival=SURVIVAL, results_dir=None, **kw)


@pytest.fixture(scope="module")
def reports(tiny_models, one_thread):
    return run(tiny_cost(before=True)), run(tiny_cost())


@pytest.mark.parametrize("which", [0, 1], ids=["before", "now"])
def test_counts_add_up_per_stage(reports, which):
    report = reports[which]
    stages = report["stages"]
    assert list(stages) == report["options"]["stage_order"]
    for kind, s in stages.items():
        assert s["items_in"] == s["items_out"] + s["dropped_here"], kind
        assert s["dropped_here"] == s["dropped_by_stage"] + s["dropped_by_survival_rate"], kind
        assert s["items_out"] == s["written_from_here"] + s["dropped_later"], kind
    kinds = list(stages)
    for before, after in zip(kinds, kinds[1:]):  # what leaves one stage alive enters the next
        assert stages[before]["items_out"] == stages[after]["items_in"], (before, after)
    assert stages[kinds[0]]["items_in"] == report["read"] == 12
    assert report["read"] == report["written"] + sum(report["dropped"].values())
    assert stages["inpaint"]["written_from_here"] == report["written"] > 0
    # Survival rates below 1 drop by hash; rates of 1 never do.
    assert stages["mask_rules"]["dropped_by_survival_rate"] > 0
    assert stages["saliency"]["dropped_by_survival_rate"] == 0
    assert report["dropped"].get("modelled:mask_rules", 0) == stages["mask_rules"]["dropped_by_survival_rate"]


@pytest.mark.parametrize("which", [0, 1], ids=["before", "now"])
def test_batches_cover_every_item_and_fill_is_a_fraction(reports, which):
    report = reports[which]
    for kind in ("caption", "detect", "segment", "saliency", "inpaint"):
        s = report["stages"][kind]
        assert s["batches"] >= 1
        assert s["items_batched"] == s["items_in"], kind  # each image batched once
        assert 0.0 < s["batch_fill"] <= 1.0, kind
    obj = report["stages"]["object_caption"]
    assert obj["items_batched"] == obj["objects_in"]  # batches count objects
    assert report["inpaint_batch_fill"] == report["stages"]["inpaint"]["batch_fill"]
    assert report["stages"]["mask_rules"]["batches"] == 0  # no model: nothing to batch, all CPU
    for kind in ("mask_rules", "cutout"):  # on the GPU's thread before, on the cpu-stage thread now
        s = report["stages"][kind]
        if which == 0:
            assert s["critical_cpu_s_per_written"] > 0 and s["cpu_thread_ms_per_item"] == 0, kind
        else:
            assert s["critical_cpu_s_per_written"] == 0 and s["cpu_thread_ms_per_item"] > 0, kind
    assert report["cpu_stage_thread"]["on"] == (which == 1)


def test_report_keys_and_cost_sum(reports):
    report, _ = reports
    for key in ("h100_hours_per_2m_written", "inpaint_batch_fill", "stages", "unit_costs_from", "wasted_gpu_fraction"):
        assert key in report
    total = sum(s["h100_hours_per_2m_written"] for s in report["stages"].values())
    assert report["h100_hours_per_2m_written"] == pytest.approx(total, rel=1e-3)
    assert all(s["unit_cost"]["source"] for k, s in report["stages"].items() if k in PUBLISHED)
    assert 0.0 < report["wasted_gpu_fraction"] < 1.0


def test_caption_after_the_rules_is_measured(reports):
    before, after = reports
    assert list(before["stages"])[0] == "caption"
    assert list(after["stages"])[:5] == ["detect", "segment", "saliency", "mask_rules", "caption"]
    assert after["stages"]["caption"]["items_in"] == after["stages"]["mask_rules"]["items_out"]
    assert after["stages"]["caption"]["items_in"] < before["stages"]["caption"]["items_in"]
    assert after["written"] == before["written"]  # fates are hashed per (stage, key): order changes costs only
    assert after["stages"]["caption"]["gpu_s_per_written"] < before["stages"]["caption"]["gpu_s_per_written"]


def test_bucketing_fills_inpaint_batches_at_least_as_well(reports):
    before, after = reports
    assert before["options"]["bucketed_stages"] == [] and "inpaint" in after["options"]["bucketed_stages"]
    b, a = before["stages"]["inpaint"], after["stages"]["inpaint"]
    assert a["items_batched"] == b["items_batched"] == after["written"]
    assert a["batches"] <= b["batches"] and a["batch_fill"] >= b["batch_fill"]


def test_cpu_stages_leave_the_critical_path_and_saliency_buckets(reports):
    before, after = reports
    def critical(report, kinds):
        return sum(report["stages"][k]["critical_cpu_s_per_written"] for k in kinds)

    # Only the inpainter's own resize/paste stays on the GPU's thread; before, the mask rules and cut-outs too.
    assert critical(after, after["stages"]) == critical(after, ["inpaint"])
    assert critical(before, before["stages"]) > critical(before, ["inpaint"])
    assert after["cpu_stage_thread"]["keeps_up"]  # its CPU work hides behind the GPU work
    assert before["options"]["saliency_size_step"] == 0 and "saliency" in after["options"]["bucketed_stages"]
    b, a = before["stages"]["saliency"], after["stages"]["saliency"]
    assert a["items_batched"] == b["items_batched"] and a["batches"] <= b["batches"]


def test_in_the_way_lists_the_terms_and_what_is_unmeasured(tmp_path, tiny_models, one_thread):
    out = tmp_path / "cost.json"
    report = main(["--samples", "8", "--short-side", "96", "--no-before", "--results-dir", str(tmp_path),
                   "--out", str(out)])
    way = json.loads(out.read_text())["in_the_way"]
    assert way == json.loads(json.dumps(report["in_the_way"]))
    assert way["target_h100_hours"] == 200 and way["h100_hours"] == report["h100_hours_per_2m_written"]
    assert way["gap_h100_hours"] == pytest.approx(max(0.0, way["h100_hours"] - 200), abs=0.01)
    terms = [t for t in way["terms"] if t["term"] in report["stages"]]
    assert [t["term"] for t in terms] == sorted(report["stages"], key=lambda k:
                                                -report["stages"][k]["h100_hours_per_2m_written"])
    assert all(t["what_would_remove_it"] for t in way["terms"])
    assert [lv["change"] for lv in way["modelled_levers"]] == [r["scenario"] for r in report["scenarios"][1:]]
    assert way["unit_costs_measured"] == [] and "segment" in way["unit_costs_published"]
    assert "make bench-gpu" in way["unit_costs"]


def test_full_batches_and_fewer_steps_reaccount(reports):
    report, _ = reports
    full = reaccount(report, {"full_inpaint_batches": True})
    assert full["h100_hours_per_2m_written"] <= report["h100_hours_per_2m_written"]
    fewer = reaccount(report, {"inpaint_steps": 12})
    inpaint = report["stages"]["inpaint"]["gpu_s_per_written_formed"]
    saved = (report["h100_hours_per_2m_written"] - fewer["h100_hours_per_2m_written"]) * 3600 / 2e6
    assert saved == pytest.approx(inpaint * (1 - 12 / report["options"]["inpaint_steps"]), rel=1e-2)


def test_unit_cost_line_and_measured_override():
    u = UnitCost("inpaint", batch1_s=0.4, full_item_s=0.15, ref_batch=8)
    assert u.batch_seconds(1) == pytest.approx(0.4)
    assert u.batch_seconds(8) == pytest.approx(1.2)
    assert u.batch_seconds(8) / 8 < u.batch_seconds(2) / 2  # fuller batches cost less per item
    report = {"device": "NVIDIA H200", "pipeline": {"tiny": False, "config": {"objects_per_image": 2},
              "stages": [{"stage": "segment", "s_per_sample": 0.05, "batch_size": 16}],
              "extra_stages": []}}
    costs = from_bench_gpu(report)
    assert costs["segment"].measured and costs["segment"].full_item_s == 0.05
    assert costs["inpaint"] == PUBLISHED["inpaint"]
    with pytest.raises(ValueError, match="DRY"):
        from_bench_gpu({"pipeline": {"tiny": True}})


def test_laion_mix_shard_has_img2dataset_layout(tmp_path):
    import tarfile

    sizes = write_laion_shard(tmp_path / "00000.tar", 20, LaionMix(short_side=64), seed=1)
    assert sum(sizes.values()) == 20 and len(sizes) > 1  # a spread of aspect ratios
    assert all(min(int(v) for v in s.split("x")) == 64 for s in sizes)  # keep_ratio: shorter side = image_size
    names = tarfile.open(tmp_path / "00000.tar").getnames()
    assert len(names) == 60 and {n.rsplit(".", 1)[1] for n in names} == {"jpg", "txt", "json"}


def test_cli_writes_the_json(tmp_path, tiny_models, one_thread):
    out = tmp_path / "cost.json"
    main(["--samples", "6", "--short-side", "96", "--no-before", "--results-dir", str(tmp_path), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["h100_hours_per_2m_written"] > 0 and data["scenarios"][0]["scenario"].startswith("runner now")
