"""Benchmark (`make bench-sample`): one LayerDiff sample of L layers vs StableDiffusionPipeline making L images.

    python -m benchmarks.sample [--layers 2 3 4] [--steps 50] [--repeats 1] [--json out.json]

Method
- One seeded SD-shaped pipeline (model.tiny's builder at the geometry below: 4 UNet levels, SD 1.5's channels
  and VAE widths divided by ~10, 128² images by default) is the baseline; LayerDiff is `LayerDiffUNet.from_unet` of the
  same UNet with the same VAE, text encoder and DDIM scheduler. Weights are random: cost does not depend on them.
- Rows per L: SD (L images, CFG); LayerDiff CFG and CFG+SMG (the paper's sampler: SMG and a mask decode at every
  step) as they were before the text cache ("before": `cache_text = False`, the prompt enhancer and the
  intra-layer K/V projections re-run at every step; same outputs) and as they are now; CFG+SMG with masks
  re-decoded every k steps; CFG+SMG on a window of the steps with masks every k' steps (an option, not the
  default; `--smg-window-start`, `--smg-window-end`, `--window-mask-interval`; by default the last 30 %).
  "×SD" = time / SD's time for the same L images;
  `--json` also gets `ratio_vs_sd` = {"cfg_L2": r, "cfg+smg_L2": r, …} keyed by each row's short name.
- Time: one full call (text encoding, all steps, final decode) after a 1-step warm-up of each variant; variants
  alternate (order flipped every repeat); medians. On CPU the ratios use the process's CPU time, which other
  jobs on shared cores barely disturb (wall time is shown too; pin `--threads` so both mean the same work); on
  CUDA wall time after synchronize.
- Peak memory: on CUDA `max_memory_allocated`; on CPU a TorchDispatchMode that sees every tensor storage created
  and freed (`StoragePeak`), over a separate 2-step call: the peak beyond the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import logging
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model.sampling.pipeline import LayerDiffPipeline
from model.tiny import TinySDConfig, build_sd_pipeline
from model.network.unet import LayerDiffUNet

log = logging.getLogger("benchmarks.sample")
GLOBAL_PROMPT = "a dog playing with a red ball on the grass in a sunny park"
FOREGROUNDS = ["a red ball", "a dog", "a wooden bench"]


@dataclass(frozen=True)
class BenchConfig:
    """Geometry and sampler settings of the benchmark."""

    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)  # SD 1.5: (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int = 8  # heads, as SD 1.x
    latent_size: int = 16  # 128² px (the paper samples 256²: `--size 256`; cost ratios barely depend on it)
    text_hidden: int = 64  # SD: 768
    text_layers: int = 2
    vae_block_out_channels: tuple[int, ...] = (16, 32, 64, 64)  # SD: (128, 256, 512, 512)
    layers: tuple[int, ...] = (2, 3, 4)
    steps: int = 50
    cfg: float = 3.0
    smg: float = 3.0
    repeats: int = 1
    mask_interval: int = 5  # the extra "SMG, masks every k steps" row
    smg_window_start: float = 0.7  # the "SMG on a window" row: SMG on steps start·steps <= i < end·steps
    smg_window_end: float = 1.0  # (the last 30 %: learn-bench's cfg+smg-window, which keeps SMG's gains),
    window_mask_interval: int = 2  # … masks re-decoded every this many steps
    seed: int = 0
    threads: int | None = None
    compile: bool = False  # torch.compile both UNets (SD's and LayerDiff's) before the warm-up
    rows: tuple[str, ...] | None = None  # `ratio_vs_sd` keys of the LayerDiff rows to run (None: all); SD always runs

    def sd_config(self) -> TinySDConfig:
        n = len(self.block_out_channels)
        return TinySDConfig(
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            attention_head_dim=self.attention_head_dim, sample_size=self.latent_size, text_hidden=self.text_hidden,
            text_layers=self.text_layers, text_heads=4, text_intermediate=4 * self.text_hidden,
            vae_block_out_channels=self.vae_block_out_channels,
            vae_norm_groups=min(self.vae_block_out_channels) // 4, seed=self.seed)  # 4 channels a group: SD's 128/32


TINY = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, text_hidden=32,
            vae_block_out_channels=(8, 8, 8, 8))  # `--tiny`: the same code path in seconds
# `--sd15`: SD 1.5's UNet, CLIP-L-sized text encoder and VAE (random weights), at the paper's 256²
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), text_hidden=768, text_layers=12,
            vae_block_out_channels=(128, 256, 512, 512), latent_size=32)


def clock(device: torch.device) -> float:
    """Seconds for timing: on CPU the process's CPU time (all its threads) — robust when other jobs share the
    cores; on CUDA wall time after a synchronize."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


