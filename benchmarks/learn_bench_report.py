"""learn-bench's report stage: pixel scores of every condition, a Fréchet distance on features of a classifier of
the synthetic ground truth, the SMG scale sweep, and the files (results.md / .json, the issue-shaped
learn_bench_results.json, grid.png). Never sees the model: it reads the saved samples and the ground truth."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.learn_bench_config import (
    EXTRA_CONDITIONS, GROUPS, MAIN_CONDITIONS, SMG_VARIANTS, VAE_ROUNDTRIP, BenchConfig, test_scenes,
)
from model.evaluation.layer_fidelity import (
    LayerLabels, SceneFeatures, ShapeClassifier, frechet_feature_distance, scene_attributes, score_sample, summarize,
)
from model.sampling.guidance import SMGConfig

MEASURES = ("colour_acc", "shape_acc", "both_acc", "background_acc")  # higher is better; FID: lower


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


def fit_scene_features(cfg: BenchConfig, out: Path) -> tuple[SceneFeatures, np.ndarray, dict[str, float]]:
    """The FID feature MLP, fit on training composites; the reference composites (fresh ground-truth scenes of
    every group, past the test prompts' indices); the MLP's label accuracy on the test ground truth."""
    from mlcid.reader import MLCIDReader

    images, labels = [], []
    for n, sample in enumerate(MLCIDReader(str(out / "data" / "mlcid"))):
        if n >= cfg.fid_fit_samples:
            break
        images.append(sample.composite)
        labels.append(scene_attributes(sample.source))
    features = SceneFeatures(seed=cfg.seed).fit(np.stack(images), labels)
    reference = np.stack([s.composite for g in GROUPS
                          for s in test_scenes(cfg, g, cfg.fid_reference_per_group, start=cfg.per_group)])
    test = [s for g in GROUPS for s in test_scenes(cfg, g)]
    acc = features.label_accuracy(np.stack([s.composite for s in test]), [scene_attributes(s.source) for s in test])
    return features, reference, {"label_accuracy": acc, "fit_samples": len(images), "reference": len(reference)}


def _load(out: Path, cfg: BenchConfig, condition: str, group: str) -> dict[str, np.ndarray]:
    source, n = (VAE_ROUNDTRIP, cfg.per_group) if condition == VAE_ROUNDTRIP else cfg.sample_source(condition)
    with np.load(out / "samples" / source / f"{group}.npz") as data:
        return {k: data[k][:n] for k in ("images", "masks", "composites")}


def score_all(cfg: BenchConfig, out: Path, clf: ShapeClassifier, features: SceneFeatures,
              reference: np.ndarray) -> dict[str, dict[str, Any]]:
    """{condition: {group: summary, "all": {"fid": …}}} plus "ground-truth" (the test scenes' true layers; its FID
    is the floor at that sample count) and "ground-truth@n" for the sweep's smaller sample count."""
    conditions = cfg.conditions()
    counts = sorted({spec.per_group for spec in conditions.values()})
    table: dict[str, dict[str, Any]] = {}
    for n in counts:
        name = "ground-truth" if n == cfg.per_group else f"ground-truth@{n}"
        rows, composites = {}, []
        for group in GROUPS:
            scenes = test_scenes(cfg, group, n)
            gt = []
            for s in scenes:
                imgs = np.stack([s.background] + [fg[..., :3] for fg in s.foregrounds])
                msk = np.stack([np.where(np.any(np.stack(s.masks) > 127, 0), 0, 255).astype(np.uint8)]
                               + list(s.masks))
                gt.append(score_sample(imgs, msk, s.composite, LayerLabels.from_source(s.source), clf))
                composites.append(s.composite)
            rows[group] = summarize(gt)
        rows["all"] = {"fid": frechet_feature_distance(features, np.stack(composites), reference)}
        table[name] = rows
    counts_of = {c: spec.per_group for c, spec in conditions.items()}
    if (out / "samples" / VAE_ROUNDTRIP).is_dir():  # the VAE's ceiling (older work folders lack it)
        counts_of = {VAE_ROUNDTRIP: cfg.per_group, **counts_of}
    for condition, count in counts_of.items():
        rows, composites = {}, []
        for group in GROUPS:
            labels = [LayerLabels.from_source(s.source) for s in test_scenes(cfg, group, count)]
            data = _load(out, cfg, condition, group)
            rows[group] = summarize([score_sample(data["images"][i], data["masks"][i], data["composites"][i], lab, clf)
                                     for i, lab in enumerate(labels)])
            composites.append(data["composites"])
        rows["all"] = {"fid": frechet_feature_distance(features, np.concatenate(composites), reference)}
        table[condition] = rows
    return table


def _key(group: str) -> str:
    return group.lower().replace("-", "_")  # "seen-2L" → "seen_2l"


def machine_results(cfg: BenchConfig, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue-11 shape: {"conditions": {name: {group: {"colour", "shape", "both", "background"}}},
    "background_colour": {name: x}, "fid": {name: x}, "sweep": {variant: {scale: {...}}}}; "cfg+smg" = the default
    variant at the paper's scale; the sweep's scale 0 is CFG on the same prompts."""
    def cond_entry(rows: dict[str, Any]) -> dict[str, Any]:
        return {_key(g): {"colour": rows[g]["colour_acc"], "shape": rows[g]["shape_acc"],
                          "both": rows[g]["both_acc"], "background": rows[g]["background_acc"]} for g in GROUPS}

    def background(rows: dict[str, Any]) -> float:  # over all test samples of the condition
        return float(np.average([rows[g]["background_acc"] for g in GROUPS], weights=[rows[g]["n"] for g in GROUPS]))

    names = [c for c in table if not c.startswith("ground-truth")]
    shown = (VAE_ROUNDTRIP, *MAIN_CONDITIONS, *EXTRA_CONDITIONS)
    result: dict[str, Any] = {
        "conditions": {c: cond_entry(table[c]) for c in names if c in shown},
        "background_colour": {c: background(table[c]) for c in names if c in shown},
        "fid": {c: table[c]["all"]["fid"] for c in table if not c.startswith("smg-")},
        "sweep": {}, "smg_variants": {v: dataclasses.asdict(SMG_VARIANTS[v]) for v in cfg.sweep_variants},
        "default_smg": dataclasses.asdict(SMG_VARIANTS["default"]), "per_group": cfg.per_group,
        "sweep_per_group": cfg.sweep_per_group,
    }
    at = f"{cfg.smg_scale:g}"
    for variant in cfg.sweep_variants:  # the other variants at the paper's scale, on the sweep's prompts
        name = f"smg-{variant}@{at}"
        if variant != "default" and name in table:
            result["conditions"][f"cfg+smg-{variant}"] = cond_entry(table[name])
            result["background_colour"][f"cfg+smg-{variant}"] = background(table[name])
            result["fid"][f"cfg+smg-{variant}"] = table[name]["all"]["fid"]
    for variant in cfg.sweep_variants:
        points = {"0": {**_mean_over_groups(table["cfg@sweep"]), "fid": table["cfg@sweep"]["all"]["fid"]}}
        for scale in cfg.sweep_scales:
            name = f"smg-{variant}@{scale:g}"
            points[f"{scale:g}"] = {**_mean_over_groups(table[name]), "fid": table[name]["all"]["fid"]}
        result["sweep"][variant] = points
    return result


def _mean_over_groups(rows: dict[str, Any]) -> dict[str, float]:
    """Layer-weighted colour/shape/both and sample-weighted background accuracy over the four groups."""
    layers, samples = [rows[g]["layers"] for g in GROUPS], [rows[g]["n"] for g in GROUPS]
    out = {m.replace("_acc", ""): float(np.average([rows[g][m] for g in GROUPS], weights=layers))
           for m in ("colour_acc", "shape_acc", "both_acc")}
    out["background"] = float(np.average([rows[g]["background_acc"] for g in GROUPS], weights=samples))
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write .tmp → rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def write_grid(cfg: BenchConfig, out: Path, path: Path, scale: int = 2) -> None:
    """PNG rows: per test prompt (seen then held-out), ground truth composite + layers, then each condition's
    composite and layers (foregrounds shown inside their masks on grey)."""
    from PIL import Image, ImageDraw

    s, L = cfg.size * scale, 3
    shown = ("step0-cfg", "cfg", "cfg+smg")
    rows = []
    for group in ("seen-2L", "seen-3L", "heldout-2L", "heldout-3L"):
        scenes = test_scenes(cfg, group)[: max(1, cfg.grid_rows // 4)]
        data = {c: _load(out, cfg, c, group) for c in shown}
        for i, scene in enumerate(scenes):
            tiles = [scene.composite, scene.background] + [np.where(fg[..., 3:] > 127, fg[..., :3], 128)
                                                            for fg in scene.foregrounds]
            tiles += [np.full_like(scene.composite, 255)] * (1 + L - len(tiles))
            for k, (c, d) in enumerate(data.items()):
                imgs, msk = d["images"][i], d["masks"][i]
                tiles += [d["composites"][i], imgs[0]] + [np.where(msk[j][..., None] > 127, imgs[j], 128)
                                                          for j in range(1, len(imgs))]
                tiles += [np.full_like(scene.composite, 255)] * ((1 + L) * (2 + k) - len(tiles))
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


def _blur_text(smg: SMGConfig, latent: int) -> str:
    """"kernel 9 / σ 0.75" — the Gaussian SMG applies at this latent side."""
    kernel, sigma = smg.blur_at((latent, latent))
    return f"kernel {kernel} / σ {sigma:g}"


def write_markdown(cfg: BenchConfig, results: dict[str, Any]) -> str:
    """The results table (main conditions × group), FID, the SMG sweep and the stage notes, as markdown."""
    table, st = results["table"], results["stages"]
    cols = ("colour_acc", "shape_acc", "both_acc", "nonempty", "disjoint", "background_acc", "composite_mae")
    lines = ["| condition | group | n layers | colour acc | shape acc | colour+shape | non-empty | disjoint | "
             "background acc | composite MAE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for condition in ("ground-truth", *(c for c in (VAE_ROUNDTRIP, *MAIN_CONDITIONS, *EXTRA_CONDITIONS)
                                        if c in table)):
        for group in GROUPS:
            r = table[condition][group]
            vals = " | ".join(f"{r[c]:.2f}" if c != "composite_mae" else f"{r[c]:.1f}" for c in cols)
            lines.append(f"| {condition} | {group} | {r['layers']} | {vals} |")
    fid_columns = ["ground-truth", *MAIN_CONDITIONS, *(c for c in EXTRA_CONDITIONS if c in table)]
    lines += ["", f"Fréchet distance on scene features (composites, all groups, {4 * cfg.per_group} samples vs "
              f"{4 * cfg.fid_reference_per_group} fresh ground-truth scenes; lower is better):", "",
              "| " + " | ".join(fid_columns) + " |", "|---" * len(fid_columns) + "|",
              "| " + " | ".join(f"{table[c]['all']['fid']:.2f}" for c in fid_columns) + " |"]
    sweep = results["machine"]["sweep"]
    if sweep:
        n = cfg.sweep_per_group
        floor = table.get(f"ground-truth@{n}", table["ground-truth"])["all"]["fid"]
        lines += ["", f"SMG scale sweep ({n} prompts per group = {4 * n} samples, the first test prompts with the "
                  f"same seeds; scale 0 = CFG alone; ground-truth FID at this count {floor:.2f}). "
                  "colour / shape / background accuracy, FID:", "",
                  "| variant | " + " | ".join(f"s = {k}" for k in next(iter(sweep.values()))) + " |",
                  "|---" * (1 + len(next(iter(sweep.values())))) + "|"]
        for variant, points in sweep.items():
            cells = [f"{p['colour']:.2f} / {p['shape']:.2f} / {p['background']:.2f}, {p['fid']:.2f}"
                     for p in points.values()]
            lines.append(f"| {variant} (`{SMG_VARIANTS[variant].name}`) | " + " | ".join(cells) + " |")
    seen = table["cfg"]["seen-2L"]
    goal = seen["colour_acc"] >= 0.8 and seen["shape_acc"] >= 0.6
    text = st.get("text", {})
    notes = [
        "", f"Data: {st['data']['samples']} training scenes at {cfg.size}² (layer counts {st['data']['layer_counts']}),"
        f" held-out pairs {', '.join(':'.join(p) for p in cfg.holdout_pairs)}; backgrounds "
        f"{'/'.join(cfg.background_patterns)}, object textures {'/'.join(cfg.object_patterns)}; "
        f"{cfg.per_group} test prompts per group.",
        f"VAE ({st['vae']['params_m']:.2f}M params, {st['vae']['steps']} steps, {st['vae']['train_seconds']:.0f} s): "
        f"held-out image MSE {st['vae']['image_mse']:.4f} (PSNR {st['vae']['image_psnr_db']:.1f} dB), mask IoU "
        f"{st['vae']['mask_iou']:.3f}, flat-colour error "
        + (f"{st['vae']['flat_colour_error']:.1f} / 255 " if "flat_colour_error" in st["vae"]
           else "not measured (a VAE stage from before the measure) ")
        + f"(groups of {min(cfg.vae.block_out_channels) // cfg.vae.norm_num_groups}+ channels), scaling factor "
        f"{st['vae']['scaling_factor']:.3f}. `vae-roundtrip` = the test scenes' true layers through this VAE alone: "
        "the most any sampled model can score.",
        f"Text encoder {st['sd']['text_params_m']:.1f}M params, frozen for LayerDiff; "
        + (f"caption pre-training {text['steps']} steps ({text['train_seconds']:.0f} s), " if "steps" in text else
           "random (no caption pre-training), ")
        + f"background-colour linear probe on the test captions {text.get('background_probe_random', float('nan')):.2f}"
        f" random → {text.get('background_probe', float('nan')):.2f}.",
        f"LayerDiff UNet {st['sd']['unet_params_m']:.1f}M params (SD UNet before the layer blocks); "
        f"{st['train']['steps']} steps in {st['train']['seconds']:.0f} s, loss {st['train']['loss_first']:.3f} → "
        f"{st['train']['loss_last']:.3f}.",
        "Shape classifier accuracy on ground-truth test masks: "
        + ", ".join(f"{g} {a:.2f}" for g, a in results["classifier_acc"].items()) + "; scene-feature MLP label "
        f"accuracy on the test ground truth {results['features']['label_accuracy']:.3f}.",
        f"Sampling: DDIM {cfg.sample_steps} steps, CFG scale {cfg.guidance_scale} (paper negatives); `cfg+smg` = "
        f"the default SMG variant `{SMG_VARIANTS['default'].name}` at scale {cfg.smg_scale} (paper), blur "
        f"{_blur_text(SMG_VARIANTS['default'], cfg.size // 8)} on {cfg.size // 8}² latents; "
        "`shuffled-cfg` rolls the layer prompts one layer up and is scored against the true ones.",
        f"Chance: colour 1/{len(cfg.colours)}, shape 1/{len(cfg.shapes)}, background 1/{len(cfg.background_colours)}."
        " Composite MAE is 0 by construction (Eq. 4 in the pipeline); it checks the output plumbing.",
        f"Goal (seen 2-layer, trained CFG: colour ≥ 0.8, shape ≥ 0.6): {'reached' if goal else 'NOT reached'}.",
    ]
    return "\n".join(lines + notes) + "\n"


def stage_report(cfg: BenchConfig, out: Path, stages: dict[str, Any]) -> dict[str, Any]:
    """Score everything; write OUT/results.json, results.md, learn_bench_results.json (and a copy at
    `cfg.results_json` when set), grid.png."""
    clf, acc = fit_shape_classifier(cfg, out)
    features, reference, feature_info = fit_scene_features(cfg, out)
    table = score_all(cfg, out, clf, features, reference)
    machine = machine_results(cfg, table)
    results = {"table": table, "classifier_acc": acc, "features": feature_info, "machine": machine,
               "stages": stages, "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}
    write_json(out / "results.json", results)
    write_json(out / "learn_bench_results.json", machine)
    if cfg.results_json:
        write_json(Path(cfg.results_json), machine)
    (out / "results.md").write_text(write_markdown(cfg, results))
    write_grid(cfg, out, out / "grid.png")
    return {"results": str(out / "results.md"), "grid": str(out / "grid.png")}
