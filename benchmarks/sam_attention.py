"""SAM image encoder: segment-anything's eager attention vs the SDPA forward (`pipelines.sam_efficient`), side by side.

Each variant runs in its own fresh process (random weights, fixed seed, CPU fp32 unless told otherwise) so its
peak resident memory (`ru_maxrss`) is its own; the report gives both peaks, the difference and the seconds per
image, plus the largest absolute difference between the two variants' embeddings.

    python -m benchmarks.sam_attention --arch vit_b --batch 1 --out .work/bench/sam_attention.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def run_variant(arch: str, attention: str, batch: int, repeats: int, out: Path) -> dict:
    """One variant in this process: build, warm up once, time `repeats` encoder calls; save the embedding."""
    from pipelines.sam_efficient import use_sdpa
    from pipelines.segment import SAM_ARCHS, build_sam_model

    torch.manual_seed(0)
    sam = build_sam_model(SAM_ARCHS[arch])
    with torch.no_grad():  # the real checkpoint's rel-pos tables are not zero: exercise the bias path
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.02)
    if attention == "sdpa":
        use_sdpa(sam)
    size = sam.image_encoder.img_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        emb = sam.image_encoder(x)  # warm-up; also the output compared across variants
        t0 = time.perf_counter()
        for _ in range(repeats):
            sam.image_encoder(x)
        seconds = (time.perf_counter() - t0) / repeats
    torch.save(emb, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"attention": attention, "arch": arch, "batch": batch, "s_per_image": seconds / batch,
            "peak_rss_mib": peak / 1024, "rss_before_forward_mib": before / 1024}


def compare(arch: str, batch: int, repeats: int, work: Path) -> dict:
    """Both variants, each in a fresh interpreter; returns the side-by-side report."""
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for attention in ("eager", "sdpa"):
        emb = work / f"sam_{attention}.pt"
        cmd = [sys.executable, "-m", "benchmarks.sam_attention", "--variant", attention, "--arch", arch,
               "--batch", str(batch), "--repeats", str(repeats), "--embedding", str(emb)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows[attention] = json.loads(done.stdout.strip().splitlines()[-1])
    eager, sdpa = (torch.load(work / f"sam_{a}.pt", weights_only=True) for a in ("eager", "sdpa"))
    e, s = rows["eager"], rows["sdpa"]
    return {
        "rows": [e, s],
        "forward_peak_mib": {k: round(r["peak_rss_mib"] - r["rss_before_forward_mib"], 1) for k, r in rows.items()},
        "time_ratio_sdpa_over_eager": round(s["s_per_image"] / e["s_per_image"], 3),
        "max_abs_diff": float((eager - sdpa).abs().max()),
        "device": "cpu", "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sam_attention", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(".work/bench/sam_attention.json"))
    p.add_argument("--variant", choices=["eager", "sdpa"], help=argparse.SUPPRESS)  # one variant, in-process
    p.add_argument("--embedding", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.variant:
        print(json.dumps(run_variant(args.arch, args.variant, args.batch, args.repeats, args.embedding)))
        return 0
    report = compare(args.arch, args.batch, args.repeats, args.out.parent / "sam_attention")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
