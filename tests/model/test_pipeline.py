"""LayerDiffPipeline: run-folder loading, outputs (one-hot masks, Eq. 4 composite, RGBA), paper negatives,
batched UNet calls, CFG / SMG / SAG, intermediates, callbacks and bad input refused before any UNet call."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mlcid.composite import composite as composite_eq4
from model.sampling import guidance as G
from model.loading import encode_prompts
from model.sampling.pipeline import SELF_GUIDANCE, KeepLayers, LayerDiffPipeline, paper_negatives
from tests.builders import UNetSpy, make_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread on shared cores

PROMPTS = ["the background", "a red ball", "a dog"]
SIZE = 32  # px → 4×4 latents


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("layerdiff"))


@pytest.fixture(scope="module")
def pipe(run_dir):
    p = LayerDiffPipeline.from_pretrained(run_dir)
    p.set_progress_bar_config(disable=True)
    return p


def sample(pipe, **kw):
    args = dict(global_prompt="a dog with a red ball", layer_prompts=PROMPTS, num_inference_steps=2,
                height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0), output_type="np")
    args.update(kw)
    return pipe(**args)


def test_run_folder_round_trip(run_dir, pipe):
    index = json.loads((run_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "LayerDiffPipeline"]  # diffusers' custom-pipeline form (model.hub)
    assert index["unet"] == ["model.network.unet", "LayerDiffUNet"]
    assert type(pipe.unet).__name__ == "LayerDiffUNet" and pipe.unet.config.max_layers == 4
    assert pipe.default_size == 256 and pipe.vae_scale_factor == 8


def test_outputs_are_consistent_layers(pipe):
    out = sample(pipe)
    B, L = 1, len(PROMPTS)
    assert out.layer_images.shape == (B, L, SIZE, SIZE, 3) and out.layer_images.dtype == np.uint8
    assert out.latents.shape == (B, L, 8, SIZE // 8, SIZE // 8)
    # one-hot binary masks across layers (background included)
    assert set(np.unique(out.masks)) <= {0, 255}
    assert (out.masks.astype(int).sum(axis=1) == 255).all()
    # the masks are the arg-max of the channel-averaged decoded mask latents
    decoded = pipe.decode_latents(out.latents[:, :, 4:])
    assert np.array_equal(out.masks[0].argmax(axis=0), decoded.mean(dim=2)[0].argmax(dim=0).numpy())
    # Eq. 4 composite and RGBA layers
    expected = composite_eq4(out.layer_images[0, 0], list(out.layer_images[0, 1:]), list(out.masks[0, 1:]))
    assert np.array_equal(out.composites[0], expected)
    assert (out.rgba_layers[0, 0, ..., 3] == 255).all()
    assert np.array_equal(out.rgba_layers[0, 1:, ..., 3], out.masks[0, 1:])
    layered = out.layered(0)
    assert layered.num_layers == L and layered.layer_prompts == PROMPTS
    assert np.array_equal(layered.composite, out.composites[0])
    # same seed → same result; pil output carries the same pixels
    pil = sample(pipe, output_type="pil")
    assert np.array_equal(np.asarray(pil.composites[0]), out.composites[0])
    assert np.array_equal(np.asarray(pil.masks[0][2]), out.masks[0, 2])
    latent_only = sample(pipe, output_type="latent")
    assert torch.equal(latent_only.latents, out.latents) and latent_only.layer_images is None
    # decode_layers turns the latents into the very outputs the sampling call returned
    decoded = pipe.decode_layers(latent_only.latents)
    for name in ("layer_images", "masks", "rgba_layers", "composites"):
        assert np.array_equal(getattr(decoded, name), getattr(out, name)), name
    with pytest.raises(ValueError, match="output_type"):
        pipe.decode_layers(latent_only.latents, output_type="latent")


def test_paper_negatives_reach_the_unet(pipe):
    neg_global, neg_layers = paper_negatives(PROMPTS)
    assert neg_global == "a red ball, a dog"
    assert neg_layers == ["a red ball, a dog", "the background", "the background"]
    spy = UNetSpy(pipe)
    try:
        sample(pipe, guidance="cfg", num_inference_steps=1)
    finally:
        spy.close()
    (batch, g_text, l_text), = spy.calls
    assert batch == 2  # conditional + negative branch in ONE call
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a dog with a red ball", neg_global] + PROMPTS + neg_layers)
    assert torch.allclose(g_text[0], enc[0], atol=1e-5) and torch.allclose(g_text[1], enc[1], atol=1e-5)
    assert torch.allclose(l_text[0], enc[2:5], atol=1e-5) and torch.allclose(l_text[1], enc[5:8], atol=1e-5)


@pytest.mark.parametrize(("guidance", "max_batch", "num_images", "sizes"), [
    ("cfg", None, 1, [2]),
    ("cfg+smg", None, 1, [2, 1]),
    ("cfg+smg", None, 2, [4, 2]),
    ("cfg+smg", 1, 2, [1, 1, 1, 1, 1, 1]),
    ("cfg+sag", None, 1, [2, 1]),
])
def test_unet_calls_are_batched(pipe, guidance, max_batch, num_images, sizes):
    spy = UNetSpy(pipe)
    try:
        out = sample(pipe, guidance=guidance, max_batch=max_batch, num_images=num_images, num_inference_steps=2)
    finally:
        spy.close()
    assert [c[0] for c in spy.calls] == sizes * 2  # per step; 2 steps
    assert out.layer_images.shape[0] == num_images


def test_max_batch_does_not_change_the_result(pipe):
    a = sample(pipe, num_images=2, output_type="latent")
    b = sample(pipe, num_images=2, max_batch=1, output_type="latent")
    assert torch.allclose(a.latents, b.latents, atol=1e-4)


def test_self_guidance_identities_and_effects(pipe):
    cfg = sample(pipe, guidance="cfg", output_type="latent").latents
    assert torch.equal(sample(pipe, guidance="cfg+smg", smg_scale=0.0, output_type="latent").latents, cfg)
    smg = sample(pipe, guidance="cfg+smg", output_type="latent").latents
    inside = sample(pipe, guidance="cfg+smg", smg=G.SMGConfig(side="inside"), output_type="latent").latents
    sag = sample(pipe, guidance="cfg+sag", output_type="latent").latents
    assert not torch.allclose(smg, cfg, atol=1e-4)
    assert not torch.allclose(smg, inside, atol=1e-4)
    assert not torch.allclose(sag, cfg, atol=1e-4)
    # SMG only pushes the image noise: mask latents of step 1 see the same ε
    one = sample(pipe, guidance="cfg", num_inference_steps=1, output_type="latent").latents
    one_smg = sample(pipe, guidance="cfg+smg", num_inference_steps=1, output_type="latent").latents
    assert torch.equal(one[:, :, 4:], one_smg[:, :, 4:]) and not torch.allclose(one[:, :, :4], one_smg[:, :, :4])
    # SAG leaves the UNet's attention processors as they were
    assert type(pipe._sag_attention().processor).__name__ != "_StoreAttentionProcessor"


def test_smg_with_empty_masks_inside_changes_nothing(pipe, monkeypatch):
    """Blurring INSIDE an all-zero mask conceals nothing: the degraded pass equals the base branch."""
    cfg = sample(pipe, guidance="cfg", output_type="latent").latents
    monkeypatch.setattr(pipe, "_predicted_masks",
                        lambda mask_latents, *a: torch.zeros_like(mask_latents[:, :, :1]))
    empty = sample(pipe, guidance="cfg+smg", smg_scale=3.0, smg=G.SMGConfig(side="inside"),
                   output_type="latent").latents
    assert torch.allclose(empty, cfg, atol=1e-4)


def test_smg_masks_come_from_decoded_mask_x0(pipe, monkeypatch):
    seen = []
    real = pipe._predicted_masks

    def spy(mask_latents, mask_eps, alpha, chunk):
        masks = real(mask_latents, mask_eps, alpha, chunk)
        x0 = G.predict_x0(mask_latents, mask_eps, alpha)
        expected = G.layer_masks_from_x0(pipe.decode_latents(x0))  # (B, L, 1, H, W) one-hot
        assert torch.allclose(masks, G.resize_masks(expected, (SIZE // 8, SIZE // 8)))
        assert torch.allclose(masks.sum(dim=1), torch.ones_like(masks[:, 0]))
        seen.append(masks)
        return masks

    monkeypatch.setattr(pipe, "_predicted_masks", spy)
    sample(pipe, num_inference_steps=4)
    assert len(seen) == 4
    seen.clear()
    sample(pipe, num_inference_steps=4, smg_mask_interval=2)
    assert len(seen) == 2


@pytest.mark.parametrize(("variant", "expected"), [("default", "scaled"), ("absolute", (31, 3.0))])
def test_smg_blur_is_sized_to_the_latents(pipe, monkeypatch, variant, expected):
    """The degraded pass blurs with the variant's Gaussian at this latent size (`SMGConfig.blur_at`), not with
    kernel / sigma taken as latent pixels."""
    seen = []
    real = G.smg_degrade

    def spy(z_t, eps, alpha, masks, kernel, sigma, *a, **kw):
        seen.append((kernel, sigma))
        return real(z_t, eps, alpha, masks, kernel, sigma, *a, **kw)

    monkeypatch.setattr(G, "smg_degrade", spy)
    smg = G.SMG_VARIANTS[variant]
    sample(pipe, num_inference_steps=2, smg_scale=3.0, smg=smg)
    want = smg.blur_at((SIZE // 8, SIZE // 8)) if expected == "scaled" else expected
    assert seen == [want, want]
    if expected == "scaled":
        assert want != (smg.kernel, smg.sigma)  # the tiny latents are not the paper's 32²


@pytest.mark.parametrize("branch", ["uncond", "negative", "cond"])
def test_smg_degraded_pass_runs_the_chosen_branch(pipe, branch):
    """The degraded pass uses the chosen branch's prompts; "uncond" adds an empty-prompt branch to the batched
    call; the blurred x̂_0 and the SAG-style push come from that branch's own prediction."""
    spy = UNetSpy(pipe)
    try:
        sample(pipe, smg=G.SMGConfig(degrade_from=branch), num_inference_steps=1)
    finally:
        spy.close()
    (first, g1, l1), (second, g2, l2) = spy.calls
    assert (first, second) == ((3 if branch == "uncond" else 2), 1)
    neg_global, neg_layers = paper_negatives(PROMPTS)
    texts = {"cond": ("a dog with a red ball", PROMPTS), "negative": (neg_global, neg_layers),
             "uncond": ("", [""] * len(PROMPTS))}
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, [texts[branch][0]] + list(texts[branch][1]))
    assert torch.allclose(g2[0], enc[0], atol=1e-5) and torch.allclose(l2[0], enc[1:], atol=1e-5)
    if branch == "uncond":  # the empty-prompt branch rides in the first call, after cond and negative
        assert torch.allclose(g1[2], enc[0], atol=1e-5) and torch.allclose(l1[2], enc[1:], atol=1e-5)


