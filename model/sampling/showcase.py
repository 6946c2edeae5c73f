"""What a trained model does, shown: layered samples, then layer inpainting, style transfer and iterative layer
adding on each, exported (PNG/PSD/ORA) and collected in one HTML page (`showcase_page`).

    showcase(ShowcaseConfig(out=Path(".work/demo/showcase")))   # the shipped model (model.pretrained.SHAPES64)

Prompts are the model's own vocabulary (its card's `vocabulary`, else mlcid's synthetic palette) written like the
synthetic training captions (`mlcid.synthetic.GLOBAL_TEMPLATES`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mlcid.layered import LayeredImage
from mlcid.schema import BACKGROUND_PROMPT
from mlcid.synthetic import BACKGROUND_PATTERNS, COLOURS, GLOBAL_TEMPLATES, SHAPES
from mlcid.synthetic_shapes import with_article
from model.sampling import applications as A
from model.sampling.export import OutputMeta, save_output

log = logging.getLogger(__name__)

CFG_SCALE = 3.0  # the pipeline's defaults: CFG 3 + self-mask guidance 3 (SMGConfig())
SMG_SCALE = 3.0
GUIDANCE = "cfg+smg"
STYLE_STRENGTH = A.STYLE_STRENGTH  # 0.8, Appendix D


@dataclass(frozen=True)
class Scene:
    """A prompt the model can draw: objects back→front as (colour, shape), background colour and pattern."""

    objects: tuple[tuple[str, str], ...]
    background: str
    pattern: str
    template: int = 0  # index into GLOBAL_TEMPLATES

    @property
    def layer_prompts(self) -> list[str]:
        return [BACKGROUND_PROMPT] + [with_article(f"{c} {s}") for c, s in self.objects]

    @property
    def global_prompt(self) -> str:
        """Like a synthetic caption: objects front→back joined by 'and', the background with its pattern."""
        objects = " and ".join(with_article(f"{c} {s}") for c, s in reversed(self.objects))
        background = with_article(f"{BACKGROUND_PATTERNS.get(self.pattern, self.pattern)} {self.background}")
        return GLOBAL_TEMPLATES[self.template % len(GLOBAL_TEMPLATES)].format(objects=objects, background=background)

    def with_object(self, index: int, pair: tuple[str, str]) -> "Scene":
        """This scene with foreground `index` (1-based layer index) replaced."""
        objects = list(self.objects)
        objects[index - 1] = pair
        return Scene(tuple(objects), self.background, self.pattern, self.template)

    def plus(self, pair: tuple[str, str]) -> "Scene":
        return Scene((*self.objects, pair), self.background, self.pattern, self.template)


@dataclass
class Vocabulary:
    """Words a model can draw; `pairs()` leaves out the (colour, shape) pairs held out of its training."""

    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = tuple(SHAPES)
    background_colours: tuple[str, ...] = ("purple", "orange", "cyan", "pink")
    background_patterns: tuple[str, ...] = ("plain", "stripes", "checks", "gradient")
    holdout_pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of_model(cls, folder: str | Path) -> "Vocabulary":
        """From the model card's front matter (`model.ship` writes it); the defaults where it says nothing."""
        from model.ship import card_vocabulary

        voc = card_vocabulary(folder)
        keys = ("colours", "shapes", "background_colours", "background_patterns")
        out = cls(**{k: tuple(voc[k]) for k in keys if voc.get(k)})
        out.holdout_pairs = tuple(tuple(p) for p in voc.get("holdout_pairs") or ())
        unknown = [c for c in (*out.colours, *out.background_colours) if c not in COLOURS]
        if unknown:
            raise ValueError(f"{folder}: the card names colours {unknown} that mlcid's palette does not know")
        return out

    def pairs(self) -> list[tuple[str, str]]:
        return [(c, s) for c in self.colours for s in self.shapes if (c, s) not in self.holdout_pairs]


def random_scenes(voc: Vocabulary, count: int, seed: int) -> list[Scene]:
    """`count` scenes alternating one and two objects (distinct colours, background colour unused by them)."""
    rng = np.random.default_rng(seed)
    pairs, scenes = voc.pairs(), []
    for i in range(count):
        objects: list[tuple[str, str]] = []
        for _ in range(1 + i % 2):
            free = [p for p in pairs if p[0] not in {c for c, _ in objects}]
            objects.append(free[int(rng.integers(len(free)))])
        backgrounds = [c for c in voc.background_colours if c not in {c for c, _ in objects}] or list(voc.background_colours)
        scenes.append(Scene(tuple(objects), backgrounds[int(rng.integers(len(backgrounds)))],
                            voc.background_patterns[int(rng.integers(len(voc.background_patterns)))],
                            int(rng.integers(len(GLOBAL_TEMPLATES)))))
    return scenes


def other_pair(voc: Vocabulary, scene: Scene, index: int, same_shape: bool = False) -> tuple[str, str]:
    """A seen (colour, shape) for layer `index` with another colour than every object of the scene (and another
    shape, unless `same_shape`): what an edit turns that layer into."""
    colour, shape = scene.objects[index - 1]
    used = {c for c, _ in scene.objects}
    for c, s in voc.pairs():
        if c not in used and (s == shape) == same_shape:
            return c, s
    raise ValueError(f"no colour left to edit {colour} {shape} into (vocabulary {voc.colours})")


