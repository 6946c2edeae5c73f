"""`make bench-pipeline-cost`: H100-hours per 2M written MLCID samples, from the real pipeline code on CPU.

1. Writes a LAION-shaped img2dataset shard (`benchmarks.laion_mix`: LAION's aspect-ratio spread at img2dataset's
   512 short side, the paper's layer mix).
2. Runs the real `ShardProcessor` over it with the `real` preset's backends, micro-batch sizes, chunk size and
   working sizes, but the tiny random-weight models (CPU). `benchmarks.pipeline_probe` wraps each stage from the
   outside: items in / out, survival rates applied by hash (`DEFAULT_SURVIVAL`, options), model batches formed
   and their fill, CPU seconds on the main thread (the GPU actor's) and on the runner's `cpu-stage` thread.
3. Multiplies the batches each stage really formed by the full-size models' GPU seconds per batch
   (`benchmarks.unit_costs`: a committed `make bench-gpu` result when there is one, else published figures),
   adds the CPU work that runs on the GPU actor's thread (mask rules and cut-outs when `cpu_stage_thread` is
   off, the inpainter's own resizing and pasting), and divides by the samples written. CPU work on the
   `cpu-stage` thread overlaps the GPU stages: it is reported (`cpu_stage_thread`) and checked to stay below
   the GPU time it hides behind, not added.
4. Lists what stands between the figure and the issue's target (`in_the_way`: terms, their hours, what would
   remove them, which figures are measured).

Before / after (§2 of issue 10), both measured in one invocation: `before=True` runs the runner as it was
(`BEFORE_RUNNER`: caption first, batches formed per chunk, working sizes on the 8-px grid, depth saliency per
exact shape, CPU stages on the GPU's thread); the default run is the runner's defaults (caption after the mask
rules, bucketed batches across chunks, the real preset's working size grids, CPU stages on their own thread).
Modelled on top: `full_inpaint_batches` costs inpainting as if every SD batch were full, `inpaint_steps` scales
SD by steps (default: the real preset's), `segment_speedup` divides SAM's cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks.laion_mix import LaionMix, write_laion_shard
from benchmarks.pipeline_probe import CPU_KINDS, Recorder, instrument
from benchmarks.unit_costs import UnitCost, load_costs
from pipelines.segment import AUTO_BATCH, SegmentOptions

log = logging.getLogger("bench_pipeline_cost")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
UNIT_STEPS = 25  # the published inpainting unit cost is for 25 steps
# The runner as it was before issue 10's §2 changes: the paper's order, batches formed within one chunk.
BEFORE_RUNNER: dict[str, Any] = {"caption_order": "first", "bucketed_stages": (), "cpu_stage_thread": False,
                                 "stage_options": {"inpaint": {"size_step": 8}, "saliency": {"size_step": 0}}}
TARGET_H100_HOURS = 200.0  # issue 10's goal per 2M written samples
# What would remove each stage's cost (`in_the_way`); the figures behind them are in BENCHMARKS.md.
REMEDIES = {
    "segment": "SAM ViT-H at 1024² is compute-bound and its batches are full: bf16 + SDPA "
               "(pipelines/sam_efficient.py; modelled 2×, unmeasured) or a smaller segmenter (SAM-HQ, EfficientSAM, "
               "SAM 2 Hiera-S)",
    "inpaint": "fuller batches (larger shards: fill 0.97 at 10,000-image shards, benchmarks.bucket_fill), fewer "
               "DPM-Solver++ steps (quality unmeasured), the resize/paste CPU off the actor's thread",
    "caption": "60 greedy tokens of launch-bound Flan-T5-XL generate: fewer tokens or a smaller captioner "
               "(quality not judged: random weights)",
    "object_caption": "as caption: fewer tokens or a smaller captioner",
    "detect": "OWLv2 B/16 at 960², batches full: a smaller input size or detector",
    "saliency": "Depth-Anything-V2-Small, bucketed by working size: little left",
    "mask_rules": "CPU only: on the cpu-stage thread when cpu_stage_thread is on",
    "cutout": "CPU only: on the cpu-stage thread when cpu_stage_thread is on",
}

# Fraction of the items entering a stage that leave it alive. Estimates (no published per-stage yields for
# this pipeline): OWLv2 at score ≥ 0.1 over 365 Objects365 queries finds a box on nearly every LAION photo
# (text-only graphics, logos and screenshots excepted); the Appendix B mask rules (saliency overlap > 10%,
# area 1–80%, containment) are the main filter — the paper builds 1M samples from LAION-400M without giving
# the yield; 0.45 is what makes the "roughly half of it waste" estimate. Replace with a real build's
# `mlcid stats` (kept / dropped by reason) when one exists.
DEFAULT_SURVIVAL = {
    "caption": 0.998, "detect": 0.92, "segment": 0.99, "saliency": 1.0, "mask_rules": 0.45,
    "object_caption": 1.0, "cutout": 1.0, "inpaint": 1.0,
}
PAPER_OBJECT_WEIGHTS = (1.7, 0.3, 0.08)  # MLCID Sec. 4.1: samples with 1, 2, 3 foregrounds


@dataclass
class CostConfig:
    """One cost-model run."""

    samples: int = 256  # LAION-shaped inputs pushed through the pipeline
    seed: int = 0
    mix: LaionMix = field(default_factory=LaionMix)
    survival: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SURVIVAL))
    object_weights: tuple[float, ...] | None = PAPER_OBJECT_WEIGHTS
    before: bool = False  # measured: the runner as it was (`BEFORE_RUNNER`) instead of its defaults
    full_inpaint_batches: bool = False  # modelled: every SD batch full (ideal bucketing)
    inpaint_steps: int | None = None  # SD cost × steps / 25; None: the real preset's steps
    segment_speedup: float = 1.0  # modelled: SAM cost ÷ this
    total_written: int = 2_000_000
    tiny_sd_steps: int = 2  # denoising steps of the tiny SD run on CPU (only its batching is used)
    tiny_sd_downscale: int = 4  # the tiny SD runs at 1/4 of the working size (CPU time); batches are as formed
    results_dir: Path | None = RESULTS  # where a committed `make bench-gpu` JSON is looked for
    pipeline_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inpaint_steps is None:
            from pipelines.config import PipelineConfig

            self.inpaint_steps = PipelineConfig.from_preset("real").stage_options["inpaint"].num_inference_steps
        if self.samples < 1 or self.inpaint_steps < 1 or self.segment_speedup <= 0:
            raise ValueError("need samples ≥ 1, inpaint_steps ≥ 1 and segment_speedup > 0")
        bad = {k: v for k, v in self.survival.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"survival rates must lie in [0, 1], got {bad}")


def pipeline_config(cfg: CostConfig):
    """The `real` profile (backends, batch sizes, sizes) on the tiny models, CPU, loose tiny-model thresholds."""
    from pipelines.config import PipelineConfig, real_preset

    batch_sizes = dict(real_preset().batch_sizes)
    if batch_sizes.get("segment") == AUTO_BATCH:  # sized from free GPU memory: an 80 GB H100 reaches the cap
        batch_sizes["segment"] = SegmentOptions().max_batch_size  # (on CPU it would be CPU_AUTO_BATCH)
    overrides = dict(
        preset="tiny", device="cpu", dtype="float32", decode_threads=2, batch_sizes=batch_sizes,
        # Random weights decide nothing: keep what the models give and let the survival rates decide.
        min_saliency_overlap=0.0, containment=1.0,
        stage_options={
            "detect": {"score_threshold": 0.0, "max_detections": 8},
            "segment": {"clip_to_box": True},
            "caption": {"max_new_tokens": 4},
            "object_caption": {"max_new_tokens": 3},
            "inpaint": {"num_inference_steps": cfg.tiny_sd_steps},
        },
    )
    extra = [BEFORE_RUNNER] if cfg.before else []
    for key, value in [kv for d in extra + [cfg.pipeline_overrides] for kv in d.items()]:
        if key == "stage_options":  # one level deeper: a stage's fields
            merged = dict(overrides[key])
            for kind, fields in value.items():
                merged[kind] = {**merged.get(kind, {}), **fields}
            overrides[key] = merged
        elif isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    return PipelineConfig.from_preset("real", **overrides)


def measure(cfg: CostConfig, work: Path) -> tuple[Recorder, dict[str, Any], dict[str, bool], Any]:
    """Run the instrumented pipeline on a fresh LAION-shaped shard; (recorder, shard stats, kept by key, config)."""
    from pipelines.runner import ShardProcessor

    shard = work / "raw" / "00000.tar"
    write_laion_shard(shard, cfg.samples, cfg.mix, cfg.seed)
    pcfg = pipeline_config(cfg)
    proc = ShardProcessor(pcfg).setup()  # stages in pcfg.stage_order()
    recorder = instrument(proc, cfg.survival, cfg.object_weights, None, cfg.tiny_sd_downscale)
    stats = proc.process(str(shard), str(work / "out"))
    table = pq.read_table(work / "out" / stats["outcomes"], columns=["key", "kept"]).to_pylist()
    return recorder, stats, {r["key"]: bool(r["kept"]) for r in table}, pcfg


def _round(x: float, n: int = 4) -> float:
    return float(f"{x:.{n}g}") if x else 0.0


def stage_costs(kind: str, rec, unit: UnitCost | None, batch_size: int, cfg: CostConfig) -> tuple[float, float]:
    """(GPU seconds as formed, GPU seconds with full batches) of one stage's recorded batches on one H100."""
    if unit is None or not rec.batches:
        return 0.0, 0.0
    scale = 1.0
    if kind == "inpaint":
        scale = cfg.inpaint_steps / UNIT_STEPS
    if kind == "segment":
        scale = 1.0 / cfg.segment_speedup
    formed = sum(unit.batch_seconds(b, a) for b, a in zip(rec.batches, rec.batch_areas)) * scale
    n, area = sum(rec.batches), sum(b * a for b, a in zip(rec.batches, rec.batch_areas)) / sum(rec.batches)
    full_batches = n // batch_size
    full = (full_batches * unit.batch_seconds(batch_size, area)
            + (unit.batch_seconds(n % batch_size, area) if n % batch_size else 0.0)) * scale
    return formed, full


