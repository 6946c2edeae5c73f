"""Loading code shared by training, sampling and evaluation: SD-1.x components, prompts, CLIP scorer, FID extractor,
the LayerDiff run-folder check.

Real and tiny models go through the same calls: `from_pretrained` on a hub id or a local folder
(`mlcid.registry.resolve` says which), safetensors preferred, never `trust_remote_code`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mlcid import registry

log = logging.getLogger(__name__)

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_LATENT_CHANNELS = 4
SD_VAE_SCALE = 8
SD_UNET_IN_CHANNELS = (4, 9)  # text-to-image; inpainting (latent 4 + mask 1 + masked-image latent 4)


# ----------------------------------------------------------------------------------------------------------
# Stable Diffusion 1.x
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SDComponents:
    """The parts of an SD-1.x pipeline that LayerDiff builds on."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler: Any  # diffusers scheduler (DDIM by default)
    source: str = ""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling(self) -> float:
        """The VAE's `scaling_factor` (0.18215 for SD 1.x): latents fed to the UNet are `mean * scaling`."""
        return float(self.vae.config.scaling_factor)


def resolve_sd(preset: str = "real", pretrained: str | os.PathLike | None = None, name: str = "sd15") -> str:
    """Where to load SD from: `pretrained` if given, else the registry's real hub id or tiny folder."""
    return registry.resolve(name, preset, pretrained)


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _check_local_sd_folder(folder: Path) -> None:
    """Name what is missing when a local folder is not a diffusers SD pipeline folder."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not an SD-1.x pipeline folder: it is a file, not a folder")
    missing = [sub for sub in SD_SUBFOLDERS if not (folder / sub).is_dir()]
    if missing:
        raise ValueError(
            f"{folder} is not an SD-1.x pipeline folder: missing {', '.join(s + '/' for s in missing)} "
            f"(want {', '.join(SD_SUBFOLDERS)} as written by diffusers `save_pretrained`)")


def _load_configs(source: str) -> tuple[dict, dict, Any]:
    """The UNet, VAE and text-encoder configs (no weights), with a clear error when they cannot be read."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    try:
        unet_cfg = UNet2DConditionModel.load_config(source, subfolder="unet")
        vae_cfg = AutoencoderKL.load_config(source, subfolder="vae")
        text_cfg = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder")
    except (OSError, EnvironmentError) as err:
        where = ("not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE=1)" if _is_offline()
                 else "could not be fetched")
        raise ValueError(f"cannot load SD pipeline {source!r}: {where}. Pass a local SD-1.x folder "
                         f"(e.g. preset 'tiny' after `make tiny-models`). Cause: {err}") from err
    return dict(unet_cfg), dict(vae_cfg), text_cfg


def check_sd_configs(unet_cfg: dict, vae_cfg: dict, text_cfg: Any, source: str = "",
                     unet_in_channels: int | None = None) -> None:
    """Raise ValueError naming the first way these configs do not make an SD-1.x pipeline."""
    prefix = f"{source}: not an SD-1.x pipeline: " if source else "not an SD-1.x pipeline: "
    problems: list[str] = []
    in_ch, out_ch = unet_cfg.get("in_channels"), unet_cfg.get("out_channels")
    allowed_in = (unet_in_channels,) if unet_in_channels is not None else SD_UNET_IN_CHANNELS
    if in_ch not in allowed_in:
        problems.append(f"UNet in_channels={in_ch}, want {' or '.join(map(str, allowed_in))}")
    if out_ch != SD_LATENT_CHANNELS:
        problems.append(f"UNet out_channels={out_ch}, want {SD_LATENT_CHANNELS}")
    blocks = list(unet_cfg.get("down_block_types", ())) + list(unet_cfg.get("up_block_types", ()))
    if not any("CrossAttn" in b for b in blocks):
        problems.append(f"UNet has no cross-attention blocks ({blocks})")
    cross_dim = unet_cfg.get("cross_attention_dim")
    if cross_dim != text_cfg.hidden_size:
        problems.append(f"UNet cross_attention_dim={cross_dim} != text encoder hidden_size={text_cfg.hidden_size}")
    if vae_cfg.get("latent_channels") != SD_LATENT_CHANNELS:
        problems.append(f"VAE latent_channels={vae_cfg.get('latent_channels')}, want {SD_LATENT_CHANNELS}")
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", ())) - 1)
    if vae_scale != SD_VAE_SCALE:
        problems.append(f"VAE downscales ×{vae_scale}, want ×{SD_VAE_SCALE}")
    if getattr(text_cfg, "model_type", None) != "clip_text_model":
        problems.append(f"text encoder is {getattr(text_cfg, 'model_type', None)!r}, want a CLIP text model")
    if text_cfg.max_position_embeddings < 77:
        problems.append(f"text encoder takes {text_cfg.max_position_embeddings} tokens, want 77")
    if problems:
        raise ValueError(prefix + "; ".join(problems))


