"""Ship a trained learn-bench LayerDiff in the repository: a normal pipeline folder, float16 weights, a model card
with how it was trained, what it can draw, its metrics and a sha256 table of every other file.

    ship_learn_bench(".work/learn-bench", "model/pretrained/shapes64")   # `layerdiff ship-model`
    verify_checksums("model/pretrained/shapes64")                        # [] when every file matches the card

Deterministic: the same work folder gives byte-identical files (tensors sorted by name, fixed safetensors metadata,
JSON configs re-dumped with sorted keys and without the machine-specific `_name_or_path`, no dates, paths in the
card relative to the work folder). Weights are stored as float16; the configs keep `float32`, so
`LayerDiffPipeline.from_pretrained(folder)` gives float32 modules on CPU (the fp16 values, exactly widened).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.hub import CARD_FILE, ENTRY_FILE, ENTRY_SOURCE, INDEX_FILE, PIPELINE_PARTS, ModelCardInfo, card_metadata

MAX_BYTES = 10_000_000  # the whole folder, card included (issue 15: never over 10 MB)
STORED_DTYPE = "float16"
SAFETENSORS_METADATA = {"format": "pt"}
DROPPED_CONFIG_KEYS = ("_name_or_path",)  # where the weights were loaded from: a path on the training machine
CHECKSUM_ROW = re.compile(r"^\| `(?P<path>[^`]+)` \| (?P<size>\d+) \| `(?P<sha>[0-9a-f]{64})` \|$")
VOCABULARY_KEYS = ("colours", "shapes", "background_colours", "background_patterns", "object_patterns",
                   "holdout_pairs")
SHIPPED_GROUPS = ("seen_2l", "heldout_2l", "seen_3l", "heldout_3l")
SHIPPED_CONDITIONS = ("cfg", "cfg+smg")  # metrics the card states (results.json "machine" → conditions)


# ------------------------------------------------------------------------------------------------ file contents


def fp16_safetensors(path: Path) -> bytes:
    """A safetensors file with every floating tensor cast to float16 (others kept), fixed metadata."""
    import torch
    from safetensors.torch import load_file, save

    state = load_file(str(path))
    out = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sorted(state.items())}
    return save(out, metadata=dict(SAFETENSORS_METADATA))


def _drop_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_keys(v) for k, v in value.items() if k not in DROPPED_CONFIG_KEYS}
    if isinstance(value, list):
        return [_drop_keys(v) for v in value]
    return value


def clean_json(data: bytes) -> bytes:
    """A config re-dumped deterministically: sorted keys, 2-space indent, no `_name_or_path`."""
    return (json.dumps(_drop_keys(json.loads(data)), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def pipeline_files(run: Path) -> dict[str, bytes]:
    """Relative path → bytes of the shipped pipeline parts of a run folder (weights as float16), sorted."""
    from model.loading import check_run_folder

    check_run_folder(run)
    files: dict[str, bytes] = {INDEX_FILE: clean_json((run / INDEX_FILE).read_bytes())}
    files[ENTRY_FILE] = ENTRY_SOURCE.encode()
    for part in PIPELINE_PARTS:
        for path in sorted((run / part).iterdir()):
            if not path.is_file():
                continue
            name = f"{part}/{path.name}"
            if path.suffix == ".safetensors":
                files[name] = fp16_safetensors(path)
            elif path.suffix == ".json":
                files[name] = clean_json(path.read_bytes())
            elif path.suffix in (".txt",):
                files[name] = path.read_bytes()
            else:
                raise ValueError(f"{path}: unexpected file in a pipeline part (want .safetensors, .json, .txt); "
                                 "only safetensors weights are shipped")
    return dict(sorted(files.items()))


def parameter_counts(files: dict[str, bytes]) -> dict[str, int]:
    """Parameters per pipeline part, from the shipped safetensors."""
    from safetensors.torch import load

    counts: dict[str, int] = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            part = name.split("/")[0]
            counts[part] = counts.get(part, 0) + sum(t.numel() for t in load(data).values())
    return counts


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ learn-bench facts


@dataclass
class BenchFacts:
    """What the card says about a learn-bench work folder (all read from its JSON/YAML records)."""

    bench_config: dict[str, Any]  # BenchConfig as recorded (results.json "config", else the shards' scene config)
    train_config: dict[str, Any]  # the trainer's config.yaml (paths relative to the work folder)
    train: dict[str, Any]  # train.done.json: steps, losses, the trainer command
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # data / vae / text / sd done records
    machine: dict[str, Any] | None = None  # results.json "machine" (issue-11 metrics), when the report ran
    command: str | None = None  # the learn-bench command that trained it (default: `--out OUT --train-steps N`)

    def bench_command(self) -> str:
        return self.command or f"layerdiff learn-bench --out OUT --train-steps {self.train['steps']}"

    def vocabulary(self) -> dict[str, list]:
        return {k: self.bench_config[k] for k in VOCABULARY_KEYS if k in self.bench_config}


def _relative(value: Any, bench: Path) -> Any:
    """Paths under the work folder as `OUT/…`, under this repository as `./…` (the card holds no machine paths)."""
    if isinstance(value, dict):
        return {k: _relative(v, bench) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, bench) for v in value]
    if isinstance(value, str):
        repo = Path(__file__).resolve().parents[1]
        spellings = {str(bench), os.path.relpath(bench), os.path.relpath(bench, repo)}  # as the command was typed
        for spelling in sorted(spellings, key=len, reverse=True):
            value = re.sub(rf"(?<![\w./]){re.escape(spelling)}(?=/|$|\s)", "OUT", value)
        value = value.replace(str(repo) + os.sep, "./")
        return re.sub(r"(?<![\w.])/[^\s'\"]*/(?=model/configs/)", "./", value)  # a config of another checkout
    return value


def _scene_config_from_shards(bench: Path) -> dict[str, Any]:
    from mlcid.reader import MLCIDReader

    for sample in MLCIDReader(str(bench / "data" / "mlcid")):
        config = dict(sample.pipeline.get("config") or {})
        return config | {"seed": sample.source.get("seed")}
    raise ValueError(f"{bench / 'data' / 'mlcid'} holds no samples")


def learn_bench_facts(bench: str | os.PathLike, command: str | None = None) -> BenchFacts:
    """Read a learn-bench work folder: it must hold a finished `train` stage (OUT/train.done.json, OUT/run).
    `command`: how learn-bench was run, for the card (its work folder written as OUT)."""
    bench = Path(bench).resolve()
    done = bench / "train.done.json"
    if not done.is_file():
        raise ValueError(f"{bench} is not a finished learn-bench work folder: train.done.json is missing "
                         "(run `layerdiff learn-bench --out DIR` until its train stage is done)")
    results_file = bench / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    config = results.get("config") or _scene_config_from_shards(bench)
    stages = {s: json.loads((bench / f"{s}.done.json").read_text())
              for s in ("data", "vae", "text", "sd") if (bench / f"{s}.done.json").is_file()}
    config_file = bench / "run" / "config.yaml"  # the trainer's config (absent: the card leaves it out)
    train_config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return BenchFacts(bench_config=_relative(config, bench), train_config=_relative(train_config, bench),
                      train=_relative(json.loads(done.read_text()), bench), stages=_relative(stages, bench),
                      machine=results.get("machine"), command=_relative(command, bench) if command else None)


# ------------------------------------------------------------------------------------------------ the card


def card_front_matter(facts: BenchFacts) -> dict[str, Any]:
    """hub.py's front matter (library, tags, data, steps, size, metrics) plus the drawable vocabulary."""
    cfg, data = facts.train_config, facts.train_config.get("data", {})
    samples = facts.stages.get("data", {}).get("samples", facts.bench_config.get("train_samples"))
    info = ModelCardInfo(
        training_data=[f"synthetic MLCID shapes (mlcid.synthetic): {samples} scenes, seed {facts.bench_config.get('seed')}"],
        steps=int(facts.train["steps"]), resolution=int(data.get("resolution", facts.bench_config.get("size", 64))),
        max_layers=int(data["max_layers"]) if "max_layers" in data else None,
        batch_size=int(cfg["batch_size"]) * int(cfg.get("grad_accum", 1)) if "batch_size" in cfg else None,
        metrics=_flat_metrics(facts.machine), extra_tags=["synthetic-shapes", "learn-bench"])
    return card_metadata(info) | {"weights_dtype": STORED_DTYPE, "vocabulary": facts.vocabulary()}