@dataclass
class Row:
    """One measured variant."""

    layers: int
    name: str
    seconds: float  # CPU seconds on CPU, wall seconds on CUDA (see `clock`)
    wall_seconds: float
    peak_mib: float
    unet_calls: float  # per step (averaged: SMG on a window of steps)
    times: list[float] = field(default_factory=list)


def build(config: BenchConfig, device: torch.device) -> tuple:
    """(SD pipeline, LayerDiff pipeline) sharing VAE, text encoder, tokenizer and the SD UNet weights."""
    sd = build_sd_pipeline(config.sd_config())
    unet = LayerDiffUNet.from_unet(sd.unet, max_layers=max(config.layers))
    ld = LayerDiffPipeline(unet=unet, vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                           scheduler=sd.scheduler)
    for pipe in (sd, ld):
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if config.compile:
            pipe.unet.compile()  # nn.Module.compile: in place, the module keeps its type and config
    return sd, ld


@contextlib.contextmanager
def per_step_text(ld: LayerDiffPipeline):
    """The sampler as before the text cache: prompt enhancer and intra-layer K/V projections at every step."""
    before = ld.cache_text
    ld.cache_text = False
    try:
        yield
    finally:
        ld.cache_text = before


# row name → short key in "ratio_vs_sd" (suffixed "_L{L}")
KEYS = {"SD 1.5 pipeline, CFG": "sd", "LayerDiff CFG, before": "cfg_before", "LayerDiff CFG": "cfg",
        "LayerDiff CFG+SMG, before": "cfg+smg_before", "LayerDiff CFG+SMG": "cfg+smg"}


def row_key(name: str) -> str:
    if name in KEYS:
        return KEYS[name]
    if "window" in name:
        return "cfg+smg_window"
    return "cfg+smg_masks" + name.rsplit(" ", 1)[-1]


def variants(sd, ld, L: int, config: BenchConfig) -> dict[str, Callable[[int], object]]:
    """name → run(steps) for one layer count."""
    prompts = ["the background", *FOREGROUNDS[: L - 1]]
    size = config.latent_size * 8

    def gen():
        return torch.Generator("cpu").manual_seed(config.seed)

    def layerdiff(guidance: str, interval: int = 1, before: bool = False, smg_start: float = 0.0,
                  smg_end: float = 1.0):
        def run_one(steps):
            with per_step_text(ld) if before else contextlib.nullcontext():
                return ld(GLOBAL_PROMPT, prompts, num_inference_steps=steps, guidance_scale=config.cfg,
                          smg_scale=config.smg, guidance=guidance, smg_mask_interval=interval,
                          smg_start=smg_start, smg_end=smg_end,
                          height=size, width=size, generator=gen(), output_type="np")
        return run_one

    return {
        "SD 1.5 pipeline, CFG": lambda steps: sd(GLOBAL_PROMPT, num_inference_steps=steps, guidance_scale=config.cfg,
                                                 num_images_per_prompt=L, height=size, width=size, generator=gen(),
                                                 output_type="np"),
        "LayerDiff CFG, before": layerdiff("cfg", before=True),
        "LayerDiff CFG": layerdiff("cfg"),
        "LayerDiff CFG+SMG, before": layerdiff("cfg+smg", before=True),
        "LayerDiff CFG+SMG": layerdiff("cfg+smg"),
        f"LayerDiff CFG+SMG, masks every {config.mask_interval}": layerdiff("cfg+smg", config.mask_interval),
        f"LayerDiff CFG+SMG on a window (steps {config.smg_window_start:.0%}–{config.smg_window_end:.0%}), masks "
        f"every {config.window_mask_interval}": layerdiff("cfg+smg", config.window_mask_interval,
                                                           smg_start=config.smg_window_start,
                                                           smg_end=config.smg_window_end),
    }


def unet_calls_per_step(pipe, fn: Callable[[int], object], steps: int) -> float:
    """UNet forwards per denoising step, averaged over a `steps`-step call."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        fn(steps)
    finally:
        handle.remove()
    return len(calls) / steps


class StoragePeak(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and alive at once (CPU or any device): every op's
    outputs are recorded by storage, and a weakref finalizer subtracts them when freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live and storage.nbytes() > 0:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def peak_memory_mib(fn: Callable[[int], object], device: torch.device) -> float:
    """Peak bytes allocated beyond the weights during a 2-step call, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(2)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with StoragePeak() as tracker:
        fn(2)
    return tracker.peak / 2**20


