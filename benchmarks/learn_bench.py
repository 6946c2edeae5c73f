"""Does LayerDiff learn? Synthetic data → small VAE → LayerDiff from scratch (real trainer) → real pipeline → metrics.

Stages (each writes `OUT/<stage>.done.json`; a re-run skips finished stages, the trainer resumes its checkpoints):
  1. data     synthetic 64² MLCID shards (1–2 coloured shapes on a plain background = 2- and 3-layer scenes) with
              some (colour, shape) pairs withheld from training; test prompts from fresh scenes, seen and held-out.
  2. vae      a small SD-shaped AutoencoderKL trained on the trainer's layer images and masks (`model.training.vae_train`).
  3. sd       an SD-1.x pipeline folder from scratch: that VAE, a frozen random CLIPTextModel with the real CLIP
              tokenizer, a random small UNet2DConditionModel, SD's DDIM schedule.
  4. train    `python -m model.training.trainer --config model/configs/learn_bench.yaml --pretrained OUT/sd` (what `make train`
              runs) into OUT/run.
  5. sample   `LayerDiffPipeline` on every test prompt: the step-0 model (CFG), the trained model with CFG, with
              CFG + SMG, and with the layer prompts rolled by one across layers (CFG; scored against the true ones).
  6. report   `model.evaluation.layer_fidelity` scores → OUT/results.json, OUT/results.md and OUT/grid.png.

    python -m benchmarks.learn_bench --out .work/learn-bench            # the full benchmark (~45 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from model.evaluation.layer_fidelity import LayerLabels, ShapeClassifier, score_sample, summarize
from model.training.config import CONFIG_DIR
from model.training.text_train import TextTrainConfig
from model.training.vae_train import VAETrainConfig

log = logging.getLogger(__name__)
CONFIG = CONFIG_DIR / "learn_bench.yaml"
GROUPS = ("seen-2L", "heldout-2L", "seen-3L", "heldout-3L")
# condition → (trained model?, guidance, SMG scale (None = BenchConfig.smg_scale), layer prompts rolled?)
CONDITION_SPECS: dict[str, tuple[bool, str, float | None, bool]] = {
    "step0-cfg": (False, "cfg", None, False),
    "cfg": (True, "cfg", None, False),
    "cfg+smg": (True, "cfg+smg", None, False),
    "cfg+smg-s1": (True, "cfg+smg", 1.0, False),
    "shuffled-cfg": (True, "cfg", None, True),
}
CONDITIONS = tuple(CONDITION_SPECS)


@dataclass
class BenchConfig:
    """Sizes of every stage. Defaults = the full benchmark; `smoke()` = a seconds-long run for tests."""

    size: int = 64
    train_samples: int = 4000
    shards: int = 4
    seed: int = 0
    test_seed: int = 1
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    background_colours: tuple[str, ...] = ("purple", "orange", "cyan", "pink")
    # textures a blur can conceal (named in the prompt for backgrounds, not for objects)
    background_patterns: tuple[str, ...] = ("plain", "stripes", "checks", "gradient")
    object_patterns: tuple[str, ...] = ("plain", "stripes", "checks", "dots")
    holdout_pairs: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
    min_radius: float = 0.2
    max_radius: float = 0.32
    vae: VAETrainConfig = field(default_factory=lambda: VAETrainConfig(
        block_out_channels=(16, 32, 64, 64), steps=1500, max_samples=1500))
    unet_channels: tuple[int, ...] = (64, 128)
    text_hidden: int = 64
    text_layers: int = 2
    # caption pre-training of the frozen text encoder (None: keep it random, as before)
    text_train: TextTrainConfig | None = field(default_factory=TextTrainConfig)
    text_train_samples: int = 4000  # training scenes whose captions and layer prompts it reads
    train_config: str = str(CONFIG)
    train_steps: int | None = None  # None = the YAML's max_steps
    train_overrides: tuple[str, ...] = ()  # extra `--set key=value` for the trainer
    per_group: int = 30  # test prompts per group
    sample_steps: int = 20
    guidance_scale: float = 3.0
    smg_scale: float = 3.0
    classifier_samples: int = 1500  # training scenes whose masks fit the shape classifier
    grid_rows: int = 8
    threads: int = 1  # torch threads; on 2 shared cores 2 threads ran 5× slower than 1 (oversubscription)

    @classmethod
    def smoke(cls) -> "BenchConfig":
        return cls(train_samples=24, shards=2, vae=VAETrainConfig(steps=3, max_samples=16, batch_size=4,
                   block_out_channels=(16, 16, 16, 16), norm_num_groups=8, holdout=4), unet_channels=(32, 32),
                   text_hidden=32, text_train=TextTrainConfig(steps=2, batch_size=4), text_train_samples=24,
                   train_steps=2, train_overrides=("batch_size=2", "checkpoint_every=1",
                   "warmup_steps=1", "data.shuffle_buffer=2"), per_group=2, sample_steps=2,
                   classifier_samples=24, grid_rows=2, threads=1)

    def scene_config(self, foregrounds: tuple[int, int] = (1, 2), allowed=None, holdout=None):
        from mlcid.synthetic import SceneConfig

        return SceneConfig(size=self.size, min_foregrounds=foregrounds[0], max_foregrounds=foregrounds[1],
                           colours=self.colours, shapes=self.shapes, background_patterns=self.background_patterns,
                           object_patterns=self.object_patterns,
                           background_colours=self.background_colours, allowed_pairs=allowed,
                           holdout_pairs=self.holdout_pairs if holdout is None else holdout,
                           min_radius=self.min_radius, max_radius=self.max_radius)


# -- stages ----------------------------------------------------------------------------------------------------------


def _stage(out: Path, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a stage unless OUT/<name>.done.json exists; record its result and seconds there."""
    done = out / f"{name}.done.json"
    if done.exists():
        log.info("stage %s: done earlier, skipped", name)
        return json.loads(done.read_text())
    log.info("stage %s ...", name)
    start = time.perf_counter()
    result = run() | {"seconds": round(time.perf_counter() - start, 1)}
    done.write_text(json.dumps(result, indent=1))
    log.info("stage %s: %.0f s", name, result["seconds"])
    return result