def _flat_metrics(machine: dict[str, Any] | None) -> dict[str, float]:
    if not machine:
        return {}
    out = {}
    for cond in SHIPPED_CONDITIONS:
        for group, row in machine.get("conditions", {}).get(cond, {}).items():
            for key in ("colour", "shape", "both"):
                out[f"{cond}/{group}/{key}"] = round(float(row[key]), 4)
    for cond in SHIPPED_CONDITIONS:
        if cond in machine.get("background_colour", {}):
            out[f"{cond}/background"] = round(float(machine["background_colour"][cond]), 4)
        if cond in machine.get("fid", {}):
            out[f"{cond}/fid"] = round(float(machine["fid"][cond]), 4)
    return out


def _metrics_table(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "Not measured: the work folder has no results.json (run learn-bench's sample and report stages).\n"
    lines = ["Layer fidelity on fresh test prompts (`model.evaluation.layer_fidelity`: colour and shape of each "
             "foreground layer inside its mask, and the background layer's colour; chance is 1/4 colour, 1/3 shape, "
             "1/4 background):", "",
             "| condition | group | colour | shape | both | background |", "|---|---|---|---|---|---|"]
    for cond in SHIPPED_CONDITIONS:
        for group in SHIPPED_GROUPS:
            row = machine.get("conditions", {}).get(cond, {}).get(group)
            if row:
                lines.append(f"| {cond} | {group} | {row['colour']:.2f} | {row['shape']:.2f} | {row['both']:.2f} "
                             f"| {row.get('background', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def model_card(facts: BenchFacts, files: dict[str, bytes]) -> str:
    """README.md: front matter, what it draws, how to use it, how it was trained, metrics, checksums."""
    front = yaml.safe_dump(card_front_matter(facts), sort_keys=False, allow_unicode=True)
    voc, params = facts.vocabulary(), parameter_counts(files)
    cfg = facts.bench_config
    held = ", ".join(f"{c} {s}" for c, s in voc.get("holdout_pairs", [])) or "none"
    size = sum(len(b) for b in files.values())
    sizes = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sorted(params.items()))
    checks = "\n".join(f"| `{name}` | {len(data)} | `{sha256(data)}` |" for name, data in files.items())
    resolution = card_front_matter(facts)["training_resolution"]
    samples = facts.stages.get("data", {}).get("samples", cfg.get("train_samples"))
    return f"""---
{front}---

# LayerDiff shapes{resolution}: a small trained layered-image model

A LayerDiff pipeline trained from scratch by this repository's `make learn-bench` on synthetic scenes of one or two
coloured shapes on a patterned background. It draws a background layer and one or two foreground layers, each an
RGB image with a mask and its own prompt, at {resolution}×{resolution} px. It knows nothing outside these words.

## What it can draw

- object colours: {", ".join(voc.get("colours", []))}
- object shapes: {", ".join(voc.get("shapes", []))}
- background colours: {", ".join(voc.get("background_colours", []))}
- background patterns: {", ".join(voc.get("background_patterns", []))} (named in the caption, e.g. "a striped cyan")
- object textures (never named in prompts): {", ".join(voc.get("object_patterns", []))}
- (colour, shape) pairs never seen in training (held out to test composition): {held}

Prompts look like its training captions (`mlcid.synthetic`): global "a red circle in front of a blue square on a
striped cyan background", layers "the background", "a blue square", "a red circle" (back to front).

```python
from model.pretrained import SHAPES64
from model.sampling.pipeline import LayerDiffPipeline
pipe = LayerDiffPipeline.from_pretrained(SHAPES64)  # float32 modules on CPU
out = pipe("a red circle on a plain cyan background", ["the background", "a red circle"], num_inference_steps=20)
out.save("out/red-circle")  # layerNN.png (RGBA), maskNN.png, composite.png, layers.json, layers.psd, layers.ora
```

## How it was trained

    {facts.bench_command()}   # with the configuration recorded below

(the stages data → vae → text → sd → train of `benchmarks/learn_bench.py`; its trainer stage ran
`python {facts.train.get("command", "")}`). Seed {cfg.get("seed")}; {samples} training scenes at
{cfg.get("size")} px; {facts.train["steps"]} optimiser steps (loss {facts.train.get("loss_first", float("nan")):.4f} →
{facts.train.get("loss_last", float("nan")):.4f}); parameters: {sizes}. Weights stored as {STORED_DTYPE}
({size} bytes for the folder without this card); loading widens them to float32.

<details><summary>learn-bench configuration (BenchConfig from OUT/results.json, else the shards' scene config)</summary>

```yaml
{yaml.safe_dump(cfg, sort_keys=True, allow_unicode=True).rstrip()}
```
</details>

<details><summary>trainer configuration (OUT/run/config.yaml)</summary>

```yaml
{yaml.safe_dump(facts.train_config, sort_keys=True, allow_unicode=True).rstrip()}
```
</details>

## Metrics

{_metrics_table(facts.machine)}
## Files

sha256 of every file in this folder except this card (`model.ship.verify_checksums` and
`tests/model/test_shipped_model.py` check them):

| file | bytes | sha256 |
|---|---|---|
{checks}
"""


# ------------------------------------------------------------------------------------------------ export + check


def ship_learn_bench(bench: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                     max_bytes: int = MAX_BYTES, command: str | None = None) -> Path:
    """Write the learn-bench work folder's trained pipeline (OUT/run) as a shippable folder `out`; returns it.

    Refuses (ValueError) before writing anything when the folder would exceed `max_bytes`; `out` appears by
    rename (written beside it first); an existing `out` is an error unless `overwrite`."""
    # 1. Facts and file contents, all in memory.
    facts = learn_bench_facts(bench, command)
    files = pipeline_files(Path(bench).resolve() / "run")
    card = model_card(facts, files).encode()
    total = len(card) + sum(len(b) for b in files.values())
    if total > max_bytes:
        biggest = max(files, key=lambda k: len(files[k]))
        raise ValueError(f"the shipped folder would be {total / 1e6:.2f} MB, over the {max_bytes / 1e6:.2f} MB "
                         f"limit (largest file {biggest}: {len(files[biggest]) / 1e6:.2f} MB); train a smaller "
                         "model (BenchConfig unet_channels / vae block_out_channels)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    # 2. Write beside the target, then swap into place.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, data in {**files, CARD_FILE: card}.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_card(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[int, str]]]:
    """The card's front matter and its checksum table {path: (bytes, sha256)}."""
    text = (Path(folder) / CARD_FILE).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{folder}/{CARD_FILE} has no YAML front matter")
    front = yaml.safe_load(text.split("---\n", 2)[1])
    table = {}
    for line in text.splitlines():
        m = CHECKSUM_ROW.match(line)
        if m:
            table[m["path"]] = (int(m["size"]), m["sha"])
    return front, table


def verify_checksums(folder: str | os.PathLike) -> list[str]:
    """Problems with a shipped folder's files against its card (empty list: all match, none missing or extra)."""
    root = Path(folder)
    if not (root / CARD_FILE).is_file():
        return [f"{root}/{CARD_FILE} is missing"]
    _, table = read_card(root)
    if not table:
        return [f"{root}/{CARD_FILE} has no checksum table"]
    present = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    problems = [f"{name}: not in the card's checksum table" for name in present
                if name != CARD_FILE and name not in table and "__pycache__" not in name]
    for name, (size, digest) in table.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: listed in the card but missing")
            continue
        data = path.read_bytes()
        if len(data) != size or sha256(data) != digest:
            problems.append(f"{name}: sha256 {sha256(data)[:12]}… ({len(data)} bytes), card says {digest[:12]}… "
                            f"({size} bytes)")
    return problems


def card_vocabulary(folder: str | os.PathLike) -> dict[str, list]:
    """What a shipped model can draw (the card's `vocabulary`); {} when the card has none."""
    try:
        front, _ = read_card(folder)
    except (FileNotFoundError, ValueError):
        return {}
    return dict(front.get("vocabulary") or {})


__all__ = ["MAX_BYTES", "ship_learn_bench", "verify_checksums", "read_card", "card_vocabulary",
           "learn_bench_facts", "pipeline_files"]