@torch.no_grad()
def part_costs(sd, ld, L: int, config: BenchConfig, device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Seconds per call (median) of the pieces of one denoising step, to explain the totals."""
    h = config.latent_size
    g = torch.Generator("cpu").manual_seed(0)
    text = torch.randn(2, 77, config.text_hidden, generator=g).to(device)
    layer_text = torch.randn(2, L, 77, config.text_hidden, generator=g).to(device)
    x = torch.randn(2, L, 8, h, h, generator=g).to(device)  # (B=2: cond + negative, L, 8, h, w)
    both = ld.unet.prepare_text(text, layer_text)  # as the sampler: prompts prepared once per call
    one = both[0:1]
    pieces = {
        "SD UNet, 2L images": lambda: sd.unet(x[:, :, :4].reshape(2 * L, 4, h, h), 500,
                                              text.repeat_interleave(L, dim=0)),
        "LayerDiff UNet, 2×L (CFG call)": lambda: ld.unet(x, 500, both.global_text, both.layer_text, prepared=both),
        "LayerDiff UNet, 1×L (SMG call)": lambda: ld.unet(x[:1], 500, one.global_text, one.layer_text,
                                                          prepared=one),
        "VAE decode, L masks": lambda: ld.vae.decode(x[0, :, :4]),
    }
    out = {}
    for name, fn in pieces.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = clock(device)
            fn()
            times.append(clock(device) - t0)
        out[name] = statistics.median(times)
    return out


def run(config: BenchConfig, device: torch.device) -> tuple[list[Row], dict[int, dict[str, float]]]:
    """Measure every variant for every layer count, and the per-call costs of a step's pieces."""
    if config.threads:
        torch.set_num_threads(config.threads)
    elif device.type == "cpu" and torch.get_num_threads() > 1:
        log.warning("timing on CPU with torch's %d threads: on shared cores idle OpenMP threads spin and the CPU "
                    "time read here grows many-fold for the same work; pass --threads 1 (as make bench-sample does)",
                    torch.get_num_threads())
    sd, ld = build(config, device)
    rows: list[Row] = []
    parts: dict[int, dict[str, float]] = {}
    for L in config.layers:
        parts[L] = part_costs(sd, ld, L, config, device)
        every = variants(sd, ld, L, config)
        unknown = set(config.rows or ()) - {row_key(name) for name in every}
        if unknown:
            raise ValueError(f"unknown rows {sorted(unknown)}; known: {sorted(row_key(n) for n in every)}")
        fns = {name: fn for name, fn in every.items()
               if name.startswith("SD") or config.rows is None or row_key(name) in config.rows}
        owners = {name: (sd if name.startswith("SD") else ld) for name in fns}
        for fn in fns.values():  # warm-up
            fn(1)
        times: dict[str, list[float]] = {name: [] for name in fns}
        walls: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(config.repeats):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))
            for name in order:
                t0, w0 = clock(device), time.perf_counter()
                fns[name](config.steps)
                times[name].append(clock(device) - t0)
                walls[name].append(time.perf_counter() - w0)
                log.info("L=%d %-40s %.2f s (wall %.2f s)", L, name, times[name][-1], walls[name][-1])
        for name, fn in fns.items():
            owner = owners[name]
            mem = peak_memory_mib(fn, device)
            calls = unet_calls_per_step(owner, fn, 4)
            rows.append(Row(L, name, statistics.median(times[name]), statistics.median(walls[name]), mem, calls,
                            times[name]))
    return rows, parts


def markdown(rows: list[Row], parts: dict[int, dict[str, float]], config: BenchConfig, device: torch.device,
             command: str) -> str:
    """The results table with the command and settings."""
    sd_time = {r.layers: r.seconds for r in rows if r.name.startswith("SD")}
    unit = "CPU s" if device.type == "cpu" else "time s"
    lines = [
        f"`{command}`",
        "",
        f"device {device} ({torch.get_num_threads()} threads), {config.steps} DDIM steps, CFG {config.cfg}, "
        f"SMG {config.smg}, {config.latent_size * 8}² px, UNet {config.block_out_channels} × "
        f"{config.layers_per_block}/level, VAE {config.vae_block_out_channels}, random weights",
        "",
        f"| L | images | sampler | UNet calls/step | {unit} | wall s | {unit.split()[0]} s/image | ×SD | "
        "peak MiB (beyond weights) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.layers} | {r.layers} | {r.name} | {r.unet_calls:g} | {r.seconds:.2f} | "
                     f"{r.wall_seconds:.2f} | "
                     f"{r.seconds / r.layers:.2f} | {r.seconds / sd_time[r.layers]:.2f} | {r.peak_mib:.0f} |")
    names = list(next(iter(parts.values())))
    lines += ["", f"Per-call cost of a step's pieces ({unit}, median of 3); SMG step ×SD = (CFG call + SMG call + mask "
              "decode) / SD UNet:", "",
              "| L | " + " | ".join(names) + " | SMG step ×SD |", "|---" * (len(names) + 2) + "|"]
    for L, p in parts.items():
        smg = (p[names[1]] + p[names[2]] + p[names[3]]) / p[names[0]]
        lines.append(f"| {L} | " + " | ".join(f"{p[n]:.3f}" for n in names) + f" | {smg:.2f} |")
    return "\n".join(lines)