def load_sd_components(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    *,
    unet_in_channels: int | None = None,
    scheduler_cls: type | None = None,
    use_safetensors: bool | None = None,
) -> SDComponents:
    """Load UNet, VAE, text encoder, tokenizer and scheduler of an SD-1.x pipeline (hub id or local folder).

    Configs are checked before any weights load (`ValueError` names the problem). `unet_in_channels` pins the
    UNet input width (4 text-to-image, 9 inpainting; default: either). The scheduler is loaded as
    `scheduler_cls` (default `DDIMScheduler`) from the folder's scheduler config. `use_safetensors=None`
    prefers safetensors and falls back to `weights_only` torch loading; True requires safetensors.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # 1. Where: a local folder must have the five subfolders; anything else is tried as a hub id.
    source = str(name_or_path)
    if Path(source).exists():
        _check_local_sd_folder(Path(source))
    # 2. Check configs before loading any weights.
    unet_cfg, vae_cfg, text_cfg = _load_configs(source)
    check_sd_configs(unet_cfg, vae_cfg, text_cfg, source, unet_in_channels)
    # 3. Weights and tokenizer through the libraries' own loaders (no remote code).
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype,
                                                use_safetensors=use_safetensors)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, use_safetensors=use_safetensors)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype,
                                                 use_safetensors=use_safetensors)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler = (scheduler_cls or DDIMScheduler).from_pretrained(source, subfolder="scheduler")
    if tokenizer.model_max_length > text_encoder.config.max_position_embeddings:
        raise ValueError(f"{source}: tokenizer pads to {tokenizer.model_max_length} tokens but the text encoder "
                         f"takes {text_encoder.config.max_position_embeddings}")
    log.info("loaded SD components from %s (UNet in=%d, cross-attn dim %d, %s)", source,
             unet.config.in_channels, unet.config.cross_attention_dim, dtype)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        scheduler=scheduler, source=source)


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings of `prompts`, padded/truncated to the tokenizer's max length: (N, 77, D).

    Like SD 1.x: last hidden state, no attention mask, pad = end-of-text. Runs without gradients (the text
    encoder is frozen in LayerDiff); the result is on the text encoder's device and dtype.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: need at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"every prompt must be a str; got {type(bad[0]).__name__}: {bad[0]!r}")
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    input_ids = tokens.input_ids.to(text_encoder.device)  # (N, 77)
    return text_encoder(input_ids)[0]  # (N, 77, D)


# ----------------------------------------------------------------------------------------------------------
# CLIP scorer (open_clip; the paper's CLIP score uses RN50)
# ----------------------------------------------------------------------------------------------------------


class ClipScorer(NamedTuple):
    """An open_clip model in eval mode, its image preprocessing and its tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any


