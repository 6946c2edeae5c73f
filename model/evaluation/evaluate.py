"""Evaluation (paper §5.2, Table 1): FID, CLIP score and layer CLIP score of LayerDiff vs an SD 1.5 baseline.

Prompts come from MLCID test shards, N per layer count (2, 3, 4). Every method generates from the same prompts
and seeds in one run: SD 1.5 on the global prompt (at its native size, resized to the eval size), LayerDiff
with CFG and with CFG + self-mask guidance. FID: composites vs the real composites of the same layer count
(torch-fidelity features, reference statistics cached per dataset); CLIP score: composite vs global prompt;
layer CLIP score: each foreground over a neutral fill outside its mask vs its layer prompt.

    layerdiff eval --model RUN --data 'mlcid-{000000..000009}.tar' --out OUT [--preset tiny]

Writes OUT/metrics.json, OUT/metrics.md (Table-1 layout) and OUT/rows/<method>/ (composites, per-sample
records; a rerun with the same settings resumes there).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlcid.imageio import decode_rgb, encode_png
from mlcid.layered import LayeredImage
from mlcid.reader import MLCIDReader
from mlcid.shards import expand_urls
from model.evaluation.config import METHODS, EvalConfig
from model.evaluation.features import ALL, ClipEmbedder, FidFeatures, layer_on_fill, reference_stats, resize_rgb
from model.evaluation.metrics import FeatureStats, clip_score, frechet_distance_stats
from model.sampling.export import OutputMeta, save_output

log = logging.getLogger(__name__)

@dataclass
class Prompt:
    """One evaluation prompt, taken from an MLCID test sample."""

    index: int  # position in the prompt list (also the seed offset and the file name)
    key: str  # the MLCID sample key
    num_layers: int
    global_prompt: str
    layer_prompts: list[str]

    @property
    def name(self) -> str:
        return f"{self.num_layers}L-{self.index:05d}"


def split_output(out: LayeredImage | np.ndarray, eval_size: int) -> tuple[np.ndarray, LayeredImage | None]:
    """A method's output for one prompt → (composite at the eval size (S, S, 3) uint8, its layers or None).

    LayerDiff methods return a `LayeredImage` (at their own size); whole-image baselines an RGB array.
    """
    layers = out if isinstance(out, LayeredImage) else None
    return resize_rgb(layers.composite if layers is not None else out, eval_size), layers


# ----------------------------------------------------------------------------------------------------------
# Methods (Table 1 rows), found by name
# ----------------------------------------------------------------------------------------------------------


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class SDBaseline:
    """Stable Diffusion 1.5 on the global prompt at its native size, resized to the eval size (paper §5.2)."""

    label = "Stable Diffusion V1.5"
    has_layers = False

    def __init__(self, config: EvalConfig):
        from diffusers import StableDiffusionPipeline

        from model.loading import load_sd_components, resolve_sd

        parts = load_sd_components(resolve_sd(config.preset, config.sd_model), _torch_dtype(config.dtype),
                                   unet_in_channels=4)
        self.pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                            tokenizer=parts.tokenizer, unet=parts.unet, scheduler=parts.scheduler,
                                            safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False).to(config.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.config = config
        self.source = parts.source
        self.size = config.sd_size or parts.unet.config.sample_size * parts.vae_scale_factor

    def settings(self) -> dict[str, Any]:
        return {"model": self.source, "size": self.size, "guidance_scale": self.config.sd_guidance_scale}

    def __call__(self, prompt: Prompt, generator: torch.Generator) -> np.ndarray:
        out = self.pipe(prompt.global_prompt, num_inference_steps=self.config.num_inference_steps,
                        guidance_scale=self.config.sd_guidance_scale, height=self.size, width=self.size,
                        generator=generator, output_type="np")
        return np.clip(np.rint(out.images[0] * 255.0), 0, 255).astype(np.uint8)  # (H, W, 3)


class LayerDiffMethod:
    """LayerDiff sampling with the paper's negatives; `guidance` "cfg" or "cfg+smg" (Table 1 rows)."""

    has_layers = True

    def __init__(self, config: EvalConfig, guidance: str, label: str, pipe: Any = None):
        from model.sampling.pipeline import LayerDiffPipeline

        self.pipe = pipe or LayerDiffPipeline.from_pretrained(config.model, dtype=_torch_dtype(config.dtype))
        self.pipe.to(config.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.config, self.guidance, self.label = config, guidance, label
        self.size = config.size or self.pipe.default_size

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"model": str(c.model), "size": self.size, "guidance": self.guidance,
                "guidance_scale": c.guidance_scale, "smg_scale": c.smg_scale if "smg" in self.guidance else None}

    def __call__(self, prompt: Prompt, generator: torch.Generator) -> LayeredImage:
        c = self.config
        out = self.pipe(prompt.global_prompt, prompt.layer_prompts, num_inference_steps=c.num_inference_steps,
                        guidance_scale=c.guidance_scale, smg_scale=c.smg_scale, guidance=self.guidance,
                        height=self.size, width=self.size, generator=generator, output_type="np")
        return out.layered(0)


