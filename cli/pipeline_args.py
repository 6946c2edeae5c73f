"""The MLCID pipeline flags shared by `mlcid build` and `mlcid build-local`, and their typed values."""

from __future__ import annotations

import argparse

from mlcid.registry import PRESETS
from pipelines.faults import FaultPolicy
from pipelines.kinds import STAGE_ORDER


def add_pipeline_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--preset", default="real", choices=sorted(PRESETS), help="pipeline profile (default: real)")
    p.add_argument("--backend", action="append", default=[], metavar="KIND=NAME",
                   help=f"override a stage backend (kinds: {', '.join(STAGE_ORDER)}; NAME 'none' disables an "
                   "optional stage)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="override a registry model location (e.g. depth-saliency=/models/depth)")
    p.add_argument("--device", help="torch device (default: the preset's; 'auto' = cuda if available)")
    p.add_argument("--max-side", type=int, help="shorter output side cap in pixels (multiple of 8)")
    p.add_argument("--max-layers", type=int, help="background + at most this many minus one foregrounds")
    p.add_argument("--chunk-size", type=int, help="items pushed through the stages together")
    p.add_argument("--prefix", help="output shard name prefix (default mlcid)")
    p.add_argument("--max-stage-error-frac", type=float, default=FaultPolicy.max_stage_error_frac,
                   help="fail a shard when more than this share of its items hit stage errors")


def _pairs(values: list[str], flag: str) -> dict[str, str | None]:
    """['KIND=NAME', …] → {KIND: NAME}; '', 'none' or 'off' → None. ValueError names the flag."""
    out: dict[str, str | None] = {}
    for v in values:
        if "=" not in v:
            raise ValueError(f"--{flag} expects NAME=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        out[k] = None if val.lower() in ("", "none", "off") else val
    return out


def pipeline_options(args: argparse.Namespace):
    """The pipeline flags → `pipelines.build.PipelineOptions` (call `.to_config()` for the `PipelineConfig`)."""
    from pipelines.build import PipelineOptions

    return PipelineOptions(args.preset, _pairs(args.backend, "backend"), _pairs(args.model, "model"), args.device,
                           args.max_side, args.max_layers, args.chunk_size, args.prefix)


def fault_policy(args: argparse.Namespace) -> FaultPolicy:
    return FaultPolicy(max_stage_error_frac=args.max_stage_error_frac)
