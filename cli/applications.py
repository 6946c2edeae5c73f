"""`layerdiff inpaint | style | iterative`: edit a layered output folder with a trained run, write a new folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = {
    "inpaint": "regenerate chosen layers of an output folder from new prompts; the other layers stay (App. D)",
    "style": "restyle chosen layers of an output folder, SDEdit-like (App. D)",
    "iterative": "add foreground layers one at a time, back to front, optionally in boxes (App. F.2)",
}


def parse_layer_prompts(items: list[str]) -> dict[int, str]:
    """['1=a cat', '0=the background, snowy'] → {1: 'a cat', 0: 'the background, snowy'}."""
    out = {}
    for item in items:
        index, sep, prompt = item.partition("=")
        if not sep or not index.strip().isdigit() or not prompt.strip():
            raise ValueError(f"--layer wants INDEX=PROMPT (e.g. 1='a cat'), got {item!r}")
        out[int(index)] = prompt.strip()
    return out


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--model", required=True, help="LayerDiff run folder")
    p.add_argument("--out", required=True, type=Path, help="output folder to write")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default: 3)")
    p.add_argument("--smg", type=float, default=3.0, help="self-mask guidance scale; 0 = off (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    if command == "inpaint":
        p.add_argument("--source", required=True, type=Path, help="output folder to edit")
        p.add_argument("--layer", action="append", required=True, metavar="INDEX=PROMPT",
                       help="layer to regenerate and its new prompt; repeat for several")
        p.add_argument("--mask-hold", type=int, help="steps the other layers' masks stay fixed (default: 1, App. D)")
    elif command == "style":
        p.add_argument("--source", required=True, type=Path, help="output folder to edit")
        p.add_argument("--targets", type=int, nargs="+", required=True, help="layer indices to restyle")
        p.add_argument("--style", required=True, help="text appended to the target and global prompts")
        p.add_argument("--strength", type=float, help="SDEdit strength (default: 0.8, App. D)")
    else:
        p.add_argument("--prompt", required=True, help="global prompt")
        p.add_argument("--add", action="append", required=True, help="foreground prompt; repeat, back to front")
        p.add_argument("--boxes", default="", help="'x0,y0,x1,y1;…' one per --add ('-' for none)")
        p.add_argument("--source", type=Path, default=None, help="start from this output folder")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        logging.getLogger(__name__).error("%s", err)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from model.sampling import applications as A
    from model.sampling.export import OutputMeta, load_layers, save_output
    from model.sampling.sample import load_pipeline, parse_boxes

    app = args.command
    new_prompts = parse_layer_prompts(args.layer) if app == "inpaint" else {}
    boxes = None
    if app == "iterative" and args.boxes:
        boxes = [None if part.strip() == "-" else parse_boxes(part)[0] for part in args.boxes.split(";")]
    source = load_layers(args.source) if args.source else None
    pipe = load_pipeline(args.model, args.device)
    common = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, smg_scale=args.smg,
                  generator=torch.Generator().manual_seed(args.seed))
    if app == "inpaint":
        hold = {} if args.mask_hold is None else {"mask_hold_steps": args.mask_hold}
        result = A.layer_inpaint(pipe, source, new_prompts, output_type="np", **hold, **common)
    elif app == "style":
        strength = {} if args.strength is None else {"strength": args.strength}
        result = A.layer_style_transfer(pipe, source, args.targets, style=args.style, output_type="np",
                                        **strength, **common)
    else:
        result = A.iterative_generation(pipe, args.prompt, args.add, boxes=boxes, start=source, **common).layers
    layers = result if app == "iterative" else result.layered(0)
    meta = OutputMeta(seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.cfg, smg_scale=args.smg,
                      guidance="cfg+smg", model=args.model,
                      extra={"application": app, "source": str(args.source) if args.source else None})
    save_output(args.out, layers, meta)
    return 0