def test_scenes(cfg: BenchConfig, group: str) -> list:
    """`per_group` fresh ground-truth scenes (seed `test_seed`) of a group: seen or held-out pairs, 1 or 2 objects."""
    from mlcid.synthetic import make_scene

    kind, layers = group.split("-")
    n_fg = int(layers[0]) - 1
    if kind == "seen":
        scene_cfg = cfg.scene_config((n_fg, n_fg))
    else:  # every foreground a withheld pair
        scene_cfg = cfg.scene_config((n_fg, n_fg), allowed=cfg.holdout_pairs, holdout=())
    offset = GROUPS.index(group) * 100_000
    return [make_scene(scene_cfg, cfg.test_seed, offset + i) for i in range(cfg.per_group)]


def stage_data(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    from mlcid.synthetic import write_dataset

    summary = write_dataset(out / "data" / "raw", out / "data" / "mlcid", cfg.train_samples, seed=cfg.seed,
                            shards=cfg.shards, config=cfg.scene_config(), progress=False)
    return {"layer_counts": summary["layer_counts"], "samples": summary["written"],
            "holdout_pairs": [list(p) for p in cfg.holdout_pairs]}


def stage_vae(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    from model.training.vae_train import train_vae

    vae_cfg = dataclasses.replace(cfg.vae, resolution=cfg.size, threads=cfg.threads)
    report = train_vae(str(out / "data" / "mlcid"), out / "vae", vae_cfg, progress=True)
    return {k: v for k, v in dataclasses.asdict(report).items() if k != "losses"}


def _scratch_sd(cfg: BenchConfig):
    """`model.tiny`'s SD-1.x builder at this benchmark's sizes (random weights, the real CLIP tokenizer)."""
    from model.tiny import TinySDConfig, build_sd_pipeline

    return build_sd_pipeline(TinySDConfig(
        block_out_channels=cfg.unet_channels, down_block_types=("CrossAttnDownBlock2D",) * len(cfg.unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(cfg.unet_channels), sample_size=cfg.size // 8,
        text_hidden=cfg.text_hidden, text_layers=cfg.text_layers, text_heads=4,
        text_intermediate=2 * cfg.text_hidden, seed=cfg.seed))


def prompt_facts(source: dict[str, Any]) -> list[str]:
    """What a synthetic scene's global caption states: background colour and pattern, each object."""
    bg = source["background"]
    return [f"background:{bg['colour']}", f"pattern:{bg['pattern']}"] + [
        f"object:{o['colour']} {o['shape']}" for o in source["objects"]]


def stage_text(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """Caption pre-training of the text encoder LayerDiff keeps frozen (`model.training.text_train`): captions and
    layer prompts of the training scenes; a linear probe of the background colour before and after."""
    from mlcid.reader import MLCIDReader
    from model.training.text_train import linear_probe_accuracy, train_text_encoder

    pipe = _scratch_sd(cfg)
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    prompts, facts, bg = [], [], []
    for n, sample in enumerate(MLCIDReader(str(out / "data" / "mlcid"))):
        if n >= cfg.text_train_samples:
            break
        prompts.append(sample.global_prompt)
        facts.append(prompt_facts(sample.source))
        bg.append(sample.source["background"]["colour"])
        for layer, obj in zip(sample.layers[1:], sample.source["objects"]):
            prompts.append(layer.prompt)
            facts.append([f"object:{obj['colour']} {obj['shape']}"])
    prompts += [sample.layers[0].prompt, ""]  # "the background" and the dropped prompt state nothing
    facts += [[], []]
    test = [s.global_prompt for g in GROUPS for s in test_scenes(cfg, g)]
    test_bg = [s.source["background"]["colour"] for g in GROUPS for s in test_scenes(cfg, g)]
    captions = [p for p, f in zip(prompts, facts) if f and f[0].startswith("background:")]
    probe = lambda: linear_probe_accuracy(encoder, tokenizer, captions, bg, test, test_bg, cfg.seed)  # noqa: E731
    before = probe()
    report = {"background_probe_random": before}
    if cfg.text_train is not None:
        result = train_text_encoder(encoder, tokenizer, prompts, facts,
                                    dataclasses.replace(cfg.text_train, threads=cfg.threads))
        report |= {k: v for k, v in dataclasses.asdict(result).items() if k != "losses"}
        report |= {"loss_first": float(np.mean(result.losses[:10])), "loss_last": float(np.mean(result.losses[-10:]))}
    report["background_probe"] = probe()
    encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    return report


def stage_sd(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """The scratch SD-1.x folder: `model.tiny`'s builder with the trained VAE and the (caption-trained) text
    encoder swapped in."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from model.tokenizer import write_clip_vocab_files

    pipe = _scratch_sd(cfg)
    pipe.vae = AutoencoderKL.from_pretrained(out / "vae")
    pipe.text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder")
    pipe.register_modules(vae=pipe.vae, text_encoder=pipe.text_encoder)
    pipe.save_pretrained(out / "sd", safe_serialization=True)
    write_clip_vocab_files(out / "sd" / "tokenizer")
    return {"unet_params_m": sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
            "text_params_m": sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6}


def stage_train(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """The real trainer's CLI in a child process (resumes its own checkpoints after an interruption)."""
    from model.training import checkpoint as ckpt

    run = out / "run"
    cmd = [sys.executable, "-m", "model.training.trainer", "--data", str(out / "data" / "mlcid"), "--out", str(run),
           "--config", cfg.train_config, "--pretrained", str(out / "sd")]
    cmd += ["--max-steps", str(target_steps(cfg))]
    for item in cfg.train_overrides:
        cmd += ["--set", item]
    if run.exists() and ckpt.latest_checkpoint(run) is not None:
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    log.info("trainer: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [m["loss"] for m in lines]
    k = max(1, len(losses) // 10)
    return {"steps": lines[-1]["step"], "loss_first": float(np.mean(losses[:k])),
            "loss_last": float(np.mean(losses[-k:])), "command": " ".join(cmd[1:])}


def target_steps(cfg: BenchConfig) -> int:
    """The trainer's step count: `train_steps`, else the YAML's `max_steps`."""
    from model.training.config import load_config

    return cfg.train_steps if cfg.train_steps is not None else load_config(cfg.train_config).max_steps


def _invalidate_short_run(cfg: BenchConfig, out: Path) -> None:
    """Asked for more steps than a finished run has: forget the train and sample stages (the trainer resumes)."""
    done = out / "train.done.json"
    if done.exists() and json.loads(done.read_text())["steps"] < target_steps(cfg):
        log.info("run has %d steps, %d asked: training continues", json.loads(done.read_text())["steps"],
                 target_steps(cfg))
        for name in ["train", *(f"sample-{c}" for c in CONDITIONS if CONDITION_SPECS[c][0])]:
            (out / f"{name}.done.json").unlink(missing_ok=True)
    for c in CONDITIONS:  # other test-set sizes or sampling steps: sample again
        done = out / f"sample-{c}.done.json"
        if done.exists():
            old = json.loads(done.read_text())
            if (old.get("per_group"), old.get("sample_steps")) != (cfg.per_group, cfg.sample_steps):
                done.unlink()


def _rolled(prompts: list[str]) -> list[str]:
    """Layer prompts moved one layer up (last → background): every layer gets another layer's prompt."""
    return prompts[-1:] + prompts[:-1]


def stage_sample(cfg: BenchConfig, out: Path, condition: str) -> dict[str, Any]:
    """Sample every test prompt of every group under one condition; save uint8 arrays per group."""
    from model.sampling.pipeline import LayerDiffPipeline

    trained, guidance, smg_scale, shuffled = CONDITION_SPECS[condition]
    if trained:
        pipe = LayerDiffPipeline.from_pretrained(out / "run")
    else:
        pipe = LayerDiffPipeline.from_sd(out / "sd", max_layers=_max_layers(out))
    pipe.set_progress_bar_config(disable=True)
    smg_scale = cfg.smg_scale if smg_scale is None else smg_scale
    folder = out / "samples" / condition
    folder.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    for group in GROUPS:
        scenes = test_scenes(cfg, group)
        images, masks, composites = [], [], []
        for i, scene in enumerate(tqdm(scenes, desc=f"{condition} {group}", mininterval=5)):
            prompts = [layer.prompt for layer in scene.layers]
            if shuffled:
                prompts = _rolled(prompts)
            result = pipe(scene.global_prompt, prompts, num_inference_steps=cfg.sample_steps,
                          guidance_scale=cfg.guidance_scale, smg_scale=smg_scale, guidance=guidance,
                          height=cfg.size, width=cfg.size, output_type="np",
                          generator=torch.Generator().manual_seed(cfg.test_seed * 1000 + i))
            images.append(result.layer_images[0])  # (L, H, W, 3)
            masks.append(result.masks[0])  # (L, H, W)
            composites.append(result.composites[0])  # (H, W, 3)
        np.savez_compressed(folder / f"{group}.npz", images=np.stack(images), masks=np.stack(masks),
                            composites=np.stack(composites))
    return {"condition": condition, "guidance": guidance, "smg_scale": smg_scale if guidance != "cfg" else None,
            "per_group": cfg.per_group, "sample_steps": cfg.sample_steps}


def _max_layers(out: Path) -> int:
    import yaml

    return int(yaml.safe_load((out / "run" / "config.yaml").read_text())["data"]["max_layers"])


# -- report ----------------------------------------------------------------------------------------------------------


def fit_shape_classifier(cfg: BenchConfig, out: Path) -> tuple[ShapeClassifier, dict[str, float]]:
    """Fit on ground-truth training-shard masks; accuracy on the test groups' ground-truth masks."""
    from mlcid.reader import MLCIDReader

    masks, shapes = [], []
    for n, sample in enumerate(MLCIDReader(str(out / "data" / "mlcid"))):
        if n >= cfg.classifier_samples:
            break
        masks += [m > 127 for m in sample.masks]
        shapes += [o["shape"] for o in sample.source["objects"]]
    clf = ShapeClassifier(seed=cfg.seed).fit(masks, shapes)
    acc = {}
    for group in GROUPS:
        scenes = test_scenes(cfg, group)
        acc[group] = clf.accuracy([m > 127 for s in scenes for m in s.masks],
                                  [o["shape"] for s in scenes for o in s.source["objects"]])
    return clf, acc


def score_all(cfg: BenchConfig, out: Path, clf: ShapeClassifier) -> dict[str, dict[str, dict[str, float]]]:
    """{condition: {group: summary}}, plus the ground-truth layers themselves as condition "ground-truth"."""
    table: dict[str, dict[str, dict[str, float]]] = {"ground-truth": {}}
    for group in GROUPS:
        scenes = test_scenes(cfg, group)
        labels = [LayerLabels.from_source(s.source) for s in scenes]
        gt = []
        for s, lab in zip(scenes, labels):
            imgs = np.stack([s.background] + [fg[..., :3] for fg in s.foregrounds])
            msk = np.stack([np.where(np.any(np.stack(s.masks) > 127, 0), 0, 255).astype(np.uint8)] + list(s.masks))
            gt.append(score_sample(imgs, msk, s.composite, lab, clf))
        table["ground-truth"][group] = summarize(gt)
        for condition in CONDITIONS:
            data = np.load(out / "samples" / condition / f"{group}.npz")
            results = [score_sample(data["images"][i], data["masks"][i], data["composites"][i], lab, clf)
                       for i, lab in enumerate(labels)]
            table.setdefault(condition, {})[group] = summarize(results)
    return table


def write_grid(cfg: BenchConfig, out: Path, path: Path, scale: int = 2) -> None:
    """PNG rows: per test prompt (seen then held-out), ground truth composite + layers, then each condition's
    composite and layers (foregrounds shown inside their masks on grey)."""
    from PIL import Image, ImageDraw

    s, L = cfg.size * scale, 3
    rows = []
    for group in ("seen-2L", "seen-3L", "heldout-2L", "heldout-3L"):
        scenes = test_scenes(cfg, group)[: max(1, cfg.grid_rows // 4)]
        data = {c: np.load(out / "samples" / c / f"{group}.npz") for c in ("step0-cfg", "cfg", "cfg+smg")}
        for i, scene in enumerate(scenes):
            tiles = [scene.composite, scene.background] + [np.where(fg[..., 3:] > 127, fg[..., :3], 128)
                                                            for fg in scene.foregrounds]
            tiles += [np.full_like(scene.composite, 255)] * (1 + L - len(tiles))
            for c, d in data.items():
                imgs, msk = d["images"][i], d["masks"][i]
                tiles += [d["composites"][i], imgs[0]] + [np.where(msk[j][..., None] > 127, imgs[j], 128)
                                                          for j in range(1, len(imgs))]
                tiles += [np.full_like(scene.composite, 255)] * ((1 + L) * (2 + list(data).index(c)) - len(tiles))
            row = Image.new("RGB", (s * len(tiles), s + 14), "white")
            for j, t in enumerate(tiles):
                row.paste(Image.fromarray(np.asarray(t, np.uint8)).resize((s, s), Image.Resampling.NEAREST), (j * s, 14))
            ImageDraw.Draw(row).text((2, 1), f"[{group}] {' | '.join(l.prompt for l in scene.layers[1:])}", fill="black")
            rows.append(row)
    header = Image.new("RGB", (rows[0].width, 14), "white")
    draw = ImageDraw.Draw(header)
    for k, name in enumerate(("ground truth", "step 0 (CFG)", "trained CFG", "trained CFG+SMG")):
        draw.text((k * (1 + L) * s + 2, 1), f"{name}: composite, background, foregrounds", fill="black")
    grid = Image.new("RGB", (rows[0].width, 14 + sum(r.height for r in rows)), "white")
    grid.paste(header, (0, 0))
    y = 14
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    grid.save(path, optimize=True)


def write_markdown(cfg: BenchConfig, out: Path, results: dict[str, Any]) -> str:
    """The results table (per condition × group) and the stage notes, as markdown."""
    cols = ("colour_acc", "shape_acc", "both_acc", "nonempty", "disjoint", "background_acc", "composite_mae")
    lines = ["| condition | group | n layers | colour acc | shape acc | colour+shape | non-empty | disjoint | "
             "background acc | composite MAE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for condition, groups in results["table"].items():
        for group, r in groups.items():
            vals = " | ".join(f"{r[c]:.2f}" if c != "composite_mae" else f"{r[c]:.1f}" for c in cols)
            lines.append(f"| {condition} | {group} | {r['layers']} | {vals} |")
    st = results["stages"]
    seen = results["table"]["cfg"]["seen-2L"]
    goal = seen["colour_acc"] >= 0.8 and seen["shape_acc"] >= 0.6
    notes = [
        "", f"Data: {st['data']['samples']} training scenes at {cfg.size}² (layer counts {st['data']['layer_counts']}),"
        f" held-out pairs {', '.join(':'.join(p) for p in cfg.holdout_pairs)}; {cfg.per_group} test prompts per group.",
        f"VAE ({st['vae']['params_m']:.2f}M params, {st['vae']['steps']} steps, {st['vae']['train_seconds']:.0f} s): "
        f"held-out image MSE {st['vae']['image_mse']:.4f} (PSNR {st['vae']['image_psnr_db']:.1f} dB), mask IoU "
        f"{st['vae']['mask_iou']:.3f}, scaling factor {st['vae']['scaling_factor']:.3f}.",
        f"LayerDiff UNet {st['sd']['unet_params_m']:.1f}M params (SD UNet before the layer blocks), frozen random "
        f"text encoder {st['sd']['text_params_m']:.1f}M; {st['train']['steps']} steps in {st['train']['seconds']:.0f}"
        f" s, loss {st['train']['loss_first']:.3f} → {st['train']['loss_last']:.3f}.",
        "Shape classifier accuracy on ground-truth test masks: "
        + ", ".join(f"{g} {a:.2f}" for g, a in results["classifier_acc"].items()) + ".",
        f"Sampling: DDIM {cfg.sample_steps} steps, CFG scale {cfg.guidance_scale} (paper negatives), SMG scale "
        f"{cfg.smg_scale} (paper) or 1, blur kernel 31 / sigma 3 (paper) on {cfg.size // 8}² latents; "
        "`shuffled-cfg` rolls the layer prompts one layer up and is scored against the true ones.",
        f"Chance: colour 1/{len(cfg.colours)} among the object colours (a grey layer names none), shape "
        f"1/{len(cfg.shapes)}; background 1/{len(cfg.background_colours)}. Composite MAE is 0 by construction (the "
        "pipeline composes its own layers by Eq. 4); it checks the output plumbing.",
        f"Goal (seen 2-layer, trained CFG: colour ≥ 0.8, shape ≥ 0.6): {'reached' if goal else 'NOT reached'}.",
    ]
    return "\n".join(lines + notes) + "\n"


def stage_report(cfg: BenchConfig, out: Path, stages: dict[str, Any]) -> dict[str, Any]:
    clf, acc = fit_shape_classifier(cfg, out)
    results = {"table": score_all(cfg, out, clf), "classifier_acc": acc, "stages": stages,
               "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(write_markdown(cfg, out, results))
    write_grid(cfg, out, out / "grid.png")
    return {"results": str(out / "results.md"), "grid": str(out / "grid.png")}


def run_bench(cfg: BenchConfig, out: str | Path, until: str | None = None) -> dict[str, Any]:
    """All stages in order (finished ones skipped), or up to `until` ("train"); returns the stage records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    stages: dict[str, Any] = {}
    stages["data"] = _stage(out, "data", lambda: stage_data(cfg, out))
    stages["vae"] = _stage(out, "vae", lambda: stage_vae(cfg, out))
    stages["text"] = _stage(out, "text", lambda: stage_text(cfg, out))
    stages["sd"] = _stage(out, "sd", lambda: stage_sd(cfg, out))
    _invalidate_short_run(cfg, out)
    stages["train"] = _stage(out, "train", lambda: stage_train(cfg, out))
    if until == "train":
        return stages
    for condition in CONDITIONS:
        stages[f"sample-{condition}"] = _stage(out, f"sample-{condition}", lambda c=condition: stage_sample(cfg, out, c))
    (out / "report.done.json").unlink(missing_ok=True)  # the report is cheap: always rewritten
    stages["report"] = _stage(out, "report", lambda: stage_report(cfg, out, dict(stages)))
    return stages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learn_bench", description=__doc__.split("\n\n")[0],
                                epilog="Stages: data, vae, sd, train, sample-*, report. Delete OUT/<stage>.done.json "
                                "(and its outputs) to redo a stage.")
    p.add_argument("--out", type=Path, required=True, help="work folder (data, vae, sd, run, samples, results)")
    p.add_argument("--smoke", action="store_true", help="seconds-long sizes (tests)")
    p.add_argument("--train-steps", type=int, help="trainer steps (default: the YAML's max_steps)")
    p.add_argument("--per-group", type=int, help="test prompts per group")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--until", choices=("train",), help="stop after this stage (e.g. train now, sample later)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = BenchConfig.smoke() if args.smoke else BenchConfig()
    for name in ("train_steps", "per_group", "threads"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    run_bench(cfg, args.out, args.until)
    if args.until:
        return 0
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
