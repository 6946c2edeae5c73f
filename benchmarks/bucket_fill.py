"""Inpainting batch fill of the runner's size buckets over LAION-shaped sizes, by shard size and size grid.

    python -m benchmarks.bucket_fill
No models: draws the survivors' image sizes from `benchmarks.laion_mix` (img2dataset 512 short side, the
decoder's ×8 rounding), feeds them in chunks to the runner's `BucketQueue` keyed by the SD inpainter's
`work_size`, drains it at the shard's end and reports the mean batch fill. Seconds on CPU; it measures only the
bucketing (which sizes meet in one shard), the cost model (`make bench-pipeline-cost`) runs the real stages.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.laion_mix import LaionMix
from pipelines.base import Item
from pipelines.flow import BucketQueue
from pipelines.inpaint import work_size


def bucket_fill(survivors: int, step: int, batch_size: int = 8, per_chunk: int = 11, max_pending: int = 128,
                seed: int = 0, mix: LaionMix = LaionMix(), resolution: int = 512) -> dict[str, float]:
    """Fill and batch count for `survivors` inpainted items of one shard, arriving `per_chunk` per chunk."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(survivors):
        w, h = mix.size(mix.draw_aspect(rng))
        items.append(Item(str(i), np.zeros((h // 8 * 8, w // 8 * 8, 3), np.uint8)))  # (H, W, 3) as decoded
    queue = BucketQueue(batch_size, lambda it: work_size(*it.image.shape[:2], resolution, step), lambda it: 1,
                        max_pending)
    batches = [b for c in range(0, survivors, per_chunk) for b in queue.add(items[c:c + per_chunk])]
    batches += queue.drain()
    sizes = {work_size(*it.image.shape[:2], resolution, step) for it in items}
    return {"survivors": survivors, "size_step": step, "sizes": len(sizes), "batches": len(batches),
            "fill": round(survivors / (batch_size * len(batches)), 3)}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bucket_fill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--survivors", type=int, nargs="+", default=[88, 340, 3400],
                   help="inpainted items per shard (3400 ≈ a 10,000-image img2dataset shard at yield 0.34)")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 32, 64], help="working-size grids (px)")
    args = p.parse_args(argv)
    rows = [bucket_fill(n, s) for n in args.survivors for s in args.steps]
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