ROWS: dict[str, tuple[str, Callable[..., Any]]] = {
    "sd15": (SDBaseline.label, lambda config, shared: SDBaseline(config)),
    "layerdiff": ("LayerDiff", lambda config, shared: LayerDiffMethod(config, "cfg", "LayerDiff", shared)),
    "layerdiff+smg": ("LayerDiff+SMG",
                      lambda config, shared: LayerDiffMethod(config, "cfg+smg", "LayerDiff+SMG", shared)),
}
assert tuple(ROWS) == METHODS, "model.evaluation.config.METHODS names the rows defined here"


# ----------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------


def collect_prompts(config: EvalConfig) -> list[Prompt]:
    """The first `per_group` valid samples of each layer count in the shards, in shard order."""
    wanted = {n: config.per_group for n in config.layer_counts}
    prompts: list[Prompt] = []
    reader = MLCIDReader(config.data, rank=0, world_size=1)
    for sample in reader:
        n = sample.num_layers
        if wanted.get(n, 0) > 0:
            prompts.append(Prompt(index=len(prompts), key=sample.key, num_layers=n,
                                  global_prompt=sample.global_prompt, layer_prompts=list(sample.layer_prompts)))
            wanted[n] -= 1
            if not any(wanted.values()):
                break
    short = {n: config.per_group - left for n, left in wanted.items() if left}
    if short:
        raise ValueError(f"the shards hold too few valid samples: got {short} (layer count: samples) but want "
                         f"{config.per_group} per layer count {list(config.layer_counts)}; lower --per-group or "
                         f"add shards (dropped: {dict(reader.dropped) or 'none'})")
    return prompts


def generate_row(name: str, method: Any, prompts: Sequence[Prompt], config: EvalConfig,
                 clip: ClipEmbedder) -> dict[str, dict[str, Any]]:
    """Generate (or resume) one method over all prompts; CLIP scores per sample. Returns records by prompt name.

    OUT/rows/<name>/: `settings.json`, `composites/<prompt>.png`, `records.jsonl` (one line per finished
    prompt), and with `save_layers` `layers/<prompt>/` output folders.
    """
    from tqdm import tqdm

    row_dir = Path(config.out) / "rows" / name
    settings = {**method.settings(), "steps": config.num_inference_steps, "seed": config.seed,
                "eval_size": config.eval_size, "layer_fill": list(config.layer_fill), "clip": clip_identity(config)}
    settings_path = row_dir / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != json.loads(json.dumps(settings)):
        raise ValueError(f"{row_dir} holds results made with other settings ({settings_path}); use another --out "
                         "or delete that folder")
    (row_dir / "composites").mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=1))
    records_path = row_dir / "records.jsonl"
    records: dict[str, dict[str, Any]] = {}
    if records_path.is_file():
        for line in records_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                if (row_dir / "composites" / f"{rec['prompt']}.png").is_file():
                    records[rec["prompt"]] = rec
    todo = [p for p in prompts if p.name not in records]
    if len(todo) < len(prompts):
        log.info("%s: resuming, %d of %d prompts already done", name, len(prompts) - len(todo), len(prompts))
    with records_path.open("a", encoding="utf-8") as sink:
        for prompt in tqdm(todo, desc=ROWS[name][0], unit="prompt", disable=not config.progress):
            start = time.perf_counter()
            generator = torch.Generator(device="cpu").manual_seed(config.seed + prompt.index)
            composite, layers = split_output(method(prompt, generator), config.eval_size)
            seconds = time.perf_counter() - start
            rec = {"prompt": prompt.name, "key": prompt.key, "num_layers": prompt.num_layers, "seconds": seconds,
                   **score_sample(clip, prompt, composite, layers, config)}
            (row_dir / "composites" / f"{prompt.name}.png").write_bytes(encode_png(composite))
            if config.save_layers and layers is not None:
                save_output(row_dir / "layers" / prompt.name, layers, _output_meta(prompt, method, config),
                            overwrite=True)
            sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
            sink.flush()
            records[prompt.name] = rec
    return records


