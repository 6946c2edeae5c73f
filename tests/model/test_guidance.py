"""model.sampling.guidance: CFG, x0 prediction, blur, one-hot masks, SMG variants (Eqs. 6–9: sides, plain /
mask-normalised blur, SAG / paper combination), SAG mask, x0 swap."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from model.sampling import guidance as G

B, L, C, H, W = 2, 3, 4, 8, 8


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_cfg_identities():
    u, c = rand(B, L, C, H, W, seed=1), rand(B, L, C, H, W, seed=2)
    assert torch.equal(G.cfg(u, c, 0.0), u)
    assert torch.allclose(G.cfg(u, c, 1.0), c, atol=1e-6)
    assert torch.allclose(G.cfg(u, c, 3.0), u + 3 * (c - u), atol=1e-6)


def test_predict_x0_inverts_add_noise_with_per_layer_alpha():
    x0, eps = rand(B, L, C, H, W, seed=1), rand(B, L, C, H, W, seed=2)
    alpha = torch.rand(B, L, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.05  # (B, L)
    x_t = G.add_noise(x0, eps, alpha)
    # layer (1, 2) was noised with its own ᾱ
    a = alpha[1, 2]
    assert torch.allclose(x_t[1, 2], a.sqrt() * x0[1, 2] + (1 - a).sqrt() * eps[1, 2])
    assert torch.allclose(G.predict_x0(x_t, eps, alpha), x0, atol=1e-5)
    with pytest.raises(ValueError, match="broadcast"):
        G.predict_x0(x_t, eps, torch.rand(L, B))


def test_predict_x0_matches_ddim_scheduler():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(10)
    t = sched.timesteps[3]
    x_t, eps = rand(1, 4, H, W, seed=4), rand(1, 4, H, W, seed=5)
    out = sched.step(eps, t, x_t)
    assert torch.allclose(G.predict_x0(x_t, eps, sched.alphas_cumprod[t]), out.pred_original_sample, atol=1e-5)


def test_gaussian_blur_keeps_constants_and_mean_and_smooths():
    const = torch.full((2, 3, 40, 40), 0.7)
    assert torch.allclose(G.gaussian_blur(const, 31, 3.0), const, atol=1e-6)
    x = rand(2, 3, 64, 64, seed=6)
    y = G.gaussian_blur(x, 31, 3.0)
    assert y.shape == x.shape
    assert torch.allclose(y.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=0.02)
    assert y.std() < 0.3 * x.std()  # σ=3 removes most white noise
    # an impulse spreads into the normalised separable Gaussian
    imp = torch.zeros(1, 1, 41, 41)
    imp[0, 0, 20, 20] = 1.0
    blurred = G.gaussian_blur(imp, 31, 3.0)
    taps = G.gaussian_kernel1d(31, 3.0)
    assert math.isclose(float(blurred.sum()), 1.0, rel_tol=1e-5)
    assert torch.allclose(blurred[0, 0, 20, 5:36], taps[15] * taps, atol=1e-7)
    # tiny latents (smaller than the kernel) still work: replicated borders
    small = rand(1, 4, 4, 4, seed=7)
    assert G.gaussian_blur(small, 31, 3.0).shape == small.shape
    with pytest.raises(ValueError, match="odd"):
        G.gaussian_blur(x, 30, 3.0)
    with pytest.raises(ValueError, match="sigma"):
        G.gaussian_blur(x, 31, 0.0)


def test_layer_masks_from_x0_one_hot_argmax():
    pixels = rand(B, L, 3, H, W, seed=8)
    masks = G.layer_masks_from_x0(pixels)
    assert masks.shape == (B, L, 1, H, W)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(dim=1), torch.ones(B, 1, H, W))  # exactly one layer per pixel
    winner = pixels.mean(dim=2).argmax(dim=1)  # channel mean, then arg-max over layers
    assert torch.equal(masks[:, :, 0].argmax(dim=1), winner)
    # a padding layer never wins, even with the largest values
    loud = pixels.clone()
    loud[:, 2] = 100.0
    valid = torch.tensor([[True, True, False]] * B)
    masks = G.layer_masks_from_x0(loud, valid)
    assert masks[:, 2].sum() == 0 and torch.equal(masks.sum(dim=1), torch.ones(B, 1, H, W))


def test_resize_masks_area_fraction():
    m = torch.zeros(1, 2, 1, 8, 8)
    m[0, 0, 0, :4, :] = 1.0  # top half → layer 0
    m[0, 1] = 1 - m[0, 0]
    small = G.resize_masks(m, (2, 2))
    assert torch.equal(small[0, 0, 0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert torch.allclose(small.sum(dim=1), torch.ones(1, 1, 2, 2))


def _smg_inputs():
    z_t, eps = rand(B, L, C, H, W, seed=10), rand(B, L, C, H, W, seed=11)
    alpha = torch.full((B, L), 0.5)
    masks = torch.zeros(B, L, 1, H, W)
    masks[:, :, :, : H // 2] = 1.0  # top half marked
    return z_t, eps, alpha, masks


def test_smg_degrade_sides_swap_roles():
    z_t, eps, alpha, masks = _smg_inputs()
    inside = G.smg_degrade(z_t, eps, alpha, masks, 31, 3.0, side="inside")
    outside = G.smg_degrade(z_t, eps, alpha, masks, 31, 3.0, side="outside")
    top, bottom = slice(0, H // 2), slice(H // 2, H)
    # inside: z_t kept outside the mask, concealed inside; outside: the opposite (Eq. 9 as printed)
    assert torch.equal(inside[..., bottom, :], z_t[..., bottom, :])
    assert not torch.allclose(inside[..., top, :], z_t[..., top, :])
    assert torch.equal(outside[..., top, :], z_t[..., top, :])
    assert not torch.allclose(outside[..., bottom, :], z_t[..., bottom, :])
    # the concealed part is exactly Eqs. 6–8: blurred x̂_0 re-noised with ε
    expected = G.add_noise(G.gaussian_blur(G.predict_x0(z_t, eps, alpha), 31, 3.0), eps, alpha)
    assert torch.allclose(inside[..., top, :], expected[..., top, :], atol=1e-6)
    assert torch.allclose(outside[..., bottom, :], expected[..., bottom, :], atol=1e-6)
    # the two sides partition the latent: together they are the fully concealed and the original latent
    assert torch.allclose(inside + outside, z_t + expected, atol=1e-6)
    with pytest.raises(ValueError, match="side"):
        G.smg_degrade(z_t, eps, alpha, masks, side="both")  # type: ignore[arg-type]


def test_smg_degrade_fresh_noise_and_mask_shape_check():
    z_t, eps, alpha, masks = _smg_inputs()
    noise = rand(B, L, C, H, W, seed=12)
    out = G.smg_degrade(z_t, eps, alpha, masks, noise=noise)
    expected = G.add_noise(G.gaussian_blur(G.predict_x0(z_t, eps, alpha), 31, 3.0), noise, alpha)
    assert torch.allclose(out[..., : H // 2, :], expected[..., : H // 2, :], atol=1e-6)
    with pytest.raises(ValueError, match="masks"):
        G.smg_degrade(z_t, eps, alpha, masks[:, :2])


def test_smg_combine_identities():
    e_cfg, e_base, e_deg = rand(B, L, C, H, W, seed=13), rand(B, L, C, H, W, seed=14), rand(B, L, C, H, W, seed=15)
    assert torch.equal(G.smg_combine(e_cfg, e_base, e_deg, 0.0), e_cfg)
    assert torch.equal(G.smg_combine(e_cfg, e_base, e_base, 3.0), e_cfg)  # nothing degraded → no push
    assert torch.allclose(G.smg_combine(e_cfg, e_base, e_deg, 3.0), e_cfg + 3 * (e_base - e_deg), atol=1e-6)
    # the paper's stand-alone form ε̂ + (1+s)(ε − ε̂) is the same rule with ε_cfg = ε_base = ε
    s = 2.0
    assert torch.allclose(G.smg_combine(e_base, e_base, e_deg, s), e_deg + (1 + s) * (e_base - e_deg), atol=1e-6)


def _flat_layer(texture: bool = False, size: int = 8):
    """A layer's x̂_0 (1, 1, 4, s, s): a flat colour (or a two-tone checkerboard of it) inside a centred square
    mask, grey fill (0) outside — what a flat synthetic object's layer latent looks like."""
    colour = torch.tensor([1.0, -0.5, 0.3, 0.8]).view(1, 1, 4, 1, 1)
    mask = torch.zeros(1, 1, 1, size, size)
    mask[..., 2:size - 2, 2:size - 2] = 1.0
    x0 = colour.expand(1, 1, 4, size, size).clone()
    if texture:
        check = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2  # (s, s) 0/1
        x0 = x0 * (1 + 0.5 * (2 * check - 1))  # ±50 % around the colour, mean = the colour
    return x0 * mask, mask, colour