def _is_torchscript_archive(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_clip_scorer(preset: str = "real", path: str | os.PathLike | None = None, *, arch: str = "RN50",
                     device: str | torch.device = "cpu") -> ClipScorer:
    """Load the CLIP model used for CLIP score through open_clip.

    `path` (else $LAYERDIFF_CLIP_RN50, else the tiny preset when `preset="tiny"`) is either an open_clip
    folder (`open_clip_config.json` + weights, e.g. a copy of hf `timm/resnet50_clip.openai` or the tiny
    preset) or a weights file for `arch` (safetensors, or a state dict read with `weights_only=True`).
    OpenAI's original TorchScript `RN50.pt` is refused (it would need `torch.jit.load`). With no local weights
    the OpenAI RN50 is fetched through open_clip when online; offline this is a clear `FileNotFoundError`.
    """
    import open_clip

    source = registry.resolve("clip-rn50", preset, path)
    local = Path(source)
    common = dict(device=device, require_pretrained=True, weights_only=True)
    if local.is_dir():
        if not (local / "open_clip_config.json").is_file():
            raise ValueError(f"{local} is not an open_clip folder: open_clip_config.json is missing")
        if not any(local.glob(ext) for ext in ("*.safetensors", "*.bin", "*.pth")):
            raise FileNotFoundError(f"{local} has an open_clip config but no weights file")
        model_id = f"local-dir:{local}"
        model, _, preprocess = open_clip.create_model_and_transforms(model_id, **common)
        tokenizer = open_clip.get_tokenizer(model_id)
    elif local.is_file():
        if _is_torchscript_archive(local):
            raise ValueError(f"{local} is a TorchScript archive (OpenAI's original release); it loads only with "
                             "torch.jit.load, which this project does not run. Use the safetensors release "
                             "(hf timm/resnet50_clip.openai: open_clip_model.safetensors + open_clip_config.json)")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(local),
                                                                     force_quick_gelu=True, **common)
        tokenizer = open_clip.get_tokenizer(arch)
    elif os.sep in source or source.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FileNotFoundError(f"CLIP weights not found: {source}")
    elif _is_offline():
        raise FileNotFoundError(
            f"no local CLIP {source} weights and HF_HUB_OFFLINE=1: set LAYERDIFF_CLIP_RN50 to an open_clip folder "
            "or weights file (e.g. timm/resnet50_clip.openai's open_clip_model.safetensors), or use preset 'tiny'")
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(source, pretrained="openai", **common)
        tokenizer = open_clip.get_tokenizer(source)
    model.eval().requires_grad_(False)
    log.info("loaded CLIP scorer from %s", source)
    return ClipScorer(model=model, preprocess=preprocess, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------------
# FID feature extractor (torch-fidelity)
# ----------------------------------------------------------------------------------------------------------

CONV_EXTRACTOR_NAME = "layerdiff-conv"
INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download, cached under TORCH_HOME


@dataclass(frozen=True)
class FidExtractor:
    """A torch-fidelity feature extractor, registered by `name`, with the weights it must be given."""

    name: str
    weights_path: str | None  # torch-fidelity's `feature_extractor_weights_path` (None: it downloads)
    feature_layer: str  # features used for FID / KID

    def metric_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `torch_fidelity.calculate_metrics` selecting this extractor."""
        return {"feature_extractor": self.name, "feature_extractor_weights_path": self.weights_path,
                "feature_layer_fid": self.feature_layer, "feature_layer_kid": self.feature_layer}


def _register_conv_extractor() -> None:
    """Register the tiny conv extractor with torch-fidelity under `CONV_EXTRACTOR_NAME` (once)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    from model.tiny import load_conv_extractor

    if CONV_EXTRACTOR_NAME in FEATURE_EXTRACTORS_REGISTRY:
        return

    class ConvFidExtractor(FeatureExtractorBase):
        """torch-fidelity adapter of `model.tiny.ConvFeatureNet`: uint8 (N, 3, H, W) -> features, logits."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise ValueError(f"{name} needs feature_extractor_weights_path= its folder (nothing to download)")
            self.net = load_conv_extractor(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise ValueError(f"expected uint8 images (N, 3, H, W), got {getattr(x, 'dtype', type(x))} "
                                 f"{tuple(getattr(x, 'shape', ()))}")
            features, logits = self.net(x)  # (N, D), (N, K)
            by_name = {"features": features, "logits": logits}
            return tuple(by_name[f] for f in self.features_list)

    register_feature_extractor(CONV_EXTRACTOR_NAME, ConvFidExtractor)


def _check_plain_state_dict(path: Path) -> None:
    """Refuse a weights file that is not a plain tensor state dict (torch-fidelity reads it with pickle)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: not a plain state dict
        raise ValueError(f"{path} is not a plain tensor state dict (weights_only=True load failed: {err})") from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} is not a plain tensor state dict of Inception weights")