def _output_meta(prompt: Prompt, method: Any, config: EvalConfig) -> OutputMeta:
    s = method.settings()
    return OutputMeta(seed=config.seed + prompt.index, num_inference_steps=config.num_inference_steps,
                      guidance_scale=s["guidance_scale"], smg_scale=s.get("smg_scale"), guidance=s.get("guidance"),
                      model=s["model"], extra={"mlcid_key": prompt.key})


def score_sample(clip: ClipEmbedder, prompt: Prompt, composite: np.ndarray, layers: LayeredImage | None,
                 config: EvalConfig) -> dict[str, Any]:
    """CLIP score of the composite vs the global prompt; layer CLIP scores of each foreground vs its prompt."""
    images, texts = [composite], [prompt.global_prompt]
    if layers is not None:
        for i in range(1, layers.num_layers):
            images.append(layer_on_fill(layers.images[i], layers.masks[i], config.layer_fill))
            texts.append(prompt.layer_prompts[i])
    scores = clip_score(clip.images(images), clip.texts(texts)).tolist()
    return {"cs": scores[0], "layer_cs": scores[1:] if layers is not None else None}


def score_real(prompts: Sequence[Prompt], config: EvalConfig, clip: ClipEmbedder) -> dict[str, dict[str, Any]]:
    """The same CLIP scores for the real MLCID samples behind the prompts (a reference row)."""
    by_key = {p.key: p for p in prompts}
    records: dict[str, dict[str, Any]] = {}
    for sample in MLCIDReader(config.data, rank=0, world_size=1):
        prompt = by_key.get(sample.key)
        if prompt is None or prompt.name in records:
            continue
        composite = resize_rgb(sample.composite, config.eval_size)
        records[prompt.name] = {"prompt": prompt.name, "num_layers": prompt.num_layers,
                                **score_sample(clip, prompt, composite, LayeredImage.from_sample(sample), config)}
        if len(records) == len(prompts):
            break
    return records


def clip_identity(config: EvalConfig) -> str:
    from mlcid import registry

    return registry.resolve("clip-rn50", config.preset, config.clip_model)