def _degrade_x0(x0, mask, **kw):
    """Blurred x̂_0 as the degraded latent carries it: ᾱ = 1 makes z_t = x̂_0 (no noise to strip)."""
    return G.smg_degrade(x0, torch.zeros_like(x0), 1.0, mask, 31, 3.0, **kw)


def test_normalized_blur_keeps_a_flat_layer_and_plain_blur_pulls_the_fill_in():
    x0, mask, colour = _flat_layer()
    inside = mask.bool().expand_as(x0)
    normalized = _degrade_x0(x0, mask, side="inside", blur="normalized")
    plain = _degrade_x0(x0, mask, side="inside", blur="plain")
    # mask-normalised: only the layer's own (flat) content is averaged → nothing changes, colour included
    assert torch.allclose(normalized, x0, atol=1e-5)
    # plain: the grey fill outside is pulled in; the colour inside shrinks toward 0 (what SMG then pushes away)
    shrink = plain[inside].abs().sum() / x0[inside].abs().sum()
    assert shrink < 0.8
    assert torch.equal(plain[~inside], x0[~inside])  # outside kept (Eq. 9)
    # the mean colour inside: kept by the normalised blur, lost by the plain one
    mean_in = lambda z: (z * mask).sum(dim=(-2, -1)) / mask.sum()  # noqa: E731  (1, 1, 4)
    assert torch.allclose(mean_in(normalized), colour.view(1, 1, 4), atol=1e-5)
    assert not torch.allclose(mean_in(plain), colour.view(1, 1, 4), atol=0.1)


