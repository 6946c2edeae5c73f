"""`layerdiff sample`: sample layered images with a trained run and export them (`model.sampling.sample.run`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = ("sample layered images (background + foreground layers with masks) with a trained run; writes PNG layers, "
        "masks, the composite, layers.json, a layered PSD and an OpenRaster file per image")
# model.sampling.pipeline.SELF_GUIDANCE's modes (tests/test_cli.py keeps the two equal; importing it loads torch)
GUIDANCE_MODES = ("cfg", "cfg+sag", "cfg+smg")
# model.sampling.guidance.SMG_VARIANTS' names, written out for the same reason (same test)
SMG_VARIANT_NAMES = ("default", "inside", "uncond", "paper", "legacy", "absolute")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.description = ("Sample layered images (background + foreground layers with masks) with LayerDiff: DDIM, CFG "
                     "with the paper's negative prompts, self-mask guidance. Writes one folder per image (OUT, or "
                     "OUT/000, OUT/001, … with --num-images N): layers.json, layerNN.png, maskNN.png, composite.png, "
                     "layers.psd, layers.ora.")
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--model", required=True, help="LayerDiff run folder (written by `make train`)")
    p.add_argument("--prompt", required=True, help="global prompt describing the whole image")
    p.add_argument("--layers", required=True,
                   help="layer prompts separated by '|', background first: 'the background|a red ball|a dog'")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--smg", type=float, default=3.0, help="self-mask (or SAG) guidance scale; 0 = off")
    p.add_argument("--guidance", choices=GUIDANCE_MODES, default="cfg+smg", help="guidance combination")
    p.add_argument("--smg-variant", choices=SMG_VARIANT_NAMES, default="default",
                   help="SMG rule: default = Eq. 9 as printed (plain blur outside each layer's mask; chosen by "
                        "learn-bench), inside = the paper's text (mask-normalised blur inside), uncond = SAG's "
                        "branch, paper = the literal combination, legacy = plain blur inside, absolute = the "
                        "default with its blur 31 / 3 in latent pixels at any size instead of scaled from 32² "
                        "latents (model.sampling.guidance.SMG_VARIANTS)")
    p.add_argument("--smg-start", type=float, default=0.0,
                   help="SMG only on the steps from this fraction of them on (0 with --smg-end 1 = every step, the "
                        "paper's sampler; 0.7 with --smg-mask-interval 2 kept learn-bench's SMG gains at 1.6x the "
                        "SD pipeline's cost, against 3.3x for every step; see BENCHMARKS.md)")
    p.add_argument("--smg-end", type=float, default=1.0, help="… and before this fraction of them")
    p.add_argument("--smg-mask-interval", type=int, default=1, help="SMG's layer masks re-decoded every K steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the run's training resolution)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--boxes", default="", help="mask priors: 'x0,y0,x1,y1;…' in pixels, one per foreground")
    p.add_argument("--max-batch", type=int, default=None, help="samples per UNet call (memory cap)")
    p.add_argument("--previews", type=int, default=0, metavar="K",
                   help="also write previews.png with x0 previews every K steps (Fig. 13)")
    p.add_argument("--from-sd", action="store_true",
                   help="treat --model as an SD-1.x folder and sample an UNTRAINED LayerDiff (smoke test)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def sample_config(args: argparse.Namespace):
    """The parsed arguments → `model.sampling.sample.SampleConfig` (ValueError for bad prompts or boxes)."""
    from model.sampling.sample import SampleConfig, parse_boxes, parse_layers

    return SampleConfig(model=args.model, global_prompt=args.prompt, layer_prompts=parse_layers(args.layers),
                        out=args.out, steps=args.steps, cfg=args.cfg, smg=args.smg, guidance=args.guidance,
                        smg_variant=args.smg_variant, smg_start=args.smg_start, smg_end=args.smg_end,
                        smg_mask_interval=args.smg_mask_interval,
                        seed=args.seed, num_images=args.num_images, height=args.height,
                        width=args.width, boxes=parse_boxes(args.boxes), max_batch=args.max_batch,
                        from_sd=args.from_sd, previews=args.previews, device=args.device, dtype=args.dtype,
                        overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    from model.sampling.sample import run as sample

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sample(sample_config(args))
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        logging.getLogger(__name__).error("%s", err)
        return 2
    return 0
