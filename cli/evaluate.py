"""`layerdiff eval`: FID, CLIP score and layer CLIP score of a run vs SD 1.5, laid out like the paper's Table 1."""

from __future__ import annotations

import argparse
import logging

HELP = "FID, CLIP score and layer CLIP score of a LayerDiff run vs SD 1.5 on MLCID test prompts (Table 1)"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from mlcid.registry import PRESETS
    from model.evaluation.config import METHODS, EvalConfig

    d = EvalConfig(model="", data=[], out="")
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = ("Evaluate LayerDiff like the paper's Table 1: FID, CLIP score and layer CLIP score per layer "
                    "count, for SD 1.5, LayerDiff (CFG) and LayerDiff+SMG on the same MLCID test prompts. "
                    "Real weights load from local files offline: CLIP RN50 via $LAYERDIFF_CLIP_RN50, Inception "
                    "via $LAYERDIFF_FID_WEIGHTS (or --clip-model / --fid-weights); --preset tiny uses the tiny "
                    "random models from `layerdiff tiny-models`.")
    parser.epilog = ("example (tiny, offline): layerdiff eval --model runs/tiny --preset tiny "
               "--data '.work/synthetic/mlcid/mlcid-{000000..000001}.tar' --out .work/eval --per-group 2 --steps 2")
    parser.add_argument("--model", required=True, metavar="RUN", help="LayerDiff run folder (from `make train`)")
    parser.add_argument("--data", required=True, nargs="+", metavar="SHARDS",
                        help="MLCID test shards: paths, brace patterns (quote them), folders, fsspec URLs")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: metrics.json, metrics.md, rows/ (resumable), cache/ (reference stats)")
    parser.add_argument("--preset", default=d.preset, choices=PRESETS,
                        help="where SD 1.5, CLIP RN50 and the FID extractor load from")
    parser.add_argument("--rows", nargs="+", default=list(d.rows), choices=list(METHODS), help="methods to run")
    parser.add_argument("--layer-counts", nargs="+", type=int, default=list(d.layer_counts), metavar="L",
                        help="layer counts to evaluate (Table 1 columns)")
    parser.add_argument("--per-group", type=int, default=d.per_group, help="prompts per layer count")
    parser.add_argument("--steps", type=int, default=d.num_inference_steps, help="DDIM steps (all methods)")
    parser.add_argument("--cfg", type=float, default=d.guidance_scale, help="LayerDiff CFG scale")
    parser.add_argument("--smg", type=float, default=d.smg_scale, help="LayerDiff self-mask guidance scale")
    parser.add_argument("--sd-cfg", type=float, default=d.sd_guidance_scale, help="SD 1.5 CFG scale")
    parser.add_argument("--seed", type=int, default=d.seed, help="prompt i is sampled with seed + i (all methods)")
    parser.add_argument("--size", type=int, help="LayerDiff sampling size; unset: the run's default")
    parser.add_argument("--sd-size", type=int, help="SD sampling size; unset: native (512 for SD 1.5)")
    parser.add_argument("--eval-size", type=int, default=d.eval_size, help="size images are compared at")
    parser.add_argument("--max-reference", type=int, help="cap on real composites per group; unset: all")
    parser.add_argument("--sd-model", help="SD 1.5 folder or hub id; unset: the registry's, per preset")
    parser.add_argument("--clip-model", help="open_clip RN50 folder or weights file; unset: $LAYERDIFF_CLIP_RN50, "
                                             "else the preset's")
    parser.add_argument("--fid-weights", help="torch-fidelity Inception weights file; unset: "
                                              "$LAYERDIFF_FID_WEIGHTS, torch hub's cache, else the preset's")
    parser.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, …")
    parser.add_argument("--dtype", default=d.dtype, choices=("float32", "float16", "bfloat16"),
                        help="model dtype for sampling and scoring")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="feature/embedding batch size")
    parser.add_argument("--save-layers", action="store_true", help="also export every LayerDiff sample (PSD/ORA)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    from model.evaluation.config import EvalConfig

    return EvalConfig(model=args.model, data=args.data, out=args.out, preset=args.preset, rows=tuple(args.rows),
                      layer_counts=tuple(args.layer_counts), per_group=args.per_group,
                      num_inference_steps=args.steps, guidance_scale=args.cfg, smg_scale=args.smg,
                      sd_guidance_scale=args.sd_cfg, seed=args.seed, size=args.size, sd_size=args.sd_size,
                      eval_size=args.eval_size, max_reference=args.max_reference, sd_model=args.sd_model,
                      clip_model=args.clip_model, fid_weights=args.fid_weights, device=args.device,
                      dtype=args.dtype, batch_size=args.batch_size, save_layers=args.save_layers,
                      progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from cli.main import fail

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("__main__", "model", "mlcid"):  # our progress at INFO; libraries (open_clip logs to root) quieter
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        config = config_from_args(args)
        from model.evaluation.evaluate import evaluate, metrics_markdown

        result = evaluate(config)
    except (FileNotFoundError, ValueError) as err:
        return fail(args, err)
    print(metrics_markdown(result))
    return 0
