"""Does LayerDiff learn? Synthetic data → small VAE → LayerDiff from scratch (real trainer) → real pipeline → metrics.

Stages (each writes `OUT/<stage>.done.json`; a re-run skips finished stages, the trainer resumes its checkpoints):
  1. data     synthetic 64² MLCID shards (1–2 coloured shapes on a plain background = 2- and 3-layer scenes) with
              some (colour, shape) pairs withheld from training; test prompts from fresh scenes, seen and held-out.
  2. vae      a small SD-shaped AutoencoderKL trained on the trainer's layer images and masks (`model.training.vae_train`).
  3. sd       an SD-1.x pipeline folder from scratch: that VAE, a frozen random CLIPTextModel with the real CLIP
              tokenizer, a random small UNet2DConditionModel, SD's DDIM schedule.
  4. train    `layerdiff train --config model/configs/learn_bench.yaml --pretrained OUT/sd` (what `make train`
              runs) into OUT/run.
  5. vae-roundtrip  the test scenes' true layers through the VAE alone, scored like samples: every score's ceiling.
  6. sample   `LayerDiffPipeline` on every test prompt: the step-0 model (CFG), the trained model with CFG, with
              CFG + SMG, and with the layer prompts rolled by one across layers (CFG; scored against the true ones).
  7. report   `model.evaluation.layer_fidelity` scores → OUT/results.json, OUT/results.md and OUT/grid.png.

    layerdiff learn-bench --out .work/learn-bench            # the full benchmark (~45 min on 2 CPU cores)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.learn_bench_config import (  # noqa: F401 (re-exported: the benchmark's public names)
    CONFIG, GROUPS, MAIN_CONDITIONS, SMG_VARIANTS, VAE_ROUNDTRIP, BenchConfig, Condition, test_scenes,
)

log = logging.getLogger(__name__)


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
        text_intermediate=2 * cfg.text_hidden, seed=cfg.seed, vocabulary=_vocabulary(cfg)))


def _vocabulary(cfg: BenchConfig) -> tuple[str, ...] | None:
    """The words CLIP's tokenizer is pruned to (every word synthetic prompts can use), or None (full)."""
    from mlcid.synthetic import prompt_vocabulary

    return tuple(prompt_vocabulary()) if cfg.prune_vocabulary else None


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
    vocabulary = _vocabulary(cfg)
    write_clip_vocab_files(out / "sd" / "tokenizer", None if vocabulary is None else list(vocabulary))
    return {"unet_params_m": sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
            "text_params_m": sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6}


