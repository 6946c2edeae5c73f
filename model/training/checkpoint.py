"""Training checkpoints as folders (`checkpoint-000100/`), written to `.tmp` then renamed; safe loading only.

Layout of one checkpoint:
  unet/                  LayerDiffUNet.save_pretrained (config.json + safetensors): loadable on its own
  optimizer.pt           optimizer, LR scheduler and grad-scaler state dicts (torch.load(weights_only=True))
  rng.pt                 per rank: python, numpy, torch, cuda RNG states and the trainer's generators
  ema.safetensors        EMA weights (when enabled)
  state.json             step, samples seen, world size, loader workers, per-rank data positions, drop counts,
                         the training config
  complete.json          written last. Locally the `.tmp` → rename makes a folder complete; on object storage
                         (no rename) `model.training.run_folder` uploads this after every other file and lists
                         only folders that have it
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
UNET_DIR = "unet"
WEIGHTS = "diffusion_pytorch_model.layerdiff.safetensors"  # = model.network.unet.WEIGHTS_NAME (no diffusers import here)
COMPLETE = "complete.json"
REQUIRED = (f"{UNET_DIR}/config.json", f"{UNET_DIR}/{WEIGHTS}", "optimizer.pt", "rng.pt", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, unreadable or made for another model/run layout."""


@dataclass
class TrainState:
    """The JSON part of a checkpoint."""

    step: int
    samples_seen: int
    world_size: int
    loader_workers: int
    data: list[dict[str, Any]] = field(default_factory=list)  # per rank: {"positions": {slot: [e, i]}, "batches": n}
    dropped: list[dict[str, int]] = field(default_factory=list)  # per rank: reason → count
    config: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / checkpoint_name(step)


def checkpoint_step(name: str) -> int | None:
    """`checkpoint-000100` → 100; None for any other name (`.tmp` leftovers included)."""
    tail = name[len(PREFIX):]
    return int(tail) if name.startswith(PREFIX) and tail.isdigit() else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a local run, oldest first: locally the rename from `.tmp` is what makes one complete
    (so folders written before `complete.json` existed still count)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if checkpoint_step(p.name) is not None and p.is_dir()]
    return sorted(found, key=lambda p: checkpoint_step(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep ≤ 0: keep all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- RNG ---------------------------------------------------------------------------------------------------------


def capture_rng(generators: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Global RNG states of this process plus the trainer's generator states, as weights_only-loadable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": generators,
    }


def restore_rng(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Restore the global RNG states; return the trainer's generator states for the caller to apply."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    return state["generators"]


# -- save / load -------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    unet: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    ema: Any,
    state: TrainState,
    rng_per_rank: list[dict[str, Any]],
) -> Path:
    """Write everything into `path.tmp`, then rename to `path` (a crash never leaves a half checkpoint)."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / UNET_DIR, safe_serialization=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
        tmp / "optimizer.pt",
    )
    torch.save(rng_per_rank, tmp / "rng.pt")
    if ema is not None:
        ema.save(tmp / "ema.safetensors")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
    (tmp / COMPLETE).write_text(json.dumps({"step": state.step}))  # last: vouches for every file above
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _plain_config(config: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The differing keys of two configs, nested ones included; "_" keys (a load path such as
    `unet_config._name_or_path`, a library version) say where a model came from, not what it is, and are skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(k for k in set(a) | set(b) if not k.startswith("_")):
            out += _config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r:.60} vs model {b!r:.60}"]


def read_state(path: str | Path) -> TrainState:
    """The checkpoint's JSON state, after checking the folder is complete."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    missing = [m for m in REQUIRED if not (path / m).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        return TrainState(**json.loads((path / "state.json").read_text()))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: state.json is corrupt ({e})") from e


def load_checkpoint(
    path: str | Path, unet: Any, optimizer: torch.optim.Optimizer, lr_scheduler: Any, scaler: Any, ema: Any,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Load weights and optimiser state into the given objects; return (state, RNG states per rank).

    Raises `CheckpointError` naming the problem: incomplete folder, corrupt file, or a model that differs from
    the checkpoint's (config keys listed).
    """
    path = Path(path)
    state = read_state(path)
    # 1. Model config must match exactly.
    try:
        saved_cfg = json.loads((path / UNET_DIR / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: unet/config.json is corrupt ({e})") from e
    diff = _config_diff({k: v for k, v in saved_cfg.items() if not k.startswith("_")}, _plain_config(unet.config))
    if diff:
        raise CheckpointError(f"checkpoint {path} was written for a different model: " + "; ".join(diff[:5]))
    # 2. Weights (safetensors) and optimiser/scheduler state (weights_only).
    try:
        weights = load_file(str(path / UNET_DIR / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"checkpoint {path}: unet weights are corrupt ({type(e).__name__}: {e})") from e
    try:
        unet.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: unet weights do not fit the model ({str(e)[:300]})") from e
    try:
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: optimizer.pt / rng.pt unreadable ({type(e).__name__}: {e})") from e
    try:
        optimizer.load_state_dict(opt["optimizer"])
        lr_scheduler.load_state_dict(opt["lr_scheduler"])
        if scaler is not None and opt.get("scaler"):
            scaler.load_state_dict(opt["scaler"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({e})") from e
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise CheckpointError(f"checkpoint {path} has no ema.safetensors but use_ema is on")
        try:
            ema.load(path / "ema.safetensors")
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: EMA weights unusable ({e})") from e
    return state, rng