@pytest.mark.parametrize("source", ["cfg", "cond", "negative", "uncond"])
def test_smg_masks_come_from_the_chosen_prediction(pipe, monkeypatch, source):
    outputs, seen = [], []
    handle = pipe.unet.register_forward_hook(lambda _m, _a, out: outputs.append(out.sample.detach().clone()))
    real = pipe._predicted_masks

    def spy(mask_latents, mask_eps, alpha, chunk):
        seen.append(mask_eps.clone())
        return real(mask_latents, mask_eps, alpha, chunk)

    monkeypatch.setattr(pipe, "_predicted_masks", spy)
    try:
        sample(pipe, smg=G.SMGConfig(masks_from=source), num_inference_steps=1, guidance_scale=3.0)
    finally:
        handle.remove()
    first = outputs[0][:, :, 4:]  # mask-noise channels of the batched call: cond, negative[, uncond]
    expected = {"cond": first[0:1], "negative": first[1:2], "cfg": G.cfg(first[1:2], first[0:1], 3.0)}
    if source == "uncond":
        expected["uncond"] = first[2:3]
    assert torch.allclose(seen[0], expected[source], atol=1e-5)


def test_smg_variants_differ_and_paper_combination_is_literal(pipe, monkeypatch):
    base = sample(pipe, output_type="latent").latents
    for variant in (G.SMGConfig(blur="normalized"), G.SMGConfig(combine="paper"), G.SMGConfig(degrade_from="cond")):
        assert not torch.allclose(sample(pipe, smg=variant, output_type="latent").latents, base, atol=1e-4)
    # "paper": ε̃ = ε̂ + (1 + s)(ε_cfg − ε̂), checked on the ε handed to the scheduler at the one step
    calls, steps = [], []
    pipe.unet.register_forward_hook(lambda _m, _a, out: calls.append(out.sample.detach().clone()))
    real_step = pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step", lambda eps, t, x, **kw: steps.append(eps.clone()) or
                        real_step(eps, t, x, **kw))
    try:
        sample(pipe, smg=G.SMGConfig(combine="paper"), smg_scale=2.0, num_inference_steps=1)
    finally:
        pipe.unet._forward_hooks.clear()
    first, degraded = calls
    e_cfg = G.cfg(first[1:2], first[0:1], 3.0)
    expected = degraded[:, :, :4] + 3.0 * (e_cfg[:, :, :4] - degraded[:, :, :4])
    assert torch.allclose(steps[0][:, :, :4], expected, atol=1e-5)
    assert torch.allclose(steps[0][:, :, 4:], e_cfg[:, :, 4:], atol=1e-5)  # mask noise: CFG only


