"""Batch fill of the runner's size buckets over LAION-shaped sizes, by shard size, size grid and pending bound.

    python -m benchmarks.bucket_fill                      # SD inpainting: 8 / 32 / 64-px grids
    python -m benchmarks.bucket_fill --stage saliency     # depth saliency: exact shapes / 56-px grid
No models: draws the items' image sizes from `benchmarks.laion_mix` (img2dataset 512 short side, the decoder's ×8
rounding), feeds them in chunks to the runner's `BucketQueue` keyed by the stage's working size (the SD
inpainter's `work_size`, the depth model's `depth_work_size`; grid 0 = exact shapes), drains it at the shard's
end and reports the mean batch fill. Seconds on CPU; it measures only the bucketing (which sizes meet in one
shard), the cost model (`make bench-pipeline-cost`) runs the real stages.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.laion_mix import LaionMix
from pipelines.base import Item
from pipelines.flow import BucketQueue
from pipelines.inpaint import work_size
from pipelines.saliency import depth_work_size

# stage → (working size of an (h, w) image on grid `step`, batch size, items per chunk reaching it, default
# items per shard, default grids): the real preset's batch sizes; per chunk of 32 inputs ~11 reach inpainting and
# ~29 reach saliency at the cost model's survival rates.
STAGES = {
    "inpaint": (lambda h, w, step: work_size(h, w, 512, step), 8, 11, [88, 340, 3400], [8, 32, 64]),
    "saliency": (lambda h, w, step: depth_work_size(h, w, 518, step), 32, 29, [231, 9000], [0, 56]),
}


def bucket_fill(survivors: int, step: int, batch_size: int = 8, per_chunk: int = 11, max_pending: int = 128,
                seed: int = 0, mix: LaionMix = LaionMix(), stage: str = "inpaint") -> dict[str, float]:
    """Fill and batch count for `survivors` items of one shard reaching `stage`, arriving `per_chunk` per chunk."""
    size = STAGES[stage][0]
    rng = np.random.default_rng(seed)
    items = []
    for i in range(survivors):
        w, h = mix.size(mix.draw_aspect(rng))
        items.append(Item(str(i), np.zeros((h // 8 * 8, w // 8 * 8, 3), np.uint8)))  # (H, W, 3) as decoded
    queue = BucketQueue(batch_size, lambda it: size(*it.image.shape[:2], step), lambda it: 1, max_pending)
    batches = [b for c in range(0, survivors, per_chunk) for b in queue.add(items[c:c + per_chunk])]
    batches += queue.drain()
    sizes = {size(*it.image.shape[:2], step) for it in items}
    return {"stage": stage, "survivors": survivors, "size_step": step, "max_pending": max_pending,
            "sizes": len(sizes), "batches": len(batches), "fill": round(survivors / (batch_size * len(batches)), 3)}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bucket_fill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=sorted(STAGES), default="inpaint")
    p.add_argument("--survivors", type=int, nargs="+",
                   help="items per shard reaching the stage (inpaint: 3400 ≈ a 10,000-image img2dataset shard at "
                        "yield 0.34; saliency: 9000 ≈ the same shard after detection)")
    p.add_argument("--steps", type=int, nargs="+", help="working-size grids (px; 0 = exact shapes)")
    p.add_argument("--max-pending", type=int, nargs="+", default=[128], help="the runner's max_pending")
    args = p.parse_args(argv)
    _, batch, per_chunk, survivors, steps = STAGES[args.stage]
    rows = [bucket_fill(n, s, batch, per_chunk, m, stage=args.stage) for n in args.survivors or survivors
            for s in args.steps or steps for m in args.max_pending]
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
