"""`make bench-gpu`: every GPU measurement in one call (≤ 8 min on one H100/H200), one JSON.

    python -m benchmarks.gpu                # full-size random-weight models on the GPU
    python -m benchmarks.gpu --dry          # the same code on CPU with tiny models (< 3 min): checks the script

Sections, each in its own subprocess (a clean CUDA context, its memory freed after) with its own time limit:
  pipeline          benchmarks.pipeline_gpu: each MLCID stage at its real micro-batch (InstructBLIP Flan-T5-XL,
                    OWLv2-B/16 960², SAM ViT-H 1024², SD 1.5 inpainting 512² 25 steps): s/item, peak memory
  pipeline_batch1   SD inpainting at batch 1: with the section above, the cost of a half-empty batch
  train             benchmarks.train_gpu: LayerDiff training step vs the plain SD UNet at SD 1.5 geometry, bf16
  sample            benchmarks.sample: one LayerDiff sample (CFG, CFG+SMG) vs StableDiffusionPipeline, SD 1.5
                    geometry at 256²
A section that fails or runs out of time is recorded with its status and the rest still run. The JSON goes to
`benchmarks/results/bench_gpu-<device>-<date>.json` (commit it: `make bench-pipeline-cost` then uses its
per-stage costs); a DRY run writes `.work/bench/bench_gpu_dry.json` marked `"dry": true`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_gpu")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SECTIONS = ("pipeline", "pipeline_batch1", "train", "sample")
# Seconds per section: on one H100/H200 (sum 470 ≤ 8 min); on CPU for --dry, ceilings with room for a loaded
# machine (an idle 2-core box runs the whole dry run in about 1 min of CPU time).
LIMITS = {"pipeline": 230, "pipeline_batch1": 50, "train": 110, "sample": 80}
DRY_LIMITS = {"pipeline": 150, "pipeline_batch1": 90, "train": 90, "sample": 90}


@dataclass(frozen=True)
class GpuRun:
    """What `make bench-gpu` runs."""

    dry: bool = False
    sections: tuple[str, ...] = SECTIONS
    out: Path | None = None  # default: see `default_out`
    python: str = sys.executable

    def limits(self) -> dict[str, int]:
        return DRY_LIMITS if self.dry else LIMITS


def section_command(name: str, dry: bool, out: Path) -> list[str]:
    """The argv that measures section `name` and writes its JSON to `out`."""
    py = [sys.executable, "-m"]
    if name == "pipeline":
        return [*py, "benchmarks.pipeline_gpu", *(["--tiny"] if dry else []), "--out", str(out)]
    if name == "pipeline_batch1":
        return [*py, "benchmarks.pipeline_gpu", *(["--tiny"] if dry else []), "--stages", "inpaint",
                "--batch-size", "inpaint=1", "--samples", "2" if dry else "8", "--out", str(out)]
    if name == "train":
        sizes = ["1", "2"] if dry else ["1", "2", "4", "8", "16"]
        return [*py, "benchmarks.train_gpu", *(["--tiny"] if dry else []), "--batch-sizes", *sizes,
                "--steps", "2" if dry else "3", "--warmup", "1", "--time-budget", "15" if dry else "90",
                "--out", str(out)]
    if name == "sample":
        return [*py, "benchmarks.gpu", "--sample-section", "--out", str(out), *(["--dry"] if dry else [])]
    raise KeyError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")


def sample_section(dry: bool, out: Path) -> None:
    """LayerDiff sampling vs StableDiffusionPipeline: SD 1.5 geometry at 256² on the GPU, the small one dry."""
    import torch

    from benchmarks import sample

    full = dict(sample.SD15, steps=50, layers=(2, 4))
    small = dict(latent_size=8, steps=2, layers=(2,))
    known = {f.name for f in dataclasses.fields(sample.BenchConfig)}
    config = sample.BenchConfig(**{k: v for k, v in (small if dry else full).items() if k in known})
    device = torch.device("cpu" if dry else "cuda")
    rows, parts = sample.run(config, device)
    out.write_text(json.dumps({"config": dataclasses.asdict(config), "device": str(device),
                               "rows": [dataclasses.asdict(r) for r in rows], "parts": parts}, indent=1, default=str))


def run_section(name: str, cfg: GpuRun, tmp: Path) -> dict[str, Any]:
    """Run one section in a subprocess under its time limit: {"status", "seconds", "result"?, "log_tail"?}."""
    out = tmp / f"{name}.json"
    cmd = section_command(name, cfg.dry, out)
    limit = cfg.limits()[name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cfg.dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run even on a GPU machine
    t0 = time.perf_counter()
    log.info("section %s (limit %ds): %s", name, limit, " ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"error (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        status = f"timeout after {limit}s"
        tail = (_text(e.stdout) + _text(e.stderr))[-3000:]
    row: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "command": cmd[1:]}
    if out.exists():
        row["result"] = json.loads(out.read_text())
    if status != "ok":
        row["log_tail"] = tail
    log.info("section %s: %s in %.0fs", name, status, row["seconds"])
    return row


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def device_name(dry: bool) -> str:
    if dry:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def default_out(cfg: GpuRun, device: str) -> Path:
    if cfg.dry:
        return REPO / ".work" / "bench" / "bench_gpu_dry.json"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return RESULTS / f"bench_gpu-{slug}-{dt.date.today():%Y%m%d}.json"


def run(cfg: GpuRun) -> dict[str, Any]:
    """All sections in order; the merged report (also written to `cfg.out` or `default_out`)."""
    device = device_name(cfg.dry)
    if not cfg.dry and device == "cpu":
        raise SystemExit("no CUDA device: run on a GPU machine, or `make bench-gpu DRY=1` to check the script")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        sections = {name: run_section(name, cfg, Path(tmp)) for name in cfg.sections}
    pipeline = dict(sections.get("pipeline", {}).get("result") or {})
    batch1 = (sections.get("pipeline_batch1", {}).get("result") or {}).get("stages", [])
    if pipeline:  # the shape `benchmarks.unit_costs.from_bench_gpu` reads
        pipeline["extra_stages"] = [dict(r, stage=f"{r['stage']}_batch1") for r in batch1]
    report = {
        "dry": cfg.dry, "device": device, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": _version("torch"), "diffusers": _version("diffusers"), "transformers": _version("transformers"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "status": {name: s["status"] for name, s in sections.items()},
        "pipeline": pipeline or None,
        "train": sections.get("train", {}).get("result"),
        "sample": sections.get("sample", {}).get("result"),
        "sections": {name: {k: v for k, v in s.items() if k != "result"} for name, s in sections.items()},
    }
    out = cfg.out or default_out(cfg, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp_out.replace(out)
    report["out"] = str(out)
    return report


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="tiny models on CPU (< 3 min); numbers mean nothing")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/…)")
    p.add_argument("--sample-section", action="store_true", help=argparse.SUPPRESS)  # the `sample` subprocess
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.sample_section:
        sample_section(args.dry, args.out)
        return 0
    report = run(GpuRun(dry=args.dry, sections=tuple(args.sections), out=args.out))
    for name, status in report["status"].items():
        print(f"{name:<16} {status:<24} {report['sections'][name]['seconds']:>6.0f} s")
    print(f"total {report['wall_s']:.0f} s → {report['out']}")
    return 0 if all(s == "ok" for s in report["status"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
