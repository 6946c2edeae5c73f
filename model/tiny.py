"""Tiny random-weight presets of the SD family, the CLIP scorer and the FID extractor, in each library's format.

Same classes as the real models, tiny configs, seeded random weights (two builds are identical), saved with
the libraries' own `save_pretrained` / safetensors and loaded back by `model.loading` exactly like the real
ones. Folders under the tiny root (see `mlcid.registry`): `sd15/`, `sd15-inpaint/`, `clip/`, `fid-extractor/`.

    python -m model.tiny --out .work/tiny-models
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

SD_DDIM_CONFIG = dict(  # SD 1.5's noise schedule; DDIM sampling as used by LayerDiff.
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)


@dataclass(frozen=True)
class TinySDConfig:
    """Sizes of the tiny SD-1.x pipeline (SD 1.5's layout: cross-attention at high resolution, ×8 VAE)."""

    unet_in_channels: int = 4  # 9 for the inpainting UNet (latent 4 + mask 1 + masked-image latent 4)
    block_out_channels: tuple[int, ...] = (32, 64)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 8  # diffusers' name; for SD 1.x it is the number of heads
    sample_size: int = 32  # latent size: 32 -> 256 px images
    text_hidden: int = 32  # = the UNet's cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 64
    vocabulary: tuple[str, ...] | None = None  # texts to prune CLIP's tokenizer to (None: the full 49,408 tokens)
    vae_block_out_channels: tuple[int, ...] = (16, 16, 32, 32)  # 4 blocks -> downscale ×8 like SD
    vae_norm_groups: int = 4  # 4 channels per group at least, as a trained VAE needs (model.training.vae_train)
    seed: int = 0


@dataclass(frozen=True)
class TinyClipConfig:
    """open_clip `model_cfg` of a tiny CLIP with RN50's classes (ModifiedResNet + text transformer)."""

    embed_dim: int = 32
    image_size: int = 64  # ModifiedResNet downsamples ×32: 64 -> a 2×2 attention-pool grid
    vision_layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    vision_width: int = 8
    text_width: int = 32
    text_heads: int = 4
    text_layers: int = 2
    seed: int = 0

    def model_cfg(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "quick_gelu": True,  # like OpenAI's RN50
            "vision_cfg": {"image_size": self.image_size, "layers": list(self.vision_layers),
                           "width": self.vision_width, "patch_size": None},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers},
        }


@dataclass(frozen=True)
class ConvExtractorConfig:
    """A small random conv net whose pooled activations serve as FID features in tests."""

    input_size: int = 64
    widths: tuple[int, ...] = (16, 32, 64)
    num_logits: int = 16
    seed: int = 0


CLIP_PREPROCESS_CFG = {  # OpenAI CLIP's normalisation; size follows the tiny model
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


class ConvFeatureNet(nn.Module):
    """Strided 3×3 convs + ReLU, global average pool -> features, a linear head -> logits."""

    def __init__(self, config: ConvExtractorConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 3
        for width in config.widths:
            layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1), nn.ReLU()]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, config.num_logits)
        for conv in self.body:  # He init keeps activations O(1) through the ReLUs (features not squashed to ~0)
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    @property
    def feature_dim(self) -> int:
        return self.config.widths[-1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 or float images in [0, 255], (N, 3, H, W) -> (features (N, D), logits (N, K)), float32."""
        x = images.float()
        x = nn.functional.interpolate(x, size=(self.config.input_size,) * 2, mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0  # (N, 3, S, S) in [-1, 1]
        x = self.body(x)  # (N, D, S/2^k, S/2^k)
        features = x.mean(dim=(2, 3))  # (N, D)
        return features, self.head(features)


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build a module from a fixed seed without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def build_sd_pipeline(config: TinySDConfig):
    """A tiny `StableDiffusionPipeline` (or `...InpaintPipeline` when the UNet takes 9 channels), in memory."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from model.tokenizer import CLIP_MAX_LENGTH, build_clip_tokenizer

    tokenizer = build_clip_tokenizer(texts=None if config.vocabulary is None else list(config.vocabulary))
    unet = _seeded(config.seed, lambda: UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=config.unet_in_channels,
        out_channels=4,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.attention_head_dim,
    ))
    vae = _seeded(config.seed + 1, lambda: AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_block_out_channels),
        block_out_channels=config.vae_block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=config.vae_norm_groups,
        sample_size=8 * config.sample_size,
        scaling_factor=0.18215,
    ))
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=config.text_hidden,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = _seeded(config.seed + 2, lambda: CLIPTextModel(text_config))
    scheduler = DDIMScheduler(**SD_DDIM_CONFIG)
    cls = StableDiffusionInpaintPipeline if config.unet_in_channels == 9 else StableDiffusionPipeline
    return cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_sd_pipeline(config: TinySDConfig, out: Path) -> None:
    """Build and `save_pretrained` a tiny SD pipeline folder (safetensors); the tokenizer also gets
    `vocab.json` + `merges.txt` like the real SD folders."""
    from model.tokenizer import write_clip_vocab_files

    pipe = build_sd_pipeline(config)
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_vocab_files(out / "tokenizer", None if config.vocabulary is None else list(config.vocabulary))


