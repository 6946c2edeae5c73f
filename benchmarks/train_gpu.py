"""GPU benchmark at the full SD 1.5 UNet geometry: training throughput and peak memory of LayerDiffUNet.

    python -m benchmarks.train_gpu [--batch-sizes 1 2 4 8 16 32] [--layers 4] [--out results.json]
    python -m benchmarks.train_gpu --tiny      # seconds, runs on CPU: checks the script itself

Random weights (no download) in diffusers' SD 1.5 UNet config (block_out_channels (320, 640, 1280, 1280),
cross_attention_dim 768, 8 heads) at 256² images (32² latents), 77-token prompts. One training step = zero_grad →
bf16-autocast forward → MSE loss → backward → fused AdamW step (fp32 master weights). For every batch size
B (samples × L layers) and checkpointing mode it reports step time, samples/s, images/s and
`torch.cuda.max_memory_allocated` (weights + grads + AdamW states + activations). Checkpointing modes: off,
full (diffusers' switch: SD blocks and collab blocks) and, for LayerDiff, collab (only the collab blocks are
recomputed). The plain SD UNet on the same B·L images is the baseline (`--no-baseline` skips it). A batch
size that runs out of memory is reported as OOM and larger ones for that setting are skipped; a time budget
(default 420 s) keeps the whole run under ~8 min.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.train import (
    SD15_GEOMETRY,
    TINY_GEOMETRY,
    BenchGeometry,
    layerdiff_loss,
    make_batch,
    plain_loss,
)
from model.network.unet import LayerDiffUNet

log = logging.getLogger("bench_train_gpu")


@dataclass(frozen=True)
class GpuBenchConfig:
    geometry: BenchGeometry = SD15_GEOMETRY
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    layers: int = 4
    warmup: int = 2
    steps: int = 5
    baseline: bool = True
    time_budget_s: float = 420.0
    device: str = "cuda"


@dataclass
class Result:
    model: str  # "plain" | "layerdiff"
    checkpointing: str  # off | full (diffusers' switch, SD + collab blocks) | collab (collab blocks only)
    batch: int  # LayerDiff samples; the plain UNet gets batch × layers images
    images: int
    status: str = "ok"  # ok | OOM | skipped (…)
    step_s: float | None = None
    samples_per_s: float | None = None
    images_per_s: float | None = None
    peak_gib: float | None = None
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _ckpt_mode(model: torch.nn.Module) -> str:
    if model.is_gradient_checkpointing:
        return "full"
    if isinstance(model, LayerDiffUNet) and any(w.checkpoint_collab for w in model.collab_blocks()):
        return "collab"
    return "off"


def _set_ckpt_mode(model: torch.nn.Module, mode: str) -> None:
    model.enable_gradient_checkpointing() if mode == "full" else model.disable_gradient_checkpointing()
    if isinstance(model, LayerDiffUNet):
        model.enable_layer_block_checkpointing(mode == "collab")


def run_config(model: torch.nn.Module, loss_fn, cfg: GpuBenchConfig, batch: int, device: torch.device) -> Result:
    """Warm-up + timed training steps of one model at one batch size; OOM is caught and reported."""
    name = "layerdiff" if isinstance(model, LayerDiffUNet) else "plain"
    result = Result(name, _ckpt_mode(model), batch, batch * cfg.layers)
    data = make_batch(cfg.geometry, batch, cfg.layers, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-2, fused=device.type == "cuda")
    times: list[float] = []
    loss = None
    try:
        _free(device)
        for i in range(cfg.warmup + cfg.steps):
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn(model, data)
            loss.backward()
            opt.step()
            _sync(device)
            if i >= cfg.warmup:
                times.append(time.perf_counter() - t0)
        result.step_s = statistics.median(times)
        result.samples_per_s = batch / result.step_s
        result.images_per_s = batch * cfg.layers / result.step_s
        if device.type == "cuda":
            result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError:
        result.status = "OOM"
    finally:
        opt.zero_grad(set_to_none=True)
        del opt, data, loss  # drop the graph too (an OOM in backward leaves it alive)
        _free(device)
    return result


def run(cfg: GpuBenchConfig) -> list[Result]:
    """Every (model, checkpointing, batch size) in order, within the time budget."""
    device = torch.device(cfg.device)
    start = time.perf_counter()
    results: list[Result] = []
    torch.manual_seed(0)
    with torch.device(device):  # build straight on the device: random init of ~1.3B params is slow on CPU
        from diffusers import UNet2DConditionModel

        plain = UNet2DConditionModel(**cfg.geometry.unet_config())
    log.info("plain UNet built: %.0fM params", sum(p.numel() for p in plain.parameters()) / 1e6)

    def sweep(model: torch.nn.Module, loss_fn) -> None:
        model.train()
        modes = ("off", "full", "collab") if isinstance(model, LayerDiffUNet) else ("off", "full")
        for ckpt in modes:
            _set_ckpt_mode(model, ckpt)
            oom_at = None
            for b in cfg.batch_sizes:
                name = "layerdiff" if isinstance(model, LayerDiffUNet) else "plain"
                if oom_at is not None:
                    results.append(Result(name, ckpt, b, b * cfg.layers, f"skipped (OOM at B={oom_at})"))
                    continue
                if time.perf_counter() - start > cfg.time_budget_s:
                    results.append(Result(name, ckpt, b, b * cfg.layers, "skipped (time budget)"))
                    continue
                r = run_config(model, loss_fn, cfg, b, device)
                log.info("%s ckpt=%s B=%d: %s %s s/step %s GiB", name, ckpt, b, r.status,
                         f"{r.step_s:.3f}" if r.step_s else "-", f"{r.peak_gib:.1f}" if r.peak_gib else "-")
                results.append(r)
                if r.status == "OOM":
                    oom_at = b

    if cfg.baseline:
        sweep(plain, plain_loss)
    with torch.device(device):
        layerdiff = LayerDiffUNet.from_unet(plain, max_layers=cfg.layers)
    del plain
    _free(device)
    log.info("LayerDiffUNet built: %.0fM params", sum(p.numel() for p in layerdiff.parameters()) / 1e6)
    sweep(layerdiff, layerdiff_loss)
    return results


def markdown_table(results: list[Result]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| model | grad ckpt | B samples | images B·L | step s | samples/s | images/s | peak GiB | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.model} | {r.checkpointing} | {r.batch} | {r.images} | "
                     f"{f(r.step_s, '.3f')} | {f(r.samples_per_s, '.1f')} | {f(r.images_per_s, '.1f')} | "
                     f"{f(r.peak_gib, '.1f')} | {r.status} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="samples per step (default 1..32)")
    p.add_argument("--layers", type=int, default=4, help="layers L per sample")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per setting first")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain SD UNet baseline")
    p.add_argument("--time-budget", type=float, default=420.0, help="stop starting new settings after this (s)")
    p.add_argument("--tiny", action="store_true", help="tiny geometry on CPU (or --device): checks the script")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny to check the script on CPU")
    cfg = GpuBenchConfig(
        geometry=TINY_GEOMETRY if args.tiny else SD15_GEOMETRY,
        batch_sizes=tuple(args.batch_sizes or ((1, 2) if args.tiny else (1, 2, 4, 8, 16, 32))),
        layers=args.layers, warmup=args.warmup, steps=args.steps, baseline=not args.no_baseline,
        time_budget_s=args.time_budget, device=device,
    )
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = "CPU"
    log.info("device %s, torch %s, config %s", device_name, torch.__version__, cfg)
    results = run(cfg)
    argv_shown = sys.argv[1:] if argv is None else argv
    print(f"\n`python -m benchmarks.train_gpu {shlex.join(argv_shown)}` on {device_name} (torch {torch.__version__}, "
          f"bf16 autocast, AdamW (fused on CUDA); L={cfg.layers}, {cfg.geometry.latent_size}² latents)\n")
    print(markdown_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


if __name__ == "__main__":
    main()
