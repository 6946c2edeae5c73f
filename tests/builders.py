"""Builders shared by the tests: hand-made MLCID samples, valid shards, raw tars (no validation, for bad input),
pipeline input shards and configs, tiny LayerDiff networks and runs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from mlcid.codec import encode_sample
from mlcid.composite import composite
from mlcid.schema import BACKGROUND_PROMPT, LayerInfo, MLCIDSample
from mlcid.writer import ShardWriter, shard_name

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive end


def make_sample(key: str = "k0", size: int = 48, n_fg: int = 2, *, width: int | None = None, seed: int = 0,
                boxes: tuple[Box, ...] | None = None, prompt: str | None = None, dilate: int = 2,
                source: dict | None = None) -> MLCIDSample:
    """A valid layered scene: a striped blue ramp behind one solid rectangle per foreground.

    boxes   one (x0, y0, x1, y1) per foreground; default: one per column band, placed by `seed`
    prompt  the global prompt (default "scene KEY with N boxes"); foreground i's prompt is "a COLOUR box"
    dilate  how far the cut-out's alpha reaches past its mask (the pipeline's 5×5 dilation reaches 2 pixels)
    """
    h, w = size, width or size
    rng = np.random.default_rng(seed)
    if boxes is None:
        band = w // max(1, n_fg)
        boxes = []
        for i in range(n_fg):
            x0, y0 = i * band + int(rng.integers(0, 3)), int(rng.integers(2, h // 3))
            boxes.append((x0 + 1, y0, x0 + band - 2, y0 + h // 2))
    background = np.zeros((h, w, 3), np.uint8)
    background[:, :, 2] = (np.arange(w) * 255 // max(1, w - 1)).astype(np.uint8)[None]  # (H, W) blue ramp
    background[::4] = (90, 90, 90)
    names = list(COLOURS)
    foregrounds, masks, layers = [], [], [LayerInfo(BACKGROUND_PROMPT)]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        m = np.zeros((h, w), np.uint8)
        m[y0:y1, x0:x1] = 255
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., :3] = COLOURS[names[i % len(names)]]
        rgba[max(0, y0 - dilate):y1 + dilate, max(0, x0 - dilate):x1 + dilate, 3] = 255  # the dilated cut-out
        foregrounds.append(rgba)
        masks.append(m)
        layers.append(LayerInfo(f"a {names[i % len(names)]} box", box=(x0, y0, x1, y1), score=0.5 + 0.1 * i,
                                area_frac=float((m > 0).mean())))
    return MLCIDSample(key, prompt if prompt is not None else f"scene {key} with {len(boxes)} boxes",
                       composite(background, foregrounds, masks), background, foregrounds, masks, layers,
                       source=dict(source if source is not None else {"url": f"http://example.com/{key}.jpg"}))


def write_shard(out: Path, samples: list[MLCIDSample], shard_id: int = 0, drops: dict[str, int] | None = None) -> Path:
    """A valid MLCID shard (through the real writer) holding `samples`, with `drops` counted; returns its path."""
    with ShardWriter(out, shard_id) as w:
        for s in samples:
            assert w.write(s), f"sample {s.key} was refused by the writer"
        for reason, n in (drops or {}).items():
            w.drop(reason, n)
    return Path(out) / shard_name(shard_id)


def write_shards(out: Path, shards: int = 2, per_shard: int = 4, size: int = 48, fg_counts=(1, 2)) -> str:
    """Valid tiny MLCID shards; returns a brace pattern over them."""
    for s in range(shards):
        samples = [make_sample(f"s{s:02d}k{j:03d}", size, fg_counts[(s * per_shard + j) % len(fg_counts)],
                               seed=s * per_shard + j) for j in range(per_shard)]
        write_shard(out, samples, s)
    return str(Path(out) / f"mlcid-{{000000..{shards - 1:06d}}}.tar")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A plain tar of (name, data) members, in order; returns its path as a string."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def sample_members(sample: MLCIDSample) -> list[tuple[str, bytes]]:
    """An MLCID sample's tar members, unvalidated."""
    return [(f"{sample.key}.{k}", v) for k, v in encode_sample(sample).items()]