def summarize(records: dict[str, dict[str, Any]], composites: Path | None, features: FidFeatures | None,
              reference: dict[str, FeatureStats] | None, config: EvalConfig) -> dict[str, dict[str, Any]]:
    """Per group: N, FID (when composites and reference are given), mean CLIP score, mean layer CLIP score."""
    out: dict[str, dict[str, Any]] = {}
    for group in config.groups:
        recs = [r for r in records.values() if group == ALL or str(r["num_layers"]) == group]
        layer_scores = [s for r in recs for s in (r.get("layer_cs") or [])]
        entry: dict[str, Any] = {"n": len(recs), "cs": float(np.mean([r["cs"] for r in recs])) if recs else None,
                                 "layer_cs": float(np.mean(layer_scores)) if layer_scores else None, "fid": None}
        if composites is not None and features is not None and reference is not None and len(recs) >= 2:
            images = [decode_rgb((composites / f"{r['prompt']}.png").read_bytes()) for r in recs]
            entry["fid"] = frechet_distance_stats(FeatureStats.from_features(features(images)), reference[group])
        out[group] = entry
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def metrics_markdown(result: dict[str, Any]) -> str:
    """Table 1's layout: one row per method; FID, Layer CS, CS per layer count (and over all prompts)."""
    groups = result["groups"]
    titles = {g: ("All" if g == ALL else f"{g} layers") for g in groups}
    head = "| Method | " + " | ".join(f"{titles[g]} FID | {titles[g]} Layer CS | {titles[g]} CS" for g in groups) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(groups))]
    for name, row in result["rows"].items():
        cells = [f"{_fmt(row['groups'][g]['fid'])} | {_fmt(row['groups'][g]['layer_cs'])} | "
                 f"{_fmt(row['groups'][g]['cs'])}" for g in groups]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    c = result["config"]
    notes = [
        "", f"Prompts per layer count: {c['per_group']} (from {len(result['shards'])} MLCID shard(s)); reference "
        f"composites per group: " + ", ".join(f"{g}: {n}" for g, n in result["reference_counts"].items()) + ".",
        f"DDIM {c['num_inference_steps']} steps, CFG {c['guidance_scale']}, SMG {c['smg_scale']}, SD CFG "
        f"{c['sd_guidance_scale']}; images compared at {c['eval_size']}²; FID extractor "
        f"`{result['fid_extractor']}`, CLIP `{result['clip_model']}`. CS = 100·max(cos, 0); Layer CS: each "
        f"foreground over a neutral fill outside its mask vs its layer prompt. All: every prompt above against all "
        f"real composites.",
    ]
    if c["preset"] == "tiny":
        notes.append("**Preset tiny: random-weight models; these numbers test the plumbing, not the method.**")
    return "\n".join(lines + notes) + "\n"


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run the whole evaluation; writes OUT/metrics.json and OUT/metrics.md and returns the metrics document."""
    from model.loading import load_clip_scorer, load_fid_extractor
    from model.sampling.pipeline import LayerDiffPipeline

    start = time.perf_counter()
    out = Path(config.out)
    # 1. Check every input and load every model first: missing weights fail before any work is done.
    urls = expand_urls(config.data)
    if any(r.startswith("layerdiff") for r in config.rows):
        LayerDiffPipeline.check_run_folder(config.model)
    fid_spec = load_fid_extractor(config.preset, config.fid_weights)
    clip = ClipEmbedder(load_clip_scorer(config.preset, config.clip_model, device=config.device),
                        config.device, config.batch_size)
    features = FidFeatures(fid_spec, config.device, config.batch_size)
    methods: dict[str, Any] = {}
    shared = None  # the LayerDiff rows share one pipeline
    for name in config.rows:
        methods[name] = ROWS[name][1](config, shared)
        shared = getattr(methods[name], "pipe", None) if isinstance(methods[name], LayerDiffMethod) else shared
    # 2. Prompts, and the reference statistics of the real composites (cached under OUT/cache).
    prompts = collect_prompts(config)
    log.info("%d prompts: %s", len(prompts),
             ", ".join(f"{n} layers: {sum(p.num_layers == n for p in prompts)}" for n in config.layer_counts))
    reference = reference_stats(urls, features, out / "cache", config.eval_size, config.groups,
                                config.max_reference, config.progress)
    # 3. Generate and CLIP-score each method on the same prompts and seeds.
    rows: dict[str, Any] = {}
    for name, method in methods.items():
        t0 = time.perf_counter()
        records = generate_row(name, method, prompts, config, clip)
        records = {p.name: records[p.name] for p in prompts}
        rows[name] = {"label": ROWS[name][0], "settings": method.settings(),
                      "seconds_per_prompt": float(np.mean([r["seconds"] for r in records.values()])),
                      "groups": summarize(records, out / "rows" / name / "composites", features, reference, config)}
        log.info("%s done in %.1f s", ROWS[name][0], time.perf_counter() - t0)
    rows["real"] = {"label": "MLCID (real composites)", "settings": {},
                    "groups": summarize(score_real(prompts, config, clip), None, None, None, config)}
    # 4. Write metrics.json and metrics.md.
    result = {"config": asdict(config), "shards": urls, "groups": config.groups, "rows": rows,
              "reference_counts": {g: s.count for g, s in reference.items()},
              "fid_extractor": fid_spec.name, "clip_model": clip_identity(config),
              "seconds": round(time.perf_counter() - start, 2)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "metrics.md").write_text(metrics_markdown(result), encoding="utf-8")
    log.info("wrote %s and %s (%.1f s)", out / "metrics.json", out / "metrics.md", result["seconds"])
    return result