def stage_train(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """The real trainer's CLI in a child process (resumes its own checkpoints after an interruption)."""
    from model.training import checkpoint as ckpt

    run = out / "run"
    cmd = [sys.executable, "-m", "cli", "layerdiff", "train", "--data", str(out / "data" / "mlcid"), "--out", str(run),
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


def stage_vae_roundtrip(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """The test scenes' true layers through the benchmark's VAE alone (encode → decode, foregrounds filled as in
    training; no noise, no UNet), saved like a condition's samples: the best any sampled model can score with this
    VAE. A VAE that cannot carry a colour caps that colour's accuracy for every condition."""
    from model.sampling.applications import encode_layers, source_from_sample
    from model.sampling.pipeline import LayerDiffPipeline

    pipe = LayerDiffPipeline.from_sd(out / "sd", max_layers=_max_layers(out))
    folder = out / "samples" / VAE_ROUNDTRIP
    folder.mkdir(parents=True, exist_ok=True)
    for group in GROUPS:
        images, masks, composites = [], [], []
        for scene in test_scenes(cfg, group):
            src = source_from_sample(scene)
            result = pipe.decode_layers(encode_layers(pipe, src.images, src.masks, (cfg.size, cfg.size)))
            images.append(result.layer_images[0])  # (L, H, W, 3)
            masks.append(result.masks[0])  # (L, H, W)
            composites.append(result.composites[0])  # (H, W, 3)
        np.savez_compressed(folder / f"{group}.npz", images=np.stack(images), masks=np.stack(masks),
                            composites=np.stack(composites))
    return {"condition": VAE_ROUNDTRIP, "per_group": cfg.per_group}


def target_steps(cfg: BenchConfig) -> int:
    """The trainer's step count: `train_steps`, else the YAML's `max_steps`."""
    from model.training.config import load_config

    return cfg.train_steps if cfg.train_steps is not None else load_config(cfg.train_config).max_steps


def _invalidate_short_run(cfg: BenchConfig, out: Path) -> None:
    """Asked for more steps than a finished run has: forget the train and sample stages (the trainer resumes)."""
    done = out / "train.done.json"
    conditions = cfg.conditions()
    if done.exists() and json.loads(done.read_text())["steps"] < target_steps(cfg):
        log.info("run has %d steps, %d asked: training continues", json.loads(done.read_text())["steps"],
                 target_steps(cfg))
        for name in ["train", *(f"sample-{c}" for c, spec in conditions.items() if spec.trained)]:
            (out / f"{name}.done.json").unlink(missing_ok=True)
    for name, spec in conditions.items():  # another condition, test-set size or step count: sample again
        done = out / f"sample-{name}.done.json"
        if done.exists():
            old = json.loads(done.read_text())
            if (old.get("spec"), old.get("sample_steps")) != (_spec_json(spec), cfg.sample_steps):
                done.unlink()


def _spec_json(spec: Condition) -> dict[str, Any]:
    """The condition as recorded in its done file (window fields only when set, so older records still match)."""
    out = dataclasses.asdict(spec) | {"smg": dataclasses.asdict(spec.smg)}
    for name in ("smg_start", "smg_end", "smg_mask_interval"):
        if out[name] == getattr(Condition, name):
            del out[name]
    return out


def _rolled(prompts: list[str]) -> list[str]:
    """Layer prompts moved one layer up (last → background): every layer gets another layer's prompt."""
    return prompts[-1:] + prompts[:-1]


def stage_sample(cfg: BenchConfig, out: Path, condition: str) -> dict[str, Any]:
    """Sample the test prompts of every group under one condition; save uint8 arrays per group."""
    from tqdm.auto import tqdm

    from model.sampling.pipeline import LayerDiffPipeline

    spec = cfg.conditions()[condition]
    if spec.trained:
        pipe = LayerDiffPipeline.from_pretrained(out / "run")
    else:
        pipe = LayerDiffPipeline.from_sd(out / "sd", max_layers=_max_layers(out))
    pipe.set_progress_bar_config(disable=True)
    folder = out / "samples" / condition
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for group in GROUPS:
        images, masks, composites = [], [], []
        for i, scene in enumerate(tqdm(test_scenes(cfg, group, spec.per_group), desc=f"{condition} {group}",
                                       mininterval=5)):
            prompts = [layer.prompt for layer in scene.layers]
            if spec.shuffled:
                prompts = _rolled(prompts)
            result = pipe(scene.global_prompt, prompts, num_inference_steps=cfg.sample_steps,
                          guidance_scale=cfg.guidance_scale, smg_scale=spec.smg_scale, guidance=spec.guidance,
                          smg=spec.smg, smg_start=spec.smg_start, smg_end=spec.smg_end,
                          smg_mask_interval=spec.smg_mask_interval, height=cfg.size, width=cfg.size, output_type="np",
                          generator=torch.Generator().manual_seed(cfg.test_seed * 1000 + i))
            images.append(result.layer_images[0])  # (L, H, W, 3)
            masks.append(result.masks[0])  # (L, H, W)
            composites.append(result.composites[0])  # (H, W, 3)
        np.savez_compressed(folder / f"{group}.npz", images=np.stack(images), masks=np.stack(masks),
                            composites=np.stack(composites))
    n = len(GROUPS) * spec.per_group
    return {"condition": condition, "spec": _spec_json(spec), "sample_steps": cfg.sample_steps,
            "seconds_per_sample": round((time.perf_counter() - start) / n, 3)}


def _max_layers(out: Path) -> int:
    import yaml

    return int(yaml.safe_load((out / "run" / "config.yaml").read_text())["data"]["max_layers"])


def reuse_vae(source: Path, out: Path) -> None:
    """Take the finished VAE stage of another work folder (the shipped model reuses the default benchmark's VAE,
    trained on its textured scenes); refused when OUT already has a VAE of its own."""
    if (out / "vae.done.json").exists():
        raise ValueError(f"{out} already has a VAE stage; --vae-from applies to a fresh work folder only")
    if not (source / "vae.done.json").exists():
        raise ValueError(f"{source} has no finished VAE stage (run `layerdiff learn-bench --out {source} "
                         "--until vae` first)")
    shutil.copytree(source / "vae", out / "vae")
    record = json.loads((source / "vae.done.json").read_text()) | {"copied_from": str(source)}
    (out / "vae.done.json").write_text(json.dumps(record, indent=1))


def run_bench(cfg: BenchConfig, out: str | Path, until: str | None = None) -> dict[str, Any]:
    """All stages in order (finished ones skipped), or up to `until` ("vae" or "train"); returns the records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    stages: dict[str, Any] = {}
    stages["data"] = _stage(out, "data", lambda: stage_data(cfg, out))
    stages["vae"] = _stage(out, "vae", lambda: stage_vae(cfg, out))
    if until == "vae":
        return stages
    stages["text"] = _stage(out, "text", lambda: stage_text(cfg, out))
    stages["sd"] = _stage(out, "sd", lambda: stage_sd(cfg, out))
    _invalidate_short_run(cfg, out)
    stages["train"] = _stage(out, "train", lambda: stage_train(cfg, out))
    if until == "train":
        return stages
    stages[VAE_ROUNDTRIP] = _stage(out, VAE_ROUNDTRIP, lambda: stage_vae_roundtrip(cfg, out))
    for condition in cfg.conditions():
        if cfg.sample_source(condition)[0] == condition:  # else its samples are another condition's
            stages[f"sample-{condition}"] = _stage(out, f"sample-{condition}",
                                                   lambda c=condition: stage_sample(cfg, out, c))
    from benchmarks.learn_bench_report import stage_report

    (out / "report.done.json").unlink(missing_ok=True)  # the report is cheap: always rewritten
    stages["report"] = _stage(out, "report", lambda: stage_report(cfg, out, dict(stages)))
    return stages