def test_normalized_blur_conceals_texture_but_keeps_its_mean():
    x0, mask, colour = _flat_layer(texture=True)
    inside = mask.bool()[0, 0, 0]  # (s, s)
    out = _degrade_x0(x0, mask, side="inside", blur="normalized")
    spread = lambda z: z[0, 0][:, inside].std(dim=1)  # noqa: E731  per channel, inside the mask
    assert (spread(out) < 0.3 * spread(x0)).all()  # the checkerboard is mostly gone
    mean = out[0, 0][:, inside].mean(dim=1)
    assert torch.allclose(mean, x0[0, 0][:, inside].mean(dim=1), atol=0.05)  # …its colour is not
    assert torch.allclose(mean, colour.view(4), atol=0.05)


def test_normalized_blur_outside_averages_only_the_outside():
    x0, mask, colour = _flat_layer()
    x0 = x0 + (1 - mask) * torch.tensor([-1.0, 0.0, 0.5, 0.2]).view(1, 1, 4, 1, 1)  # flat fill of another value
    outside = _degrade_x0(x0, mask, side="outside", blur="normalized")
    assert torch.allclose(outside, x0, atol=1e-5)  # both regions flat: nothing to conceal on either side
    plain = _degrade_x0(x0, mask, side="outside", blur="plain")
    out_region = ~mask.bool().expand_as(x0)
    assert torch.equal(plain[~out_region], x0[~out_region])  # the layer itself kept (Eq. 9 as printed)
    assert not torch.allclose(plain[out_region], x0[out_region], atol=0.05)  # the colour leaks out


def test_normalized_blur_with_an_empty_region_keeps_x0():
    x = rand(1, 1, 4, 8, 8, seed=20)
    assert torch.equal(G.normalized_blur(x, torch.zeros(1, 1, 1, 8, 8)), x)


def test_smg_config_validates_and_names():
    assert G.SMGConfig().name == "out-plain-neg-cfg-sag"  # Eq. 9 as printed (learn-bench's pick)
    assert G.SMGConfig(degrade_from="uncond").needs_uncond and G.SMGConfig(masks_from="uncond").needs_uncond
    assert not G.SMGConfig(degrade_from="cond", masks_from="negative").needs_uncond
    for bad, match in ((dict(side="both"), "side"), (dict(blur="box"), "blur"), (dict(degrade_from="cfg"),
                       "degrade_from"), (dict(masks_from="x"), "masks_from"), (dict(combine="sum"), "combine"),
                       (dict(kernel=4), "odd"), (dict(sigma=0.0), "sigma")):
        with pytest.raises(ValueError, match=match):
            G.SMGConfig(**bad)