def load_fid_extractor(preset: str = "real", path: str | os.PathLike | None = None) -> FidExtractor:
    """Register and describe the FID feature extractor for torch-fidelity.

    Tiny (or any folder with `config.json` + `model.safetensors`): the seeded conv net of `model.tiny`.
    Real: torch-fidelity's `inception-v3-compat` with weights from `path`, $LAYERDIFF_FID_WEIGHTS or torch
    hub's cache; a weights file must pass a `weights_only=True` load first. Offline (HF_HUB_OFFLINE=1) with no
    local weights raises `FileNotFoundError`; online torch-fidelity downloads them itself.
    """
    source = registry.resolve("fid-inception", preset, path)
    local = Path(source)
    if local.is_dir():
        from model.tiny import load_conv_extractor

        load_conv_extractor(local)  # fail now, with a clear error, rather than inside torch-fidelity
        _register_conv_extractor()
        return FidExtractor(CONV_EXTRACTOR_NAME, str(local), "features")
    if local.is_file():
        _check_plain_state_dict(local)
        return FidExtractor(INCEPTION_NAME, str(local), "2048")
    if source != INCEPTION_NAME:
        raise FileNotFoundError(f"FID extractor weights not found: {source}")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        _check_plain_state_dict(cached)
        return FidExtractor(INCEPTION_NAME, str(cached), "2048")
    if _is_offline():
        raise FileNotFoundError(
            f"no Inception weights for FID and HF_HUB_OFFLINE=1: download {INCEPTION_FILE} (torch-fidelity "
            "release v0.2.0) once and set LAYERDIFF_FID_WEIGHTS to it, or use preset 'tiny'")
    return FidExtractor(INCEPTION_NAME, None, "2048")


# ------------------------------------------------------------------ LayerDiff run folders

RUN_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
ALLOWED_LIBRARIES = {"unet": ("model.network.unet",), "vae": ("diffusers",), "text_encoder": ("transformers",),
                     "tokenizer": ("transformers",), "scheduler": ("diffusers",)}


def check_run_folder(folder: str | Path) -> Path:
    """Raise ValueError unless `folder` is a LayerDiff run/pipeline folder (model_index.json naming the
    LayerDiff UNet and only diffusers/transformers parts, five subfolders)."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{path} is not a LayerDiff run: not a local folder (train one with `make train`)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{path} is not a LayerDiff run: model_index.json is missing")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a LayerDiff run: model_index.json is unreadable ({err})") from err
    unet_entry = index.get("unet")
    if unet_entry != ["model.network.unet", "LayerDiffUNet"]:
        raise ValueError(f"{path} is not a LayerDiff run: its unet is {unet_entry!r}, want "
                         "['model.network.unet', 'LayerDiffUNet'] (a plain SD folder must be trained first)")
    for name, libraries in ALLOWED_LIBRARIES.items():
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in libraries):
            raise ValueError(f"{path} is not a LayerDiff run: component {name!r} is {entry!r} "
                             f"(allowed libraries: {libraries})")
    missing = [s for s in RUN_SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise ValueError(f"{path} is not a LayerDiff run: missing {', '.join(m + '/' for m in missing)}")
    return path