def free_box(image: LayeredImage, frac: float = 0.45) -> tuple[int, int, int, int]:
    """A square box (side `frac` of the image) in the corner with the least foreground in it."""
    h, w = image.height, image.width
    side = int(round(frac * min(h, w)))
    fg = np.any(np.stack(image.masks[1:]) > 127, axis=0) if image.num_layers > 1 else np.zeros((h, w), bool)
    corners = [(x, y) for y in (0, h - side) for x in (0, w - side)]
    x, y = min(corners, key=lambda xy: fg[xy[1]:xy[1] + side, xy[0]:xy[0] + side].sum())
    return x, y, x + side, y + side


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class ShowcaseConfig:
    out: Path
    model: Path | None = None  # None: the shipped model
    seed: int = 0
    examples: int = 3
    steps: int = 20
    device: str = "cpu"


@dataclass
class Edit:
    """One application on one example: its output folder and what it did."""

    name: str  # "inpaint" | "style" | "iterative"
    folder: Path
    caption: str


@dataclass
class Example:
    scene: Scene
    folder: Path  # the sample's output folder
    edits: list[Edit] = field(default_factory=list)


def _model_folder(model: Path | None) -> Path:
    from model.pretrained import SHAPES64

    folder = Path(model) if model is not None else SHAPES64
    if not folder.is_dir():
        raise FileNotFoundError(f"no model at {folder}" + (
            ": the shipped model is written by `layerdiff ship-model --bench .work/learn-bench --out "
            "model/pretrained/shapes64`" if model is None else ""))
    return folder


def showcase(config: ShowcaseConfig) -> Path:
    """Sample `examples` layered images, run the three edits on each, export all; returns OUT/index.html."""
    from model.sampling.pipeline import LayerDiffPipeline
    from model.sampling.showcase_page import write_page

    # 1. The model, its vocabulary, the scenes.
    folder = _model_folder(config.model)
    pipe = LayerDiffPipeline.from_pretrained(folder).to(config.device)
    pipe.set_progress_bar_config(disable=True)
    voc = Vocabulary.of_model(folder)
    out = Path(config.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    guidance = dict(num_inference_steps=config.steps, guidance_scale=CFG_SCALE, smg_scale=SMG_SCALE,
                    guidance=GUIDANCE)
    meta = dict(num_inference_steps=config.steps, guidance_scale=CFG_SCALE, smg_scale=SMG_SCALE,
                guidance=GUIDANCE, model=str(folder))

    examples = []
    for i, scene in enumerate(random_scenes(voc, config.examples, config.seed)):
        seed = config.seed * 1000 + i
        gen = lambda k: torch.Generator().manual_seed(seed * 10 + k)  # noqa: E731 - one stream per application
        root = out / f"example{i:02d}"
        # 2. The layered sample.
        sample = pipe(scene.global_prompt, scene.layer_prompts, generator=gen(0), output_type="np", **guidance)
        src = sample.layered(0)
        example = Example(scene, save_output(root / "sample", src, OutputMeta(seed=seed, **meta)))
        target = len(scene.objects)  # the front-most foreground layer

        # 3. Layer inpainting: the front layer regenerated as another colour and shape; the rest kept.
        new = scene.with_object(target, other_pair(voc, scene, target))
        res = A.layer_inpaint(pipe, src, {target: new.layer_prompts[target]}, global_prompt=new.global_prompt,
                              generator=gen(1), output_type="np", **guidance)
        example.edits.append(Edit("inpaint", save_output(root / "inpaint", res.layered(0), OutputMeta(
            seed=seed, extra={"application": "inpaint"}, **meta)),
            f"layer inpainting: layer {target} '{scene.layer_prompts[target]}' regenerated as "
            f"'{new.layer_prompts[target]}'; every other layer's image latents kept exactly"))

        # 4. Style transfer (SDEdit, strength 0.8): the same layer recoloured, its shape and place kept.
        recol = scene.with_object(target, other_pair(voc, scene, target, same_shape=True))
        res = A.layer_style_transfer(pipe, src, [target], new_prompts={target: recol.layer_prompts[target]},
                                     global_prompt=recol.global_prompt, strength=STYLE_STRENGTH, generator=gen(2),
                                     output_type="np", **guidance)
        example.edits.append(Edit("style", save_output(root / "style", res.layered(0), OutputMeta(
            seed=seed, extra={"application": "style", "strength": STYLE_STRENGTH}, **meta)),
            f"style transfer (SDEdit, strength {STYLE_STRENGTH}): layer {target} '{scene.layer_prompts[target]}' → "
            f"'{recol.layer_prompts[target]}' from its noised self; the other layers pinned"))

        # 5. Iterative adding: one more object on a new layer, its mask started from a box in a free corner.
        add = next(p for p in voc.pairs() if p[0] not in {c for c, _ in scene.objects} | {scene.background})
        more = scene.plus(add)
        box = free_box(src)
        res = A.iterative_generation(pipe, more.global_prompt, [more.layer_prompts[-1]], boxes=[box], start=src,
                                     generator=gen(3), **guidance)
        example.edits.append(Edit("iterative", save_output(root / "iterative", res.layers, OutputMeta(
            seed=seed, extra={"application": "iterative", "box": list(box)}, **meta)),
            f"iterative adding: '{more.layer_prompts[-1]}' added as layer {src.num_layers} in box {box} "
            f"({src.num_layers} → {res.layers.num_layers} layers)"))
        examples.append(example)
        log.info("showcase example %d: %s", i, scene.global_prompt)

    # 6. One page.
    return write_page(out, examples, title=f"LayerDiff showcase: {folder.name}",
                      settings=f"model {folder.name}, DDIM {config.steps} steps, CFG {CFG_SCALE} + self-mask "
                               f"guidance {SMG_SCALE}, seed {config.seed}")
