"""learn-bench's configuration: sizes of every stage, the sampling conditions (main ones and the SMG scale sweep
over `SMG_VARIANTS`), and the test scenes. Shared by the stages (`benchmarks.learn_bench`) and the report
(`benchmarks.learn_bench_report`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from model.sampling.guidance import SMG_VARIANTS, SMGConfig
from model.training.config import CONFIG_DIR
from model.training.text_train import TextTrainConfig
from model.training.vae_train import VAETrainConfig

CONFIG = CONFIG_DIR / "learn_bench.yaml"
GROUPS = ("seen-2L", "heldout-2L", "seen-3L", "heldout-3L")
MAIN_CONDITIONS = ("step0-cfg", "cfg", "cfg+smg", "shuffled-cfg")
EXTRA_CONDITIONS = ("cfg+smg-window",)  # present when BenchConfig.smg_window is set
VAE_ROUNDTRIP = "vae-roundtrip"  # the test scenes' true layers through the VAE alone: the ceiling of every score


@dataclass(frozen=True)
class Condition:
    """How one set of samples is drawn: model, guidance, SMG variant and scale, prompts rolled, prompts per group."""

    trained: bool = True
    guidance: str = "cfg"
    smg_scale: float = 0.0
    variant: str = "default"  # key of SMG_VARIANTS
    shuffled: bool = False
    per_group: int = 30
    smg_start: float = 0.0  # SMG only on the steps i with smg_start <= i / steps < smg_end (the speed window)
    smg_end: float = 1.0
    smg_mask_interval: int = 1  # masks re-decoded every k steps

    @property
    def smg(self) -> SMGConfig:
        return SMG_VARIANTS[self.variant]


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
        block_out_channels=(16, 32, 64, 64), norm_num_groups=4, steps=1500, max_samples=1500))
    # a 4.2M-parameter SD UNet (5.8M with the layer blocks); a text encoder over CLIP's tokenizer
    # pruned to the synthetic prompts' words (`prune_vocabulary`; ~600 tokens instead of 49,408)
    unet_channels: tuple[int, ...] = (64, 128)
    text_hidden: int = 64
    text_layers: int = 2
    prune_vocabulary: bool = True
    # caption pre-training of the frozen text encoder (None: keep it random, as before)
    text_train: TextTrainConfig | None = field(default_factory=TextTrainConfig)
    text_train_samples: int = 4000  # training scenes whose captions and layer prompts it reads
    train_config: str = str(CONFIG)
    train_steps: int | None = None  # None = the YAML's max_steps
    train_overrides: tuple[str, ...] = ()  # extra `--set key=value` for the trainer
    per_group: int = 30  # test prompts per group
    sample_steps: int = 20
    guidance_scale: float = 3.0
    smg_scale: float = 3.0  # the paper's scale, for the main "cfg+smg" condition (default variant)
    sweep_variants: tuple[str, ...] = ("default", "inside", "uncond", "paper", "legacy", "absolute")
    sweep_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)  # 0 = CFG alone (the "cfg" samples)
    # the speed window (issue 11 §4) as one more condition "cfg+smg-window": (start, end, mask interval); None: off
    smg_window: tuple[float, float, int] | None = (0.7, 1.0, 2)
    sweep_per_group: int = 10  # the sweep's prompts: the first of each group's test prompts, same seeds
    fid_fit_samples: int = 2000  # training scenes the feature MLP of the Fréchet distance is fit on
    fid_reference_per_group: int = 100  # fresh ground-truth scenes per group: the reference statistics
    results_json: str | None = None  # also write the issue-shaped results here (the CLI: docs/learn_bench_results.json)
    classifier_samples: int = 1500  # training scenes whose masks fit the shape classifier
    grid_rows: int = 8
    threads: int = 1  # torch threads; on 2 shared cores 2 threads ran 5× slower than 1 (oversubscription)

    @classmethod
    def ship(cls) -> "BenchConfig":
        """The model shipped in the repository (`layerdiff ship-model`): flat shapes on plain backgrounds, which
        a model this small draws cleanly, a 64-channel UNet at both resolutions; no SMG sweep."""
        return cls(background_patterns=("plain",), object_patterns=("plain",), unet_channels=(64, 64),
                   sweep_variants=(), per_group=20)

    @classmethod
    def smoke(cls) -> "BenchConfig":
        return cls(train_samples=24, shards=2, vae=VAETrainConfig(steps=3, max_samples=16, batch_size=4,
                   block_out_channels=(16, 16, 16, 16), norm_num_groups=4, holdout=4), unet_channels=(32, 32),
                   text_hidden=32, text_train=TextTrainConfig(steps=2, batch_size=4), text_train_samples=24,
                   train_steps=2, train_overrides=("batch_size=2", "checkpoint_every=1",
                   "warmup_steps=1", "data.shuffle_buffer=2"), per_group=2, sample_steps=2,
                   classifier_samples=24, grid_rows=2, threads=1, sweep_variants=("default", "uncond"),
                   sweep_scales=(1.0, 3.0), sweep_per_group=1, fid_fit_samples=24, fid_reference_per_group=3)

    def conditions(self) -> dict[str, Condition]:
        """Main conditions (every test prompt), then the SMG sweep "smg-<variant>@<scale>" (the first
        `sweep_per_group` prompts of each group). Sweep points that equal a main condition reuse its samples."""
        n = self.per_group
        out = {"step0-cfg": Condition(trained=False, per_group=n), "cfg": Condition(per_group=n),
               "cfg+smg": Condition(guidance="cfg+smg", smg_scale=self.smg_scale, per_group=n),
               "shuffled-cfg": Condition(shuffled=True, per_group=n)}
        if self.smg_window is not None:
            start, end, every = self.smg_window
            out["cfg+smg-window"] = Condition(guidance="cfg+smg", smg_scale=self.smg_scale, per_group=n,
                                              smg_start=start, smg_end=end, smg_mask_interval=every)
        if self.sweep_variants:  # scale 0 of the sweep: CFG alone on the sweep's prompts (the "cfg" samples)
            out["cfg@sweep"] = Condition(per_group=min(self.sweep_per_group, n))
        for variant in self.sweep_variants:
            for scale in self.sweep_scales:
                out[f"smg-{variant}@{scale:g}"] = Condition(guidance="cfg+smg", smg_scale=scale, variant=variant,
                                                             per_group=min(self.sweep_per_group, n))
        return out

    def sample_source(self, name: str) -> tuple[str, int]:
        """(condition whose samples hold `name`'s, how many per group): a sweep point equal to a main
        condition (same variant and scale, hence the same seeds and samples) is read from that one."""
        cond = self.conditions()[name]
        for main in MAIN_CONDITIONS:
            if main != name and dataclasses.replace(self.conditions()[main], per_group=cond.per_group) == cond:
                return main, cond.per_group
        return name, cond.per_group

    def scene_config(self, foregrounds: tuple[int, int] = (1, 2), allowed=None, holdout=None):
        from mlcid.synthetic import SceneConfig

        return SceneConfig(size=self.size, min_foregrounds=foregrounds[0], max_foregrounds=foregrounds[1],
                           colours=self.colours, shapes=self.shapes, background_patterns=self.background_patterns,
                           object_patterns=self.object_patterns,
                           background_colours=self.background_colours, allowed_pairs=allowed,
                           holdout_pairs=self.holdout_pairs if holdout is None else holdout,
                           min_radius=self.min_radius, max_radius=self.max_radius)




def test_scenes(cfg: BenchConfig, group: str, count: int | None = None, start: int = 0) -> list:
    """`count` (default `per_group`) fresh ground-truth scenes (seed `test_seed`, from index `start`) of a group:
    seen or held-out pairs, 1 or 2 objects. Indices past `per_group` serve as the FID reference."""
    from mlcid.synthetic import make_scene

    kind, layers = group.split("-")
    n_fg = int(layers[0]) - 1
    if kind == "seen":
        scene_cfg = cfg.scene_config((n_fg, n_fg))
    else:  # every foreground a withheld pair
        scene_cfg = cfg.scene_config((n_fg, n_fg), allowed=cfg.holdout_pairs, holdout=())
    offset = GROUPS.index(group) * 100_000
    count = cfg.per_group if count is None else count
    return [make_scene(scene_cfg, cfg.test_seed, offset + i) for i in range(start, start + count)]