def save_clip(config: TinyClipConfig, out: Path) -> None:
    """Write an open_clip folder: `open_clip_config.json` + `open_clip_model.safetensors` (`local-dir:` format)."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = config.model_cfg()
    model = _seeded(config.seed, lambda: open_clip.CLIP(**model_cfg))
    out.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = dict(CLIP_PREPROCESS_CFG, size=config.image_size)
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))


def save_conv_extractor(config: ConvExtractorConfig, out: Path) -> None:
    """Write the FID test extractor: `config.json` + `model.safetensors`."""
    from safetensors.torch import save_file

    net = _seeded(config.seed, lambda: ConvFeatureNet(config))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"kind": "conv-feature-net", **asdict(config)}, indent=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))


def load_conv_extractor(folder: str | Path) -> ConvFeatureNet:
    """Load a `ConvFeatureNet` saved by `save_conv_extractor` (safetensors only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a conv feature extractor folder: {path.name} is missing")
    raw = json.loads(config_path.read_text())
    if raw.pop("kind", None) != "conv-feature-net":
        raise ValueError(f"{config_path} does not describe a conv-feature-net extractor")
    config = ConvExtractorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    net = ConvFeatureNet(config)
    net.load_state_dict(load_file(str(weights_path)))
    return net.eval().requires_grad_(False)


@dataclass(frozen=True)
class TinyPresets:
    """Configs of every tiny preset this module writes, by folder name."""

    sd15: TinySDConfig = field(default_factory=TinySDConfig)
    sd15_inpaint: TinySDConfig = field(default_factory=lambda: TinySDConfig(unet_in_channels=9))
    clip: TinyClipConfig = field(default_factory=TinyClipConfig)
    fid_extractor: ConvExtractorConfig = field(default_factory=ConvExtractorConfig)

    def builders(self) -> dict[str, Callable[[Path], None]]:
        return {
            "sd15": lambda out: save_sd_pipeline(self.sd15, out),
            "sd15-inpaint": lambda out: save_sd_pipeline(self.sd15_inpaint, out),
            "clip": lambda out: save_clip(self.clip, out),
            "fid-extractor": lambda out: save_conv_extractor(self.fid_extractor, out),
        }


def build_tiny_models(root: Path, presets: TinyPresets | None = None, only: tuple[str, ...] | None = None) -> None:
    """Write the tiny presets under `root` (each built in a temp folder, then swapped in place)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    builders = (presets or TinyPresets()).builders()
    unknown = set(only or ()) - set(builders)
    if unknown:
        raise ValueError(f"unknown tiny preset(s) {sorted(unknown)}; available: {sorted(builders)}")
    for name, build in builders.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        tmp, final = root / f".{name}.tmp", root / name
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info("tiny preset %-14s -> %s (%.1f s)", name, final, time.perf_counter() - start)
