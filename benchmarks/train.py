"""CPU benchmark: one training step (forward + backward) of LayerDiffUNet on B samples × L layers vs the plain
diffusers UNet on B·L images of the same geometry. Time and peak memory, side by side, as a markdown table.

    python -m benchmarks.train [--layers 2 3 4] [--batch 1] [--repeats 5] [--threads 1] [--ablations] [--profile]

Method
- Both networks come from one seeded SD-shaped UNet (LayerDiffUNet.from_unet), so the SD weights are identical.
- Variants: the plain UNet (B·L images), LayerDiff, and LayerDiff recomputing only its collab blocks in
  backward (`enable_layer_block_checkpointing`). "×" columns are ratios to the plain UNet.
- Time: zero_grad → forward → MSE loss → backward, as wall clock and as process CPU time (`time.process_time`;
  with `--threads 1` it is the compute itself and barely moves when other jobs share the cores, so it is the
  figure to compare on a busy machine). Warm-up steps first, then the variants alternate (order flipped every
  repeat) so drifting machine load hits all alike; medians are reported.
- `--ablations`: LayerDiff without the prompt enhancer, and with a 1× collab FFN: module-level attribution.
- `--profile`: per-op self CPU time of one step of each (torch.profiler), sorted by LayerDiff's extra time.
- Peak memory: `torch.distributed._tools.mem_tracker.MemTracker` (a TorchDispatchMode that sees every tensor
  storage created and freed, CPU included) over one step in a separate pass, so its overhead never touches the
  timings. "total" = parameters + gradients + activations + temporaries at the peak; "step" = total minus the
  parameters (what the step itself allocates).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import UNet2DConditionModel

from model.network.unet import LayerDiffUNet

log = logging.getLogger("bench_train")


@dataclass(frozen=True)
class BenchGeometry:
    """An SD-1.x-shaped UNet: CrossAttn down blocks then one plain, mirrored on the way up."""

    block_out_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int = 2
    cross_attention_dim: int = 128
    attention_head_dim: int = 8  # diffusers' SD-1.x naming: this is the number of heads
    latent_size: int = 32  # 256² images through the SD VAE (factor 8)
    text_tokens: int = 77

    def unet_config(self) -> dict:
        n = len(self.block_out_channels)
        return dict(
            sample_size=self.latent_size,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=self.attention_head_dim,
        )


CPU_GEOMETRY = BenchGeometry()
TINY_GEOMETRY = BenchGeometry((32, 64), 1, 32, 8, 16, 8)
SD15_GEOMETRY = BenchGeometry((320, 640, 1280, 1280), 2, 768, 8, 32, 77)  # diffusers' SD 1.5 UNet config


def build_models(geometry: BenchGeometry, max_layers: int, seed: int = 0) -> tuple[UNet2DConditionModel, LayerDiffUNet]:
    """A seeded random SD-shaped UNet and the LayerDiffUNet built from it (same SD weights)."""
    torch.manual_seed(seed)
    plain = UNet2DConditionModel(**geometry.unet_config())
    return plain, LayerDiffUNet.from_unet(plain, max_layers=max_layers)


def make_batch(geometry: BenchGeometry, batch: int, layers: int, device: str | torch.device = "cpu",
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LayerDiff training inputs + noise target for B samples × L layers."""
    g = torch.Generator().manual_seed(seed)
    s, t, d = geometry.latent_size, geometry.text_tokens, geometry.cross_attention_dim
    out = {
        "sample": torch.randn(batch, layers, 8, s, s, generator=g),
        "timesteps": torch.randint(0, 1000, (batch, layers), generator=g),
        "global_text": torch.randn(batch, t, d, generator=g),
        "layer_text": torch.randn(batch, layers, t, d, generator=g),
        "target": torch.randn(batch, layers, 8, s, s, generator=g),
    }
    return {k: v.to(device) for k, v in out.items()}


