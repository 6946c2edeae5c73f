"""GPU cost per batch of each model-backed MLCID stage at full size, on one H100: published figures or measured.

A stage's cost is a straight line in the batch size b: `seconds(b) = t1 + (b - 1) * slope`, fixed by two
points, the latency of a batch of 1 (`batch1_s`) and the time per item at the configured batch size
(`full_item_s` at `ref_batch`). A batch of b items with `area` = (pixels / 512²) costs `seconds(b) * area` for
stages whose work grows with the image (SD inpainting); the others resize to a fixed model input.

`PUBLISHED` holds the figures used when no `make bench-gpu` result is committed; every entry names its source
and whether it is a published measurement or an estimate derived from one (see BENCHMARKS.md, "Cost model").
`from_bench_gpu(report)` replaces them by the measured ones (`benchmarks/results/*.json`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# Published A100 figures are scaled to H100 by this factor (H100 SXM / A100 SXM dense bf16 peak is 989 / 312 = 3.2;
# end-to-end diffusion and ViT inference gains reported by NVIDIA and MLPerf are ~2×). An assumption: an option.
A100_TO_H100 = 2.0


@dataclass(frozen=True)
class UnitCost:
    """GPU seconds of one micro-batch of `stage` on one H100 (per image, or per object for object captions)."""

    stage: str
    batch1_s: float  # latency of a batch of one item
    full_item_s: float  # seconds per item at `ref_batch`
    ref_batch: int
    per: str = "image"  # "image" | "object"
    area_scaled: bool = False  # work grows with the working size (pixels / 512²)
    source: str = ""
    measured: bool = False

    def __post_init__(self) -> None:
        if self.batch1_s <= 0 or self.full_item_s <= 0 or self.ref_batch < 1:
            raise ValueError(f"{self.stage}: unit cost needs batch1_s, full_item_s > 0 and ref_batch ≥ 1")

    @property
    def slope(self) -> float:
        """Extra seconds per extra item in a batch (0 when the reference batch is 1)."""
        if self.ref_batch == 1:
            return self.batch1_s
        return max(0.0, (self.full_item_s * self.ref_batch - self.batch1_s) / (self.ref_batch - 1))

    def batch_seconds(self, b: int, area: float = 1.0) -> float:
        """GPU seconds of one batch of `b` items (area = mean pixels / 512² when `area_scaled`)."""
        if b < 1:
            return 0.0
        base = self.batch1_s + (b - 1) * self.slope
        return base * (area if self.area_scaled else 1.0)


def _a100(seconds: float) -> float:
    return seconds / A100_TO_H100


# Per-item figures on an H100 with the configured micro-batches of the `real` preset (fp16).
PUBLISHED: dict[str, UnitCost] = {
    "caption": UnitCost(
        "caption", batch1_s=1.30, full_item_s=1.50 / 16, ref_batch=16,
        source="estimate: InstructBLIP Flan-T5-XL, 60 greedy tokens with transformers generate ≈ 21 ms per "
               "decoder step (24 layers, launch-bound, nearly flat in batch) + ViT-g/14 at 224² (≈0.5 TFLOP/img); "
               "no published throughput found"),
    "detect": UnitCost(
        "detect", batch1_s=0.030, full_item_s=0.010, ref_batch=16,
        source="estimate: OWLv2 B/16 at 960² = 3,600 patches ≈ 1.1 TFLOP/img (ViT-B MLP + attention) at ~35% "
               "of H100 bf16 peak, plus the class/box heads over 365 cached queries; no published throughput"),
    "segment": UnitCost(
        "segment", batch1_s=_a100(0.15), full_item_s=_a100(0.15) * 0.9, ref_batch=16,
        source="published: SAM ViT-H image encoder ~0.15 s/image on an A100 (segment-anything FAQ, "
               "segment-anything.com; MobileSAM's README lists 452 ms on an unnamed GPU); batching gains ≤10% "
               "(compute-bound 1024² ViT-H, segment-anything-fast blog); ÷ A100_TO_H100"),
    "saliency": UnitCost(
        "saliency", batch1_s=0.010, full_item_s=0.003, ref_batch=32,
        source="estimate: Depth-Anything-V2-Small (25M parameters, 518², ≈0.07 TFLOP/img); launch overhead "
               "dominates at batch 1"),
    "object_caption": UnitCost(
        "object_caption", batch1_s=0.45, full_item_s=0.70 / 32, ref_batch=32, per="object",
        source="estimate: as `caption` with 20 generated tokens per object crop, batched over objects"),
    "inpaint": UnitCost(
        "inpaint", batch1_s=_a100(1.604 * 25 / 50), full_item_s=0.15, ref_batch=8, area_scaled=True,
        source="published: SD 1.5 512² 50 steps, batch 1, diffusers + SDPA fp16 = 1.604 s on an A100 80G "
               "(fal-ai/stable-diffusion-benchmarks, 31 it/s) scaled to 25 steps and ÷ A100_TO_H100; at batch 8 "
               "estimate 0.15 s/img (UNet ≈0.8 TFLOP per CFG-doubled step at ~40% of H100 peak)"),
}


def from_bench_gpu(report: dict, base: dict[str, UnitCost] | None = None) -> dict[str, UnitCost]:
    """Unit costs with the stages measured by `make bench-gpu` (its `pipeline` section) replacing `base`.

    A stage measured at its configured batch only keeps `base`'s batch-1/full ratio; one measured at batch 1 as
    well (`inpaint_batch1`) gets both points measured.
    """
    costs = dict(PUBLISHED if base is None else base)
    pipeline = report.get("pipeline") or {}
    if pipeline.get("tiny"):
        raise ValueError("this bench-gpu report was a DRY run (tiny models): its numbers mean nothing")
    device = report.get("device") or pipeline.get("device", "?")
    extra = {r["stage"]: r for r in pipeline.get("extra_stages", [])}
    for row in pipeline.get("stages", []):
        kind = row["stage"]
        if kind not in costs:
            continue
        old = costs[kind]
        full = float(row["s_per_sample"])
        per_object = pipeline.get("config", {}).get("objects_per_image", 1) if old.per == "object" else 1
        full /= max(1, per_object)  # bench-gpu reports per image; object captions cost per object
        one = extra.get(f"{kind}_batch1")
        batch1 = float(one["s_per_sample"]) / max(1, per_object) if one else full * old.batch1_s / old.full_item_s
        costs[kind] = dataclasses.replace(
            old, batch1_s=batch1, full_item_s=full, ref_batch=int(row["batch_size"]), measured=True,
            source=f"measured by make bench-gpu on {device}" + ("" if one else " (batch-1 ratio from the estimate)"))
    return costs


def load_costs(results_dir: Path | None) -> tuple[dict[str, UnitCost], str | None]:
    """The newest non-DRY `bench-gpu` JSON in `results_dir` applied to `PUBLISHED`, and its path (None: none)."""
    if results_dir is None or not Path(results_dir).is_dir():
        return dict(PUBLISHED), None
    for path in sorted(Path(results_dir).glob("bench_gpu*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        report = json.loads(path.read_text())
        if report.get("dry"):
            continue
        return from_bench_gpu(report), str(path)
    return dict(PUBLISHED), None