def test_intermediates_and_callback(pipe):
    steps_seen = []

    def callback(p, step, t, kwargs):
        steps_seen.append((step, t))
        return {"latents": kwargs["latents"] * 0 if step == 2 else kwargs["latents"]}

    out = sample(pipe, num_inference_steps=3, return_intermediates=True, intermediate_every=2,
                 callback_on_step_end=callback, output_type="latent")
    assert [s for s, _ in steps_seen] == [0, 1, 2] and steps_seen[0][1] > steps_seen[-1][1]
    assert torch.equal(out.latents, torch.zeros_like(out.latents))
    assert [x.step for x in out.intermediates] == [0, 2]
    assert out.intermediates[0].images.shape == (1, 3, SIZE, SIZE, 3)
    assert (out.intermediates[0].masks.astype(int).sum(axis=1) == 255).all()


def test_keep_layers_hold_image_latents_exactly(pipe):
    known = torch.randn(1, 3, 8, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    keep = KeepLayers(latents=known, image_layers=(0, 2), mask_layers=(0,), mask_steps=1)
    out = sample(pipe, keep=keep, num_inference_steps=3, output_type="latent")
    assert torch.equal(out.latents[:, [0, 2], :4], known[:, [0, 2], :4])
    assert not torch.allclose(out.latents[:, 1, :4], known[:, 1, :4])
    assert not torch.allclose(out.latents[:, 0, 4:], known[:, 0, 4:])  # masks freed after k = 1 step


BAD_INPUTS = [
    (dict(layer_prompts=[]), "no layer prompts"),
    (dict(layer_prompts=["the background"]), "at least one foreground"),
    (dict(layer_prompts=["the background"] + ["x"] * 4), "max_layers=4"),
    (dict(layer_prompts="the background|a dog"), "list of strings"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(smg_scale=float("nan")), "smg_scale"),
    (dict(guidance="cfg+xyz"), "guidance must be one of"),
    (dict(smg="inside"), "SMGConfig"),
    (dict(height=30), "multiple of 8"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(strength=0.0), "strength"),
    (dict(max_batch=0), "max_batch"),
    (dict(latents=torch.zeros(1, 2, 8, 4, 4)), "latents must have shape"),
    (dict(output_type="jpg"), "output_type"),
    (dict(eta=-0.5), "eta"),
    (dict(intermediate_every=0), "intermediate_every"),
    (dict(negative_layer_prompts=["x"]), "negative layer prompts"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_input_refused_before_any_unet_call(pipe, kwargs, message):
    spy = UNetSpy(pipe)
    try:
        with pytest.raises(ValueError, match=message):
            sample(pipe, **kwargs)
    finally:
        spy.close()
    assert spy.calls == []


def test_not_a_layerdiff_run(tmp_path, run_dir):
    with pytest.raises(ValueError, match="not a local folder"):
        LayerDiffPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_index.json is missing"):
        LayerDiffPipeline.from_pretrained(tmp_path)
    sd = run_dir.parent / "tiny" / "sd15"  # a plain SD folder
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        LayerDiffPipeline.from_pretrained(sd)
    evil = tmp_path / "evil"
    shutil.copytree(run_dir, evil)
    index = json.loads((evil / "model_index.json").read_text())
    index["vae"] = ["os", "system"]
    (evil / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="component 'vae'"):
        LayerDiffPipeline.from_pretrained(evil)
    with pytest.raises(ValueError, match="trust_remote_code"):
        LayerDiffPipeline.from_pretrained(run_dir, trust_remote_code=True)


# ------------------------------------------------------------------ CLI (layerdiff sample)


def test_sample_cli_writes_export_folders(run_dir, tmp_path):
    from model.sampling.export import load_output
    from cli.main import layerdiff_main

    out = tmp_path / "out"
    rc = layerdiff_main(["sample", "--model", str(run_dir), "--prompt", "a dog with a red ball",
                         "--layers", "the background|a red ball|a dog",
                         "--out", str(out), "--steps", "2", "--height", "32", "--width", "32", "--seed", "3",
                         "--num-images", "2", "--previews", "1", "--boxes", "0,0,16,16;8,8,32,32"])
    assert rc == 0
    for i in range(2):
        loaded = load_output(out / f"{i:03d}")
        assert loaded.image.layer_prompts == PROMPTS and loaded.meta.seed == 3 and loaded.meta.guidance == "cfg+smg"
        assert loaded.image.num_layers == 3 and (out / f"{i:03d}" / "previews.png").is_file()
    # same seed, one image: the first folder's layers again
    rc = layerdiff_main(["sample", "--model", str(run_dir), "--prompt", "a dog with a red ball",
                         "--layers", "the background|a red ball|a dog",
                         "--out", str(tmp_path / "one"), "--steps", "2", "--height", "32", "--width", "32",
                         "--seed", "3", "--boxes", "0,0,16,16;8,8,32,32"])
    assert rc == 0
    one, first = (load_output(f).image.composite.astype(int) for f in (tmp_path / "one", out / "000"))
    assert np.abs(one - first).max() <= 1  # batched vs single UNet calls differ by float noise (~1e-5 in latents)


def test_sample_cli_smg_variant_and_window_reach_the_sampler_and_the_record(run_dir, tmp_path):
    """--smg-variant picks SMG_VARIANTS[name] and --smg-start / --smg-end / --smg-mask-interval the SMG window: each
    changes the layers drawn from one seed, and each folder's layers.json records them."""
    from model.sampling.export import load_output
    from cli.main import layerdiff_main

    runs = {"default": [], "inside": ["--smg-variant", "inside"],
            "window": ["--smg-end", "0.5", "--smg-mask-interval", "2"],
            "late": ["--smg-start", "0.5", "--smg-mask-interval", "2"], "every2": ["--smg-mask-interval", "2"]}
    composites = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert layerdiff_main(["sample", "--model", str(run_dir), "--prompt", "a dog with a red ball",
                               "--layers", "the background|a red ball|a dog", "--out", str(out), "--steps", "4",
                               "--height", "32", "--width", "32", "--seed", "3", "--smg", "5", *extra]) == 0
        record = json.loads((out / "layers.json").read_text())["extra"]
        assert (record["smg_variant"], record["smg_start"], record["smg_end"], record["smg_mask_interval"]) == {
            "default": ("default", 0.0, 1.0, 1), "inside": ("inside", 0.0, 1.0, 1), "window": ("default", 0.0, 0.5, 2),
            "late": ("default", 0.5, 1.0, 2), "every2": ("default", 0.0, 1.0, 2)}[name]
        composites[name] = load_output(out).image.composite.astype(int)
    assert np.abs(composites["default"] - composites["inside"]).max() > 2
    assert np.abs(composites["default"] - composites["window"]).max() > 2
    assert np.abs(composites["every2"] - composites["late"]).max() > 2  # --smg-start reached the sampler


def test_sample_cli_choices_are_the_pipelines_modes_and_variants():
    from cli.sample import GUIDANCE_MODES, SMG_VARIANT_NAMES  # written out: importing the pipeline would load torch
    from model.sampling.guidance import SMG_VARIANTS

    assert sorted(GUIDANCE_MODES) == sorted(SELF_GUIDANCE)
    assert SMG_VARIANT_NAMES == tuple(SMG_VARIANTS)


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "the background||a dog"], "non-empty"),
    (["--boxes", "1,2,3"], "x0,y0,x1,y1"),
    (["--layers", "the background|a dog", "--boxes", "0,0,8,8;0,0,8,8"], "2 boxes for 1"),
    (["--smg-end", "0"], "--smg-start < --smg-end"),
    (["--smg-start", "0.6", "--smg-end", "0.5"], "--smg-start < --smg-end"),
    (["--smg-mask-interval", "0"], "--smg-mask-interval >= 1"),
])
def test_sample_cli_bad_input(run_dir, tmp_path, caplog, args, message):
    from cli.main import layerdiff_main

    base = {"--model": str(run_dir), "--prompt": "p", "--layers": "the background|a dog", "--out": str(tmp_path / "o"),
            "--steps": "1", "--height": "32", "--width": "32"}
    base.update(dict(zip(args[::2], args[1::2])))
    assert layerdiff_main(["sample", *(x for kv in base.items() for x in kv)]) == 2
    assert message in caplog.text and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ benchmark (python -m benchmarks.sample)


def test_storage_peak_sees_cpu_allocations():
    from benchmarks.sample import StoragePeak

    with StoragePeak() as tracker:
        a = torch.zeros(1024, 256)  # 1 MiB
        b = torch.zeros(1024, 256)
        del a, b
        c = torch.zeros(1024, 128)  # 0.5 MiB, after the two above were freed
    assert tracker.peak == 2 * 2**20 and tracker.current == c.nbytes


def test_non_ddim_scheduler_is_replaced_by_ddim_with_a_warning(pipe, recwarn):
    from diffusers import DDIMScheduler, DDPMScheduler

    with pytest.warns(UserWarning, match="DDPMScheduler is replaced by a DDIMScheduler"):
        other = LayerDiffPipeline(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                  tokenizer=pipe.tokenizer, scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    assert isinstance(other.scheduler, DDIMScheduler)
    assert other.scheduler.config.beta_schedule == pipe.scheduler.config.beta_schedule
    recwarn.clear()
    LayerDiffPipeline(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                      scheduler=pipe.scheduler)
    assert not [w for w in recwarn if "DDIMScheduler" in str(w.message)]  # DDIM itself: no warning