def write_raw_shard(path: Path, samples: list[MLCIDSample], truncate_at: float | None = None) -> None:
    """Samples written without validation (for bad input); optionally truncated inside a member's data."""
    write_tar(path, [m for s in samples for m in sample_members(s)])
    if truncate_at:  # cut inside the data of the member at that fraction of the members (a real truncation)
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        cut = members[min(len(members) - 1, int(len(members) * truncate_at))]
        path.write_bytes(path.read_bytes()[: cut.offset_data + cut.size // 2])


def write_outcomes(shard: Path, rows: list[tuple[str, bool, str | None, str | None]]) -> None:
    """A shard's outcomes parquet beside it, one (key, kept, reason, detail) row each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys, kept, reasons, details = (list(c) for c in zip(*rows))
    table = pa.table({"key": pa.array(keys, pa.string()), "kept": pa.array(kept, pa.bool_()),
                      "reason": pa.array(reasons, pa.string()), "detail": pa.array(details, pa.string())})
    pq.write_table(table, shard.with_suffix(".parquet"))


# ---------------------------------------------------------------------- pipeline input shards and configs

BG = np.array([40, 90, 160], np.uint8)  # the background colour of `scene` (the stand-in stages key on it)

# `pipelines.build` arguments for the classical stand-in stages of `tests.stages` (no model is loaded).
CLASSICAL = ["--preset", "tiny", "--log-level", "WARNING", "--backend", "caption=none", "--backend",
             "object_caption=none", "--backend", "detect=test-colour", "--backend", "segment=test-box",
             "--backend", "inpaint=test-fill"]


def classical_config(**overrides):
    """The tiny PipelineConfig on the classical stand-in stages of `tests.stages`, captions off."""
    import tests.stages  # noqa: F401 — registers the test-* backends
    from pipelines.config import PipelineConfig

    backends = {"caption": None, "detect": "test-colour", "segment": "test-box", "saliency": "classical",
                "object_caption": None, "inpaint": "test-fill"}
    backends.update(overrides.pop("backends", {}))
    return PipelineConfig.from_preset("tiny", backends=backends, **overrides)


def scene(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A noisy blue (H, W, 3) image with a red and a yellow box."""
    img = np.broadcast_to(BG, (size, size, 3)).copy()
    img = np.clip(img.astype(int) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8)
    for colour in ([230, 40, 40], [240, 220, 30]):
        x, y = rng.integers(8, size // 2, 2)
        w, h = rng.integers(size // 6, size // 3, 2)
        img[y : y + h, x : x + w] = colour
    return img


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_input_shard(path: Path, records: list[tuple[str, dict[str, bytes]]]) -> str:
    """An img2dataset-style input shard: per record KEY.jpg/.txt/.json (whatever members it names)."""
    return write_tar(path, [(f"{key}.{suffix}", data) for key, members in records for suffix, data in members.items()])


def input_records(n: int, seed: int = 0, shard: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    """`n` img2dataset records (jpg of `scene`, alt text, json metadata) with keys SHARD(5)I(4)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = f"{shard:05d}{i:04d}"
        meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success"}
        out.append((key, {"jpg": jpeg(scene(rng)), "txt": b"two boxes on blue", "json": json.dumps(meta).encode()}))
    return out


# ------------------------------------------------------------------------------- LayerDiff networks and runs

TEXT_DIM, T_GLOBAL, T_LAYER, SIZE = 32, 7, 5, 16  # tiny UNet: text width, global/layer tokens, latent side


def tiny_sd_unet(seed: int = 0):
    """A two-level SD-shaped UNet2DConditionModel with random weights (latent side SIZE)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=TEXT_DIM, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=SIZE,
    ).eval()


def make_inputs(B: int, L: int, seed: int = 1) -> dict:
    """LayerDiffUNet inputs for `tiny_sd_unet`: (B, L, 8, S, S) latents, (B, L) timesteps, text embeddings."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(B, L, 8, SIZE, SIZE, generator=g),
        "timesteps": torch.randint(0, 1000, (B, L), generator=g),
        "global_text": torch.randn(B, T_GLOBAL, TEXT_DIM, generator=g),
        "layer_text": torch.randn(B, L, T_LAYER, TEXT_DIM, generator=g),
    }


def randomize_new_modules(model, seed: int = 2, std: float = 0.2) -> None:
    """Give every new parameter of a LayerDiffUNet (including the zero-initialised ones) random values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.new_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_run(root, max_layers: int = 4):
    """A LayerDiff run folder from the tiny SD preset, every new module randomised (so all paths are live)."""
    from model.sampling.pipeline import LayerDiffPipeline
    from model.tiny import build_tiny_models

    build_tiny_models(root / "tiny", only=("sd15",))
    pipe = LayerDiffPipeline.from_sd(root / "tiny" / "sd15", max_layers=max_layers)
    randomize_new_modules(pipe.unet, seed=0, std=0.1)
    pipe.save_pretrained(root / "run")
    return root / "run"


class UNetSpy:
    """Records (batch size, global_text, layer_text) of every UNet forward."""

    def __init__(self, pipe):
        self.calls: list = []  # (batch size, global text embeddings, layer text embeddings) per call
        self.handle = pipe.unet.register_forward_pre_hook(self._record)

    def _record(self, _module, args):
        self.calls.append((args[0].shape[0], args[2].detach().clone(), args[3].detach().clone()))

    def close(self):
        self.handle.remove()