def layerdiff_loss(model: LayerDiffUNet, b: dict[str, torch.Tensor]) -> torch.Tensor:
    pred = model(b["sample"], b["timesteps"], b["global_text"], b["layer_text"]).sample  # (B, L, 8, h, w)
    return torch.nn.functional.mse_loss(pred.float(), b["target"])


def plain_loss(unet: UNet2DConditionModel, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain UNet on the same B·L image latents, global prompt repeated per layer."""
    B, L = b["sample"].shape[:2]
    x = b["sample"][:, :, :4].flatten(0, 1)  # (B·L, 4, h, w)
    text = b["global_text"].repeat_interleave(L, dim=0)  # (B·L, T, D)
    pred = unet(x, b["timesteps"].flatten(), text).sample
    return torch.nn.functional.mse_loss(pred.float(), b["target"][:, :, :4].flatten(0, 1))


def train_step(model: torch.nn.Module, loss_fn: Callable, batch: dict[str, torch.Tensor]) -> float:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return float(loss.detach())


def timed_step(model, loss_fn, batch) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one training step."""
    t0, c0 = time.perf_counter(), time.process_time()
    train_step(model, loss_fn, batch)
    return time.perf_counter() - t0, time.process_time() - c0


def peak_memory(model: torch.nn.Module, loss_fn: Callable, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(total peak bytes, peak bytes beyond the parameters) of one training step, via MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        train_step(model, loss_fn, batch)
    snapshot = tracker.get_tracker_snapshot("peak")
    stats = snapshot[torch.device("cpu")]
    total = int(stats["Total"])
    params = sum(int(v) for k, v in stats.items() if str(k).endswith("PARAM"))
    model.zero_grad(set_to_none=True)
    return total, total - params


def variants(plain: UNet2DConditionModel, layerdiff: LayerDiffUNet, ablations: bool = False) -> dict[str, tuple]:
    """name → (model, loss_fn, setup): the baseline, LayerDiff with/without collab-block checkpointing and, with
    `ablations`, LayerDiff without the prompt enhancer and with a 1× (instead of 4×) collab FFN."""
    runs = {
        "plain UNet": (plain, plain_loss, lambda: None),
        "LayerDiff": (layerdiff, layerdiff_loss, lambda: layerdiff.enable_layer_block_checkpointing(False)),
        "LayerDiff, collab ckpt": (layerdiff, layerdiff_loss, lambda: layerdiff.enable_layer_block_checkpointing(True)),
    }
    if ablations:
        max_layers = layerdiff.config.max_layers
        no_enhancer = LayerDiffUNet.from_unet(plain, max_layers=max_layers, use_prompt_enhancer=False).train()
        small_ffn = LayerDiffUNet.from_unet(plain, max_layers=max_layers, layer_ff_mult=1).train()
        runs["LayerDiff, no enhancer"] = (no_enhancer, layerdiff_loss, lambda: None)
        runs["LayerDiff, collab FFN 1×"] = (small_ffn, layerdiff_loss, lambda: None)
    return runs


def bench_layers(geometry: BenchGeometry, batch: int, layers: int, repeats: int, warmup: int,
                 ablations: bool = False) -> list[dict]:
    """Time and memory of every variant for one (B, L); one row per variant."""
    plain, layerdiff = build_models(geometry, max_layers=max(layers, 1))
    plain.train(), layerdiff.train()
    data = make_batch(geometry, batch, layers)
    runs = variants(plain, layerdiff, ablations)
    for model, fn, setup in runs.values():
        setup()
        for _ in range(warmup):
            train_step(model, fn, data)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            model, fn, setup = runs[name]
            setup()
            times[name].append(timed_step(model, fn, data))
    rows = []
    for name, (model, fn, setup) in runs.items():
        setup()
        total, step = peak_memory(model, fn, data)
        wall, cpu = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        rows.append({"L": layers, "B": batch, "model": name, "s": wall, "cpu_s": cpu,
                     "mem": total, "step_mem": step, "params": sum(p.numel() for p in model.parameters())})
    base = rows[0]
    for row in rows:
        row.update(time_x=row["s"] / base["s"], cpu_x=row["cpu_s"] / base["cpu_s"], mem_x=row["mem"] / base["mem"],
                   step_mem_x=row["step_mem"] / base["step_mem"])
    return rows


def profile_breakdown(geometry: BenchGeometry, batch: int, layers: int, top: int = 12) -> str:
    """Where LayerDiff's extra step time goes: per-op self CPU time (torch.profiler), LayerDiff minus plain."""
    from torch.profiler import ProfilerActivity, profile

    plain, layerdiff = build_models(geometry, max_layers=max(layers, 1))
    data = make_batch(geometry, batch, layers)
    per_op = {}
    for name, model, fn in (("plain", plain, plain_loss), ("layerdiff", layerdiff, layerdiff_loss)):
        train_step(model, fn, data)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, fn, data)
        per_op[name] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    ops = set(per_op["plain"]) | set(per_op["layerdiff"])
    delta = sorted(ops, key=lambda k: per_op["layerdiff"].get(k, 0) - per_op["plain"].get(k, 0), reverse=True)
    total = {k: sum(v.values()) for k, v in per_op.items()}
    lines = [f"Per-op self CPU time, L={layers}, B={batch} (profiled step: plain {total['plain']:.2f} s, "
             f"LayerDiff {total['layerdiff']:.2f} s)", "",
             "| op | plain s | LayerDiff s | extra s | share of extra |", "|---|---|---|---|---|"]
    extra_total = total["layerdiff"] - total["plain"]
    for op in delta[:top]:
        a, b = per_op["plain"].get(op, 0.0), per_op["layerdiff"].get(op, 0.0)
        lines.append(f"| {op} | {a:.3f} | {b:.3f} | {b - a:+.3f} | {(b - a) / extra_total:.0%} |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    mb = 2**20
    lines = [
        "| L | B | images B·L | model | wall s | wall × | CPU s | CPU × | peak MiB | step MiB | memory × "
        "| step memory × | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['L']} | {r['B']} | {r['B'] * r['L']} | {r['model']} | {r['s']:.3f} | {r['time_x']:.2f} "
            f"| {r['cpu_s']:.3f} | {r['cpu_x']:.2f} "
            f"| {r['mem'] / mb:.0f} | {r['step_mem'] / mb:.0f} | {r['mem_x']:.2f} | {r['step_mem_x']:.2f} "
            f"| {r['params'] / 1e6:.1f}M |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4], help="layer counts L to benchmark")
    p.add_argument("--batch", type=int, default=1, help="samples B per step (the plain UNet gets B·L images)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tiny", action="store_true", help="tiny geometry (seconds; for smoke tests)")
    p.add_argument("--ablations", action="store_true",
                   help="also time LayerDiff without the prompt enhancer and with a 1x collab FFN (where time goes)")
    p.add_argument("--profile", action="store_true", help="also print where LayerDiff's extra time goes (per op)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry = TINY_GEOMETRY if args.tiny else CPU_GEOMETRY
    log.info("geometry %s, torch threads %d", geometry, torch.get_num_threads())
    rows = []
    for layers in args.layers:
        log.info("L=%d: building models and timing %d repeats", layers, args.repeats)
        rows.extend(bench_layers(geometry, args.batch, layers, args.repeats, args.warmup, args.ablations))
    argv_shown = sys.argv[1:] if argv is None else argv
    print(f"\n`python -m benchmarks.train {shlex.join(argv_shown)}` (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, geometry {geometry})\n")
    print(markdown_table(rows))
    if args.profile:
        print("\n" + profile_breakdown(geometry, args.batch, max(args.layers)))
    return rows


if __name__ == "__main__":
    main()