def account(cfg: CostConfig, recorder: Recorder, stats: dict[str, Any], kept: dict[str, bool], pcfg,
            costs: dict[str, UnitCost], cost_source: str | None) -> dict[str, Any]:
    """Counts, fills, GPU and CPU seconds per stage → the report (see the module docstring)."""
    written = int(stats["written"])
    per_written = 1.0 / max(1, written)
    to_hours = cfg.total_written / 3600.0
    stages: dict[str, Any] = {}
    gpu_total = cpu_total = thread_total = 0.0
    fills = {}
    for kind, rec in recorder.stages.items():
        unit = costs.get(kind)
        batch_size = int(pcfg.batch_sizes.get(kind, 1))
        if batch_size == AUTO_BATCH:  # sized from free GPU memory: an 80 GB H100 reaches the stage's cap
            batch_size = SegmentOptions().max_batch_size
        formed, full = stage_costs(kind, rec, unit, batch_size, cfg)
        gpu_s = full if (kind == "inpaint" and cfg.full_inpaint_batches) else formed
        # CPU on the actor's thread: a model-free stage's main-thread time (none when it ran on the cpu-stage
        # thread); for the inpainter its own hole/resize/paste work.
        cpu_s = (rec.main_cpu_s if kind in CPU_KINDS
                 else (rec.main_cpu_s - rec.model_cpu_s if kind == "inpaint" else 0.0))
        thread_cpu_s = rec.cpu_s - rec.main_cpu_s  # on the cpu-stage thread: overlaps the GPU stages
        thread_total += thread_cpu_s
        written_from_here = sum(kept.get(k, False) for k in rec.keys_in)
        fill = (sum(rec.batches) / (len(rec.batches) * batch_size)) if rec.batches else None
        fills[kind] = fill
        gpu_total += gpu_s
        cpu_total += max(0.0, cpu_s)
        stages[kind] = {
            "items_in": rec.items_in, "items_out": rec.items_out,
            "dropped_here": rec.items_in - rec.items_out,
            "dropped_by_stage": rec.natural_drops, "dropped_by_survival_rate": rec.modelled_drops,
            "dropped_later": rec.items_out - written_from_here, "written_from_here": written_from_here,
            "objects_in": rec.objects_in, "batch_size": batch_size, "batches": len(rec.batches),
            "items_batched": sum(rec.batches),
            "mean_batch": _round(sum(rec.batches) / len(rec.batches)) if rec.batches else None,
            "batch_fill": _round(fill) if fill is not None else None,
            "gpu_s_per_written": _round(gpu_s * per_written),
            "gpu_s_per_written_formed": _round(formed * per_written),
            "gpu_s_per_written_full_batches": _round(full * per_written),
            "wasted_fraction": _round(1.0 - written_from_here / rec.items_in) if rec.items_in else 0.0,
            "cpu_ms_per_item": _round(1000.0 * rec.cpu_s / max(1, rec.items_in)),
            "critical_cpu_ms_per_item": _round(1000.0 * max(0.0, cpu_s) / max(1, rec.items_in)),
            "cpu_thread_ms_per_item": _round(1000.0 * thread_cpu_s / max(1, rec.items_in)),
            "critical_cpu_s_per_written": _round(max(0.0, cpu_s) * per_written),
            "h100_hours_per_2m_written": _round((gpu_s + max(0.0, cpu_s)) * per_written * to_hours),
            "unit_cost": dataclasses.asdict(unit) if unit else None,
        }
    actor_s = gpu_total + cpu_total
    wasted_gpu = sum(s["gpu_s_per_written"] * s["wasted_fraction"] for s in stages.values())
    return {
        "h100_hours_per_2m_written": _round(actor_s * per_written * to_hours),
        "gpu_hours_per_2m_written": _round(gpu_total * per_written * to_hours),
        "critical_cpu_hours_per_2m_written": _round(cpu_total * per_written * to_hours),
        "wasted_gpu_fraction": _round(wasted_gpu / max(1e-12, gpu_total * per_written)),
        "inpaint_batch_fill": _round(fills.get("inpaint") or 0.0),
        "read": int(stats["read"]), "written": written, "yield": _round(written / max(1, int(stats["read"]))),
        "dropped": stats["dropped"], "layer_counts": stats["layer_counts"],
        "decode_wait_s_per_item": _round(stats["timings"].get("decode_wait", 0.0) / max(1, int(stats["read"]))),
        "cpu_stage_thread": {
            "on": bool(pcfg.cpu_stage_thread),
            "cpu_s_per_written": _round(thread_total * per_written),  # CPU stages' work there (tiny-model run)
            "gpu_s_per_written": _round(gpu_total * per_written),  # full-size GPU work it overlaps
            "keeps_up": thread_total <= gpu_total,  # else the CPU thread, not the GPU, would set the pace
            # The main thread waiting for it on CPU, where the tiny models leave little to overlap with.
            "wait_s_per_item_tiny_run": _round(stats["timings"].get("cpu_stage_wait", 0.0)
                                               / max(1, int(stats["read"]))),
        },
        "stages": stages,
        "unit_costs_from": cost_source or "published figures (benchmarks/unit_costs.py PUBLISHED; BENCHMARKS.md)",
        "options": {
            "samples": cfg.samples, "seed": cfg.seed, "before": cfg.before, "stage_order": list(pcfg.stage_order()),
            "bucketed_stages": list(pcfg.bucketed_stages), "cpu_stage_thread": pcfg.cpu_stage_thread,
            "saliency_size_step": getattr(pcfg.stage_options.get("saliency"), "size_step", None),
            "inpaint_size_step": getattr(pcfg.stage_options.get("inpaint"), "size_step", None),
            "full_inpaint_batches": cfg.full_inpaint_batches, "inpaint_steps": cfg.inpaint_steps,
            "segment_speedup": cfg.segment_speedup, "total_written": cfg.total_written, "survival": cfg.survival,
            "object_weights": cfg.object_weights, "mix": dataclasses.asdict(cfg.mix),
            "batch_sizes": dict(pcfg.batch_sizes), "chunk_size": pcfg.chunk_size, "max_side": pcfg.max_side,
        },
    }