def ratios_vs_sd(rows: list[Row]) -> dict[str, float]:
    """{"cfg_L2": time / SD's time for L = 2, "cfg+smg_L2": …} for every LayerDiff row."""
    sd_time = {r.layers: r.seconds for r in rows if r.name.startswith("SD")}
    return {f"{row_key(r.name)}_L{r.layers}": round(r.seconds / sd_time[r.layers], 3)
            for r in rows if not r.name.startswith("SD")}


def results(rows: list[Row], parts: dict[int, dict[str, float]], config: BenchConfig, device: torch.device,
            command: str) -> dict:
    return {"command": command, "config": asdict(config), "device": str(device), "threads": torch.get_num_threads(),
            "ratio_vs_sd": ratios_vs_sd(rows), "rows": [asdict(r) for r in rows], "parts": parts}


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (a .tmp file renamed), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sample",
        description="Time and peak memory of one LayerDiff sample (L layers; CFG, CFG+SMG) vs the SD pipeline "
                    "making L images with CFG, same UNet geometry, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = BenchConfig()
    parser.add_argument("--layers", type=int, nargs="+", default=list(defaults.layers), help="layer counts L")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="DDIM steps per sample")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed calls per variant (median)")
    parser.add_argument("--mask-interval", type=int, default=defaults.mask_interval,
                        help="k of the extra 'SMG, masks every k steps' row")
    parser.add_argument("--smg-window-start", type=float, default=defaults.smg_window_start,
                        help="the window row: SMG on the steps from this fraction of the steps on …")
    parser.add_argument("--smg-window-end", type=float, default=defaults.smg_window_end,
                        help="… and before this fraction")
    parser.add_argument("--window-mask-interval", type=int, default=defaults.window_mask_interval,
                        help="the window row: masks re-decoded every this many steps")
    parser.add_argument("--size", type=int, default=defaults.latent_size * 8, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile both UNets (compiles in the warm-up)")
    geometry = parser.add_mutually_exclusive_group()
    geometry.add_argument("--tiny", action="store_true", help="a tiny geometry (tests: seconds, not a measurement)")
    geometry.add_argument("--sd15", action="store_true",
                          help="SD 1.5's full geometry at 256² (overrides --size; ~10 CPU-min per 50-step sample)")
    parser.add_argument("--rows", nargs="+", default=None, metavar="KEY",
                        help="only these LayerDiff rows (keys of ratio_vs_sd without _L: cfg, cfg_before, cfg+smg, "
                             "cfg+smg_before, cfg+smg_masks<k>, cfg+smg_window); the SD row always runs")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the rows and ratio_vs_sd as JSON here (make bench-sample: "
                             ".work/bench/sample.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if min(args.layers) < 2 or min(args.steps, args.repeats, args.mask_interval, args.window_mask_interval) < 1:
        parser.error("--layers must be >= 2, --steps, --repeats and the mask intervals >= 1")
    if not 0 <= args.smg_window_start < args.smg_window_end <= 1:
        parser.error("need 0 <= --smg-window-start < --smg-window-end <= 1")
    if args.size % 64:
        parser.error("--size must be a multiple of 64 (VAE ×8, then 3 UNet downsamplings)")
    settings = dict(layers=tuple(args.layers), steps=args.steps, repeats=args.repeats,
                    mask_interval=args.mask_interval, threads=args.threads,
                    smg_window_start=args.smg_window_start, smg_window_end=args.smg_window_end,
                    window_mask_interval=args.window_mask_interval, latent_size=args.size // 8,
                    compile=args.compile, rows=tuple(args.rows) if args.rows else None)
    config = BenchConfig(**(settings | (TINY if args.tiny else SD15 if args.sd15 else {})))
    device = torch.device(args.device)
    rows, parts = run(config, device)
    command = "python -m benchmarks.sample " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(markdown(rows, parts, config, device, command.strip()))
    if args.json:
        write_json(args.json, results(rows, parts, config, device, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
