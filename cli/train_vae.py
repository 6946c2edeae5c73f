"""`layerdiff train-vae`: fit a small SD-shaped AutoencoderKL on MLCID shards (`model.training.vae_train`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = ("train a small SD-shaped VAE (×8, 4 latent channels) on MLCID layer images and masks, for machines without "
        "SD's pretrained VAE; writes a diffusers AutoencoderKL folder and report.json")
# flags named as VAETrainConfig's fields; unset ones keep its defaults (not repeated here: importing it loads torch)
FIELDS = ("steps", "batch_size", "resolution", "lr", "max_samples", "norm_num_groups")


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.description = (HELP[0].upper() + HELP[1:] + ". Unset options keep model.training.vae_train.VAETrainConfig's "
                     "defaults (1,500 steps, batch 16, 64², widths 32,64,64,64, 8 groups).")
    p.add_argument("--data", required=True, help="MLCID shards (brace pattern, folder or list)")
    p.add_argument("--out", required=True, type=Path, help="output folder (diffusers AutoencoderKL + report.json)")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resolution", type=int, help="pixels (square)")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--max-samples", type=int, help="scenes read into memory")
    p.add_argument("--block-out-channels", help="widths of the 4 blocks, comma-separated, e.g. 32,64,64,64")
    p.add_argument("--norm-num-groups", type=int, help="GroupNorm groups (every block needs >= 4 channels per group)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (once training ends)")


def run(args: argparse.Namespace) -> int:
    from cli.main import fail
    from model.training.vae_train import VAETrainConfig, train_vae

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}
    try:
        if args.block_out_channels:
            given["block_out_channels"] = tuple(int(w) for w in args.block_out_channels.split(","))
        config = VAETrainConfig(**given)
    except ValueError as e:
        return fail(args, e)
    if args.out.exists() and not args.overwrite:
        return fail(args, f"{args.out} exists; pass --overwrite to replace it")
    report = train_vae(args.data, args.out, config)
    print(f"wrote {args.out}: held-out PSNR {report.image_psnr_db:.1f} dB, mask IoU {report.mask_iou:.3f}, "
          f"flat-colour error {report.flat_colour_error:.1f}")
    return 0
