"""Builders shared by the tests: hand-made MLCID samples, valid shards, and raw tars (no validation, for bad input)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

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


# -------------------------------------------------------------------------------------------- LayerDiff runs


def make_run(root, max_layers: int = 4):
    """A LayerDiff run folder from the tiny SD preset, every new module randomised (so all paths are live)."""
    import torch

    from model.sampling.pipeline import LayerDiffPipeline
    from model.tiny import build_tiny_models

    build_tiny_models(root / "tiny", only=("sd15",))
    pipe = LayerDiffPipeline.from_sd(root / "tiny" / "sd15", max_layers=max_layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.new_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
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