def test_smg_blur_scales_with_the_latent_size_from_the_papers_geometry():
    """31 / 3 at the paper's 32² latents; the same fraction of the image at other sizes; in latent pixels when
    blur_reference is None (the "absolute" variant)."""
    smg = G.SMGConfig()
    assert smg.blur_at((32, 32)) == (31, 3.0)
    assert smg.blur_at((8, 8)) == (9, 0.75)  # learn-bench's 64² images
    assert smg.blur_at((64, 96)) == (61, 6.0)  # the shorter side sets the scale
    assert smg.blur_at((2, 2)) == (3, 0.1875)  # never below a 3-tap kernel
    assert G.SMG_VARIANTS["absolute"].blur_at((8, 8)) == (31, 3.0)
    assert G.SMG_VARIANTS["absolute"].name.endswith("-abs") and not smg.name.endswith("-abs")
    for bad in (0, -32, 2.5, True):
        with pytest.raises(ValueError, match="blur_reference"):
            G.SMGConfig(blur_reference=bad)


def test_smg_combine_sag_and_paper_rules():
    e_cfg, e_src, e_deg = rand(B, L, C, H, W, seed=21), rand(B, L, C, H, W, seed=22), rand(B, L, C, H, W, seed=23)
    s = 3.0
    paper = G.smg_combine(e_cfg, e_src, e_deg, s, "paper")
    assert torch.allclose(paper, e_deg + (1 + s) * (e_cfg - e_deg), atol=1e-5)
    assert torch.allclose(G.smg_combine(e_cfg, e_src, e_deg, s, "sag"), e_cfg + s * (e_src - e_deg), atol=1e-5)
    # the two differ unless the degraded branch is the guided prediction itself; both are ε_cfg at s = 0
    assert not torch.allclose(paper, G.smg_combine(e_cfg, e_src, e_deg, s, "sag"), atol=1e-3)
    assert torch.allclose(G.smg_combine(e_cfg, e_cfg, e_deg, s, "paper"), G.smg_combine(e_cfg, e_cfg, e_deg, s),
                          atol=1e-5)
    for rule in G.COMBINES:
        assert torch.allclose(G.smg_combine(e_cfg, e_src, e_deg, 0.0, rule), e_cfg, atol=1e-6)
    with pytest.raises(ValueError, match="combine"):
        G.smg_combine(e_cfg, e_src, e_deg, s, "sum")  # type: ignore[arg-type]


def test_sag_attention_mask_and_degrade():
    heads, n, hw = 2, 3, (2, 2)
    probs = torch.full((n * heads, 4, 4), 0.25)  # uniform attention: every key gets a total of 1 → not set
    probs[0:heads, :, 1] += 0.5  # sample 0: key 1 attended more
    probs[0:heads, :, 0] -= 0.5
    mask = G.sag_attention_mask(probs, heads, hw, (4, 4))
    assert mask.shape == (n, 1, 4, 4)
    assert mask[0, 0, 0:2, 2:4].eq(1).all() and mask[0].sum() == 4  # key 1 = top-right 2×2 cell
    assert mask[1:].sum() == 0
    with pytest.raises(ValueError, match="heads"):
        G.sag_attention_mask(probs, 4, (3, 3), (4, 4))
    z_t, eps, alpha, masks = _smg_inputs()
    assert torch.equal(G.sag_degrade(z_t, eps, alpha, torch.zeros_like(masks)), z_t)


def test_replace_x0_after_ddim_step():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(5)
    t, t_prev = sched.timesteps[1], sched.timesteps[2]
    x_t, eps, x0_new = rand(B, L, C, H, W, seed=16), rand(B, L, C, H, W, seed=17), rand(B, L, C, H, W, seed=18)
    out = sched.step(eps, t, x_t)
    where = torch.zeros(1, L, 1, 1, 1, dtype=torch.bool)
    where[:, 1] = True
    prev = G.replace_x0(out.prev_sample, out.pred_original_sample, x0_new, sched.alphas_cumprod[t_prev], where)
    a_prev = sched.alphas_cumprod[t_prev]
    expected = a_prev.sqrt() * x0_new[:, 1] + (1 - a_prev).sqrt() * eps[:, 1]  # Song et al. Eq. 12, η = 0
    assert torch.allclose(prev[:, 1], expected, atol=1e-5)
    assert torch.equal(prev[:, [0, 2]], out.prev_sample[:, [0, 2]])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_check_scale_rejects(bad):
    with pytest.raises(ValueError, match="smg_scale"):
        G.check_scale("smg_scale", bad)
    assert G.check_scale("smg_scale", 0) == 0.0
