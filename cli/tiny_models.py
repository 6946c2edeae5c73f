"""`layerdiff tiny-models`: write the tiny random-weight presets, and build missing ones on demand for `--preset tiny`."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

HELP = ("write the tiny random-weight presets (SD 1.5, SD inpainting, CLIP, FID extractor, InstructBLIP, OWLv2, "
        "Grounding DINO, SAM, depth saliency) for offline tests and demos; seeded, so two runs give identical weights")

log = logging.getLogger(__name__)


def _builders() -> dict:
    """Preset name → builder writing that preset's folder (model presets first, then the MLCID pipeline's)."""
    from model.tiny import TinyPresets
    from pipelines.tiny import BUILDERS

    return {**TinyPresets().builders(), **BUILDERS}


def ensure_tiny_models(root: Path | None = None, only: list[str] | None = None, rebuild: bool = False) -> list[str]:
    """Build each preset under `root` that is missing (or all with `rebuild`); returns the names built.

    Each preset is written to `.NAME.tmp` and renamed, so an interrupted build never leaves a half folder that a
    later call would take for a finished one.
    """
    from mlcid.registry import tiny_root

    root = Path(root) if root is not None else tiny_root()
    builders = _builders()
    unknown = sorted(set(only or ()) - set(builders))
    if unknown:
        raise ValueError(f"unknown tiny preset(s) {unknown}; available: {', '.join(builders)}")
    built = []
    for name, build in builders.items():
        final, tmp = root / name, root / f".{name}.tmp"
        if (only and name not in only) or (final.is_dir() and not rebuild):
            continue
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info("tiny preset %-14s -> %s", name, final)
        built.append(name)
    return built


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--out", type=Path, help="tiny-model root (default: $LAYERDIFF_TINY_MODELS, else .work/tiny-models)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="build only these presets")
    p.add_argument("--missing-only", action="store_true", help="keep presets that already exist")


def run(args: argparse.Namespace) -> int:
    from cli.main import fail

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        built = ensure_tiny_models(args.out, args.only, rebuild=not args.missing_only)
    except ValueError as err:
        return fail(args, err)
    print(f"built {len(built)} tiny preset(s): {', '.join(built) or 'none missing'}")
    return 0
