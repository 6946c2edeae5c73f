"""`make bench-io`: writer and reader throughput on 256² samples with 4 layers, single process (= per core).

Rates are samples per CPU-second of this one process (what one core delivers, whatever else runs on the machine)
and per wall-second beside them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mlcid.composite import composite
from mlcid.reader import MLCIDReader
from mlcid.schema import BACKGROUND_PROMPT, LayerInfo, MLCIDSample
from mlcid.writer import ShardWriter


def make_bench_sample(rng: np.random.Generator, index: int, size: int, foregrounds: int) -> MLCIDSample:
    """A photo-like sample: smooth colour field + noise background, noisy rectangles as foregrounds."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([yy, xx, (xx + yy) / 2], -1) * rng.uniform(80, 200, 3) + rng.uniform(0, 50, 3)
    bg = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    band = size // foregrounds
    fgs, masks, layers = [], [], [LayerInfo(BACKGROUND_PROMPT)]
    for i in range(foregrounds):
        m = np.zeros((size, size), np.uint8)
        y0, x0 = rng.integers(0, size // 3), i * band
        m[y0 : y0 + size // 2, x0 + 2 : x0 + band - 2] = 255
        rgb = np.clip(rng.uniform(0, 255, 3) + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        rgb[m == 0] = 127  # MLCID layers hold source pixels inside the cut-out, a constant fill outside
        fgs.append(np.concatenate([rgb, m[..., None]], -1))
        masks.append(m)
        layers.append(LayerInfo(f"object {i}", area_frac=float((m > 0).mean())))
    return MLCIDSample(f"{index:09d}", "a benchmark scene", composite(bg, fgs, masks), bg, fgs, masks, layers)


def to_tensors(sample: MLCIDSample) -> tuple[np.ndarray, np.ndarray]:
    """Images (L, 3, H, W) and masks (L, 1, H, W) as float32 in [-1, 1] — the trainer's input layout.

    Masks stay one channel here; the trainer repeats them to 3 channels on the device (a broadcast, not a copy).
    """
    layers = [sample.background] + [f[..., :3] for f in sample.foregrounds]
    h, w = sample.height, sample.width
    images = np.empty((len(layers), 3, h, w), np.float32)
    for i, rgb in enumerate(layers):
        images[i] = rgb.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W), converted to float on assignment
    masks = np.empty((len(layers), 1, h, w), np.float32)
    union = np.zeros((h, w), np.uint8)
    for i, m in enumerate(sample.masks, start=1):
        masks[i, 0] = m
        union |= m
    masks[0, 0] = 255 - union  # background mask = complement of the foregrounds' union
    for arr in (images, masks):
        arr *= 1.0 / 127.5
        arr -= 1.0
    return images, masks


def run(samples: int, size: int, layers: int, out: Path) -> dict[str, float]:
    rng = np.random.default_rng(0)
    made = [make_bench_sample(rng, i, size, layers - 1) for i in range(samples)]
    # Per-core rates use this process's CPU time (robust to other load on the machine); wall rates beside them.
    start, cpu = time.perf_counter(), time.process_time()
    with ShardWriter(out, 0) as writer:
        for s in made:
            writer.write(s)
    write_s, write_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    count = 0
    for s in MLCIDReader(str(writer.path)):
        images, masks = to_tensors(s)
        count += 1
    read_s, read_cpu = time.perf_counter() - start, time.process_time() - cpu
    assert count == samples, f"read {count} of {samples}"
    return {
        "samples": samples,
        "size": size,
        "layers": layers,
        "shard_mb": writer.path.stat().st_size / 2**20,
        "write_per_s": samples / write_s,
        "write_per_cpu_s": samples / write_cpu,
        "read_decode_per_s": samples / read_s,
        "read_decode_per_cpu_s": samples / read_cpu,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shard_io", description=__doc__)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            results.append(run(args.samples, args.size, args.layers, Path(tmp) / str(r)))
    med = {k: float(np.median([r[k] for r in results])) for k in results[0]}
    print("| samples | size | layers | shard MB | write /CPU-s | write /s wall | read+decode→tensors /CPU-s | read /s wall |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {med['samples']:.0f} | {med['size']:.0f}² | {med['layers']:.0f} | {med['shard_mb']:.1f} | "
          f"{med['write_per_cpu_s']:.0f} | {med['write_per_s']:.0f} | {med['read_decode_per_cpu_s']:.0f} | "
          f"{med['read_decode_per_s']:.0f} |")
    print(f"(median of {args.repeats} runs; command: make bench-io)")


if __name__ == "__main__":
    main()