def run(cfg: CostConfig, work: Path | None = None) -> dict[str, Any]:
    """Measure (in `work`, else a temporary folder) and account; returns the report."""
    costs, source = load_costs(cfg.results_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pipeline-cost-") as tmp:
        recorder, stats, kept, pcfg = measure(cfg, Path(work or tmp))
    report = account(cfg, recorder, stats, kept, pcfg, costs, source)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    return report


def scenarios(cfg: CostConfig, report: dict[str, Any], before: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Before and after (both measured), then the modelled changes on top of `report`, cumulatively."""
    rows = []
    if before is not None:
        rows.append({"scenario": "runner before (caption first, per-chunk batches, 8-px sizes, CPU stages inline)",
                     "how": "measured", **_summary(before)})
    rows.append({"scenario": "runner now (caption after the rules, bucketed batches, CPU stages on their thread)",
                 "how": "measured", **_summary(report)})
    steps = [("+ every inpainting batch full", "modelled", dict(full_inpaint_batches=True)),
             ("+ SAM bf16 + SDPA (2× assumed)", "modelled", dict(segment_speedup=2.0)),
             ("+ DPM-Solver++ 15 steps", "modelled", dict(inpaint_steps=15))]
    options: dict[str, Any] = {}
    for name, how, change in steps:
        options.update(change)
        rows.append({"scenario": name, "how": how, **_summary(report | {"_options": dict(options)})})
    return rows


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    if "_options" in report:  # re-account the stored stage batches under new options
        report = reaccount(report, report["_options"])
    return {"h100_hours_per_2m_written": report["h100_hours_per_2m_written"],
            "inpaint_batch_fill": report["inpaint_batch_fill"] if not report["options"]["full_inpaint_batches"]
            else 1.0, "wasted_gpu_fraction": report["wasted_gpu_fraction"]}


def reaccount(report: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """The report with modelled options changed, from its stored per-stage GPU seconds (no rerun)."""
    ran, opts = report["options"], {**report["options"], **changes}
    total = 0.0
    for kind, s in report["stages"].items():
        full = kind == "inpaint" and opts["full_inpaint_batches"]
        gpu = s["gpu_s_per_written_full_batches"] if full else s["gpu_s_per_written_formed"]
        if kind == "inpaint":
            gpu *= opts["inpaint_steps"] / ran["inpaint_steps"]
        if kind == "segment":
            gpu *= ran["segment_speedup"] / opts["segment_speedup"]
        total += gpu + s["critical_cpu_s_per_written"]
    return dict(report, options=opts, h100_hours_per_2m_written=_round(total * opts["total_written"] / 3600.0))


def in_the_way(report: dict[str, Any], target: float = TARGET_H100_HOURS) -> dict[str, Any]:
    """What stands between the measured figure and `target`: each term's hours (largest first), what would
    remove it, the modelled levers (`scenarios`) and their savings, and which inputs are not measured."""
    hours = report["h100_hours_per_2m_written"]
    to_hours = report["options"]["total_written"] / 3600.0
    terms = [{"term": kind, "h100_hours": s["h100_hours_per_2m_written"],
              "gpu_hours": _round(s["gpu_s_per_written"] * to_hours),
              "critical_cpu_hours": _round(s["critical_cpu_s_per_written"] * to_hours),
              "batch_fill": s["batch_fill"], "what_would_remove_it": REMEDIES.get(kind, "")}
             for kind, s in sorted(report["stages"].items(), key=lambda kv: -kv[1]["h100_hours_per_2m_written"])]
    wasted = _round(report["wasted_gpu_fraction"] * report["gpu_hours_per_2m_written"])
    terms.append({"term": "gpu_work_on_dropped_items", "h100_hours": wasted, "included_in": "the stages above",
                  "what_would_remove_it": "a better survival rate before detect/SAM/depth (a cheaper pre-filter); "
                                          "the survival rates are estimates until a real build's mlcid stats"})
    rows = report.get("scenarios", [])
    now = next((i for i, r in enumerate(rows) if r["scenario"].startswith("runner now")), None)
    levers = [{"change": r["scenario"], "how": r["how"], "h100_hours_after": r["h100_hours_per_2m_written"],
               "saves_h100_hours": _round(prev["h100_hours_per_2m_written"] - r["h100_hours_per_2m_written"])}
              for prev, r in zip(rows[now:], rows[now + 1:])] if now is not None else []
    best = levers[-1]["h100_hours_after"] if levers else hours
    measured = sorted(k for k, s in report["stages"].items() if (s["unit_cost"] or {}).get("measured"))
    priced = sorted(k for k, s in report["stages"].items() if s["unit_cost"])
    return {
        "target_h100_hours": target, "h100_hours": hours, "gap_h100_hours": _round(max(0.0, hours - target)),
        "reaches_target": hours <= target, "terms": terms, "modelled_levers": levers,
        "h100_hours_with_every_lever": best, "reaches_target_with_every_lever": best <= target,
        "gap_after_every_lever": _round(max(0.0, best - target)),
        "unit_costs_measured": measured, "unit_costs_published": [k for k in priced if k not in measured],
        "unit_costs": "measured: " + report["unit_costs_from"] if measured == priced else
        "published figures and estimates (benchmarks/unit_costs.py, BENCHMARKS.md) for "
        f"{', '.join(k for k in priced if k not in measured)} until `make bench-gpu` runs on a GPU and its JSON is "
        "committed under benchmarks/results/; every hour here moves with them",
        "survival_rates": "estimates (DEFAULT_SURVIVAL) until a real build's `mlcid stats`",
    }


def format_table(rows: list[dict[str, Any]], report: dict[str, Any]) -> str:
    lines = ["| stage | in | out | dropped later | batches | mean batch / size | fill | GPU s per written "
             "| CPU ms/item: critical / cpu-stage thread | H100-h per 2M |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, s in report["stages"].items():
        mb = f"{s['mean_batch']} / {s['batch_size']}" if s["mean_batch"] else "–"
        lines.append(f"| {kind} | {s['items_in']} | {s['items_out']} | {s['dropped_later']} | {s['batches']} | {mb} "
                     f"| {s['batch_fill'] if s['batch_fill'] is not None else '–'} | {s['gpu_s_per_written']} "
                     f"| {s['critical_cpu_ms_per_item']} / {s['cpu_thread_ms_per_item']} "
                     f"| {s['h100_hours_per_2m_written']} |")
    lines += ["", "| scenario | how | H100-h per 2M written | inpaint fill | GPU work on dropped items |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['scenario']} | {r['how']} | {r['h100_hours_per_2m_written']:.0f} | {r['inpaint_batch_fill']} "
              f"| {r['wasted_gpu_fraction']:.0%} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=CostConfig.samples, help="LAION-shaped inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--short-side", type=int, default=LaionMix.short_side, help="img2dataset --image_size")
    p.add_argument("--odd-fraction", type=float, default=LaionMix.odd_fraction,
                   help="share of inputs with an aspect ratio outside LAION's common formats")
    p.add_argument("--survival", action="append", default=[], metavar="STAGE=RATE",
                   help="survival rate of a stage (repeatable), e.g. mask_rules=0.5")
    p.add_argument("--full-inpaint-batches", action="store_true")
    p.add_argument("--inpaint-steps", type=int, help="SD steps to cost (default: the real preset's)")
    p.add_argument("--segment-speedup", type=float, default=1.0)
    p.add_argument("--no-before", action="store_true", help="skip the run of the runner as it was (BEFORE_RUNNER)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="committed make bench-gpu JSONs")
    p.add_argument("--out", type=Path, default=REPO / ".work" / "bench" / "pipeline_cost.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    survival = dict(DEFAULT_SURVIVAL)
    for item in args.survival:
        stage, _, rate = item.partition("=")
        if stage not in survival or not rate:
            raise SystemExit(f"error: --survival wants STAGE=RATE with STAGE in {', '.join(survival)}")
        survival[stage] = float(rate)
    mix = LaionMix(short_side=args.short_side, odd_fraction=args.odd_fraction)
    cfg = CostConfig(samples=args.samples, seed=args.seed, mix=mix, survival=survival,
                     full_inpaint_batches=args.full_inpaint_batches, inpaint_steps=args.inpaint_steps,
                     segment_speedup=args.segment_speedup, results_dir=args.results_dir)
    before = None if args.no_before else run(dataclasses.replace(cfg, before=True))
    report = run(cfg)
    report["scenarios"] = scenarios(cfg, report, before)
    report["in_the_way"] = in_the_way(report)
    if before is not None:
        report["before"] = before
    print(format_table(report["scenarios"], report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(args.out)
    print(f"report: {args.out}")
    return report


if __name__ == "__main__":
    main()
