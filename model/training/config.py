"""Typed training configuration (`TrainConfig`, `DataConfig`) and its YAML loading with `key=value` overrides."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlcid.registry import PRESETS
from mlcid.schema import DEFAULT_MAX_AREA_FRAC, DEFAULT_MIN_AREA_FRAC

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # model/configs


@dataclass
class DataConfig:
    """How MLCID samples become training tensors (see `model.training.data`)."""

    resolution: int = 256  # square training crops (paper §5.2: 256²)
    max_layers: int = 4  # background + up to 3 foregrounds; samples are padded to this
    too_many_layers: str = "skip"  # "skip" (counted) or "truncate" (keep the back-most foregrounds)
    fill_value: float = 0.0  # foreground model input outside the dilated alpha, in [-1, 1] (0 = mid grey)
    random_scale: tuple[float, float] = (1.0, 1.0)  # shorter side → resolution × U(lo, hi) before the random crop
    hflip: bool = False  # random horizontal flip (off: prompts may say "left"/"right")
    resample: bool = True  # endless stream drawing shards with replacement
    shuffle_shards: bool = True  # shuffle shard order per epoch (when not resampling)
    shuffle_buffer: int = 0  # sample-level shuffle buffer per loader worker (0 = off)
    block_size: int = 10_000  # resample mode: samples per worker before re-seeding (bounds the resume skip)
    num_workers: int = 0  # torch DataLoader worker processes per trainer process
    trim_padding: bool = True  # collate drops layer slots that are padding in every sample of the batch
    min_area_frac: float = DEFAULT_MIN_AREA_FRAC  # reader validation limits on each foreground mask (Appendix B)
    max_area_frac: float = DEFAULT_MAX_AREA_FRAC
    check_samples: int = 256  # before step 1: fail (exit 2) unless one of the first N items is usable (0 = off)


@dataclass
class TrainConfig:
    """The LayerDiff training recipe (defaults = paper §5.1–5.2 and DESIGN.md "Training")."""

    # Model
    pretrained: str | None = None  # SD hub id or folder; None = the registry's sd15 for `preset`
    preset: str = "real"  # "real" or "tiny" (mlcid.registry presets)
    unet_options: dict[str, Any] = field(default_factory=dict)  # extra kwargs for LayerDiffUNet.from_unet
    # False | True or "full" (SD + collaborative blocks) | "layer_blocks" (only the new blocks: 1.6× → 1.15× memory)
    gradient_checkpointing: bool | str = False
    # Optimisation (paper §5.2)
    batch_size: int = 32  # global micro-batch (split evenly over workers)
    grad_accum: int = 8
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 500  # linear warm-up, then constant
    max_grad_norm: float = 1.0  # 0 = no clipping (the paper does not say; diffusers' default)
    max_steps: int = 20_000  # optimiser steps
    # Diffusion objective (paper §5.1)
    shared_timestep_prob: float = 0.5  # one t for all layers of a sample, else one t per layer
    global_prompt_drop: float = 0.1
    layer_prompt_drop: float = 0.1  # drops all layer prompts of a sample together, independently of the global one
    mask_loss_weight: float = 1.0  # loss = (mse_image + w·mse_mask) / (1 + w); 1 = Eq. 5 over all 8 channels
    # Numerics
    mixed_precision: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; fp32 on CPU) | no | fp16 | bf16
    use_ema: bool = False
    ema_decay: float = 0.9999
    # Bookkeeping
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # newest N kept (0 = keep all)
    log_every: int = 1
    record_keys: bool = False  # write the sample keys each rank consumed to keys-rankN.txt (tests, audits)
    # Validation samples (rank 0, EMA weights): a grid to TensorBoard and validation/step-NNNNNN.png
    validation_every: int = 1000  # 0 = off
    validation_prompts: list[dict[str, Any]] = field(default_factory=list)  # [{prompt, layers}]; [] = from the data
    validation_count: int = 2  # prompts taken from the first shard when validation_prompts is empty
    validation_steps: int = 10  # DDIM steps per sample
    validation_size: int = 0  # pixels; 0 = data.resolution
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        checks = [
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be ≥ 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.max_steps >= 1, "max_steps must be ≥ 1"),
            (self.checkpoint_every >= 1, "checkpoint_every must be ≥ 1"),
            (0 <= self.shared_timestep_prob <= 1, "shared_timestep_prob must be in [0, 1]"),
            (0 <= self.global_prompt_drop <= 1 and 0 <= self.layer_prompt_drop <= 1, "prompt drops must be in [0, 1]"),
            (self.mixed_precision in ("auto", "no", "fp16", "bf16"), "mixed_precision must be auto|no|fp16|bf16"),
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}"),
            (self.data.too_many_layers in ("skip", "truncate"), "data.too_many_layers must be skip|truncate"),
            (self.data.max_layers >= 2, "data.max_layers must be ≥ 2 (background + one foreground)"),
            (self.data.resolution >= 8 and self.data.resolution % 8 == 0, "data.resolution must be a multiple of 8"),
            (-1 <= self.data.fill_value <= 1, "data.fill_value must be in [-1, 1]"),
            (0 < self.data.random_scale[0] <= self.data.random_scale[1], "data.random_scale must be 0 < lo ≤ hi"),
            (self.data.block_size >= 1, "data.block_size must be ≥ 1"),
            (
                self.gradient_checkpointing in (False, True, "full", "layer_blocks"),
                "gradient_checkpointing must be false, true/full or layer_blocks",
            ),
            (self.validation_every >= 0 and self.validation_steps >= 1 and self.validation_count >= 1,
             "validation_every must be ≥ 0, validation_steps and validation_count ≥ 1"),
            ("max_layers" not in self.unet_options, "set data.max_layers, not unet_options.max_layers"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"bad training config: {message}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type (dataclasses recursively, tuples from lists)."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r:.80}")
        return _from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r:.80}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if tp is float:  # YAML reads "1e-5" (no dot) as a string
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r:.80}") from None
    if tp is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"{where}: expected an integer, got {value!r:.80}")
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}.") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    config = _from_dict(TrainConfig, data or {})
    config.validate()
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain data (tuples as lists) for YAML/JSON."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(config))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (values parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. data.resolution=64)")
        dotted, raw = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (None = the paper recipe), apply `key=value` overrides, and validate."""
    path = Path(path) if path is not None else CONFIG_DIR / "layerdiff_sd15.yaml"
    if not path.exists():
        raise FileNotFoundError(f"training config {path} does not exist (see {CONFIG_DIR} for examples)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return config_from_dict(apply_overrides(data, overrides or []))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
