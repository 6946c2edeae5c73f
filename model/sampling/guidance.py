"""Guidance as pure functions of noise predictions: CFG (with the paper's negative prompts), self-mask guidance
(paper Eqs. 6–9), a SAG variant, and the DDIM x0 replacement that keeps known layers (Appendix D).

Nothing here calls a model or a scheduler: the pipeline (model/pipeline.py) runs the UNet and the VAE and hands
the predictions to these functions. Conventions:

* latents `x_t` are ε-parameterised: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (Eq. 1); x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t (Eq. 3);
* `alpha_bar` is a float or a tensor that broadcasts against the latents from the left, e.g. (B, L) per-layer
  ᾱ for latents (B, L, C, h, w) (trailing singleton axes are added here);
* masks are in [0, 1] with one channel, broadcast over the latent channels.

Self-mask guidance has several readings of the paper (§4.2, Eqs. 6–9); `SMGConfig` names one of each choice:
which side of the mask is blurred, a plain or a mask-normalised blur, which branch's prediction gives the
blurred x̂_0, the degraded pass and the masks, and the SAG-style or the paper's literal combination. With
s = 0 nothing changes under any of them. Which one is the default, and why, is in docs/learn_bench.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from mlcid.schema import BACKGROUND_PROMPT

BlurSide = Literal["inside", "outside"]
BLUR_SIDES: tuple[str, ...] = ("inside", "outside")
BlurKind = Literal["plain", "normalized"]
BLUR_KINDS: tuple[str, ...] = ("plain", "normalized")
Branch = Literal["uncond", "negative", "cond"]
BRANCHES: tuple[str, ...] = ("uncond", "negative", "cond")
MASK_SOURCES: tuple[str, ...] = ("cfg", *BRANCHES)  # "cfg": the guided prediction
Combine = Literal["sag", "paper"]
COMBINES: tuple[str, ...] = ("sag", "paper")
NORMALIZE_MIN_WEIGHT = 1e-3  # below this blurred mask weight a normalised blur keeps x̂_0 (nothing to average)
SMG_KERNEL, SMG_SIGMA = 31, 3.0  # Appendix A
SMG_BLUR_REFERENCE = 32  # the latent side those apply at: the paper's 256² images through SD's ×8 VAE (§5.1)
SAG_KERNEL, SAG_SIGMA = 9, 1.0  # SAG's defaults (diffusers' StableDiffusionSAGPipeline)
SAG_ATTENTION_THRESHOLD = 1.0  # SAG: a query position is "attended to" when its summed attention exceeds 1


def _broadcast(alpha_bar: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """ᾱ as a tensor on `like`'s device/dtype with trailing singleton axes up to `like.ndim`."""
    a = torch.as_tensor(alpha_bar, device=like.device, dtype=like.dtype)
    if a.ndim > like.ndim or tuple(a.shape) != tuple(like.shape[: a.ndim]) and a.numel() != 1:
        raise ValueError(f"alpha_bar of shape {tuple(a.shape)} does not broadcast from the left against "
                         f"latents {tuple(like.shape)}")
    return a.reshape(*a.shape, *([1] * (like.ndim - a.ndim)))


def check_scale(name: str, scale: float) -> float:
    """A finite, non-negative guidance scale, else `ValueError` naming it."""
    value = float(scale)
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {scale!r}")
    return value


# ------------------------------------------------------------------------------------------------ basics


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε_u + w·(ε_c − ε_u) (w = 1: the conditional prediction)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Eq. 3 / Eq. 6: x̂_0 = (x_t − √(1−ᾱ)·ε) / √ᾱ."""
    a = _broadcast(alpha_bar, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Eq. 1 / Eq. 8: x_t = √ᾱ·x_0 + √(1−ᾱ)·ε."""
    a = _broadcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def gaussian_kernel1d(kernel: int, sigma: float, device=None, dtype=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps (sum 1), length `kernel` (odd)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {kernel}")
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    half = (kernel - 1) / 2
    x = torch.linspace(-half, half, kernel, device=device, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(dtype or torch.float32)


def gaussian_blur(x: torch.Tensor, kernel: int = SMG_KERNEL, sigma: float = SMG_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur over the last two axes of `x` (any leading axes), size-preserving.

    Borders are reflected (as SAG does) when the image is larger than half the kernel, else replicated
    (reflection needs pad < size: tiny latents). Taps sum to 1, so a constant image is left unchanged.
    """
    *lead, h, w = x.shape
    taps = gaussian_kernel1d(kernel, sigma, device=x.device, dtype=x.dtype)
    pad = kernel // 2
    flat = x.reshape(-1, 1, h, w)  # (N, 1, h, w)
    mode = "reflect" if pad < h and pad < w else "replicate"
    flat = F.pad(flat, (pad, pad, pad, pad), mode=mode)
    flat = F.conv2d(flat, taps.view(1, 1, 1, kernel))  # blur along w
    flat = F.conv2d(flat, taps.view(1, 1, kernel, 1))  # blur along h
    return flat.reshape(*lead, h, w)


# ------------------------------------------------------------------------------------------------ masks


def layer_masks_from_x0(mask_pixels: torch.Tensor, layer_valid: torch.Tensor | None = None) -> torch.Tensor:
    """§4.1 binary masks: decoded mask images (B, L, 3, H, W) → channel mean → arg-max over layers → one-hot
    (B, L, 1, H, W) float. Padding layers (`layer_valid` (B, L) False) never win."""
    if mask_pixels.ndim != 5:
        raise ValueError(f"mask_pixels must be (B, L, C, H, W), got {tuple(mask_pixels.shape)}")
    score = mask_pixels.float().mean(dim=2)  # (B, L, H, W)
    if layer_valid is not None:
        score = score.masked_fill(~layer_valid.to(score.device, torch.bool)[:, :, None, None], float("-inf"))
    winner = score.argmax(dim=1)  # (B, H, W)
    one_hot = F.one_hot(winner, num_classes=mask_pixels.shape[1])  # (B, H, W, L)
    return rearrange(one_hot, "b h w l -> b l 1 h w").to(mask_pixels.dtype)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (B, L, 1, H, W) → (B, L, 1, h, w) by area averaging (a latent cell gets its covered fraction)."""
    B, L = masks.shape[:2]
    flat = rearrange(masks, "b l c h w -> (b l) c h w")
    if tuple(flat.shape[-2:]) != tuple(size):
        flat = F.interpolate(flat, size=size, mode="area")
    return rearrange(flat, "(b l) c h w -> b l c h w", b=B, l=L)


# ------------------------------------------------------------------------------------------------ SMG / SAG


def normalized_blur(x: torch.Tensor, weight: torch.Tensor, kernel: int = SMG_KERNEL,
                    sigma: float = SMG_SIGMA) -> torch.Tensor:
    """Mask-normalised blur G(x·w) / G(w): a blur that averages only where `weight` (broadcasts against x,
    e.g. (B, L, 1, h, w) in [0, 1]) is set, so what lies outside the region never leaks in. A flat region stays
    flat at its own value; only its variation is concealed. Where G(w) < NORMALIZE_MIN_WEIGHT x is kept."""
    w = weight.to(x.dtype).expand_as(x)
    num, den = gaussian_blur(x * w, kernel, sigma), gaussian_blur(w, kernel, sigma)
    return torch.where(den > NORMALIZE_MIN_WEIGHT, num / den.clamp_min(NORMALIZE_MIN_WEIGHT), x)


def blur_degrade(
    z_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    masks: torch.Tensor,
    kernel: int,
    sigma: float,
    side: BlurSide = "inside",
    noise: torch.Tensor | None = None,
    blur: BlurKind = "plain",
) -> torch.Tensor:
    """Conceal information on one side of `masks`: Eqs. 6–9.

    x̂_0 from (z_t, ε) (Eq. 6), blurred (Eq. 7), re-noised to the same level with `noise` (default ε, as SAG
    does; Eq. 8), and merged with z_t (Eq. 9). side="inside": blurred where mask = 1 and z_t kept outside (the
    paper's text); side="outside": z_t kept where mask = 1 and blurred outside (Eq. 9 as printed).
    blur="plain": G(x̂_0) (what lies across the mask edge is pulled in); "normalized": G(x̂_0·r)/G(r) over the
    blurred region r (only the region's own content is averaged).
    """
    if side not in BLUR_SIDES:
        raise ValueError(f"blur side must be one of {BLUR_SIDES}, got {side!r}")
    if blur not in BLUR_KINDS:
        raise ValueError(f"blur must be one of {BLUR_KINDS}, got {blur!r}")
    m = masks.to(z_t.dtype)
    blurred_where = m if side == "inside" else 1 - m
    x0 = predict_x0(z_t, eps, alpha_bar)  # Eq. 6
    if blur == "plain":
        x0_blur = gaussian_blur(x0, kernel, sigma)  # Eq. 7
    else:
        x0_blur = normalized_blur(x0, blurred_where, kernel, sigma)
    z_blur = add_noise(x0_blur, eps if noise is None else noise, alpha_bar)  # Eq. 8
    return blurred_where * z_blur + (1 - blurred_where) * z_t  # Eq. 9


@dataclass(frozen=True)
class SMGConfig:
    """One self-mask guidance variant (the scale is a separate sampling argument).

    side        "inside": blur where the layer's mask is set (the paper's text); "outside": Eq. 9 as printed.
    blur        "plain" Gaussian G(x̂_0), or "normalized" G(x̂_0·r)/G(r) over the blurred region r.
    degrade_from  the branch whose ε gives the blurred x̂_0 and whose prompts run the degraded pass: "uncond"
                (empty prompts; one more UNet call per step), "negative" (the CFG base with the paper's negatives)
                or "cond". Without CFG there is no negative branch and the conditional one stands in.
    masks_from  the prediction whose mask x̂_0 gives the layer masks: "cfg" (guided) or one of the branches.
    combine     "sag": ε̃ = ε_cfg + s·(ε_src − ε̂_src) (ε_src: that branch on z_t, ε̂_src: on the degraded
                latent); "paper": ε̃ = ε̂ + (1 + s)(ε_cfg − ε̂) literally, ε̂ = the degraded pass.
    kernel, sigma  the Gaussian (Appendix A: 31 / 3) at a latent side of `blur_reference`.
    blur_reference  the latent side (min(h, w)) at which kernel/sigma apply; at another side both scale with it, so
                the blur covers the same fraction of the image (`blur_at`). The paper's 31 / 3 is for 32² latents
                (256² images); at learn-bench's 8² latents it would blur over a third of the image and conceal the
                layout and colours rather than detail. None: kernel/sigma in latent pixels at every size.
    """

    # Default = Eq. 9 as printed (blur outside the mask, plain Gaussian) with the blur scaled to the latent size;
    # why, with the measurements, is in docs/learn_bench.md (fifth run: "the blur sized to the latents").
    side: BlurSide = "outside"
    blur: BlurKind = "plain"
    degrade_from: Branch = "negative"
    masks_from: str = "cfg"
    combine: Combine = "sag"
    kernel: int = SMG_KERNEL
    sigma: float = SMG_SIGMA
    blur_reference: int | None = SMG_BLUR_REFERENCE

    def __post_init__(self) -> None:
        for name, value, allowed in (("side", self.side, BLUR_SIDES), ("blur", self.blur, BLUR_KINDS),
                                     ("degrade_from", self.degrade_from, BRANCHES),
                                     ("masks_from", self.masks_from, MASK_SOURCES),
                                     ("combine", self.combine, COMBINES)):
            if value not in allowed:
                raise ValueError(f"SMGConfig.{name} must be one of {allowed}, got {value!r}")
        gaussian_kernel1d(self.kernel, self.sigma)  # raises on a bad kernel / sigma
        if self.blur_reference is not None and (isinstance(self.blur_reference, bool)
                                                or not isinstance(self.blur_reference, int) or self.blur_reference < 1):
            raise ValueError(f"SMGConfig.blur_reference must be a positive int or None, got {self.blur_reference!r}")

    def blur_at(self, latent_size: tuple[int, int]) -> tuple[int, float]:
        """(kernel, sigma) for latents of `latent_size` (h, w): scaled by min(h, w) / blur_reference (the kernel
        the odd size nearest to the scaled one, at least 3), or as given when blur_reference is None."""
        if self.blur_reference is None:
            return self.kernel, self.sigma
        scale = min(latent_size) / self.blur_reference
        half = max(1, round((self.kernel - 1) / 2 * scale))
        return 2 * half + 1, self.sigma * scale

    @property
    def needs_uncond(self) -> bool:
        """True when the empty-prompt branch must be predicted (one more UNet call per step)."""
        return "uncond" in (self.degrade_from, self.masks_from)

    @property
    def name(self) -> str:
        """Short label, e.g. "in-norm-neg-cfg-sag" (side, blur, degrade_from, masks_from, combine)."""
        short = {"inside": "in", "outside": "out", "plain": "plain", "normalized": "norm", "uncond": "unc",
                 "negative": "neg", "cond": "cond", "cfg": "cfg", "sag": "sag", "paper": "paper"}
        label = "-".join(short[v] for v in (self.side, self.blur, self.degrade_from, self.masks_from, self.combine))
        return label if self.blur_reference is not None else label + "-abs"


# The named SMG variants: what `layerdiff sample --smg-variant` offers and learn-bench's sweep compares.
SMG_VARIANTS: dict[str, SMGConfig] = {
    "default": SMGConfig(),  # Eq. 9 as printed: blur outside the mask, plain Gaussian
    "inside": SMGConfig(side="inside", blur="normalized"),  # the paper's text: blur inside, mask-normalised
    "uncond": SMGConfig(side="inside", blur="normalized", degrade_from="uncond", masks_from="uncond"),  # SAG's branch
    "paper": SMGConfig(side="inside", blur="normalized", combine="paper"),  # ε̂ + (1 + s)(ε − ε̂) literally
    "legacy": SMGConfig(side="inside", blur="plain"),  # plain blur inside: learn-bench's first SMG
    "absolute": SMGConfig(blur_reference=None),  # the default with 31 / 3 in latent pixels at every size (until 12-03)
}


def smg_variant(name: str) -> SMGConfig:
    """The named variant (ValueError naming the known ones)."""
    if name not in SMG_VARIANTS:
        raise ValueError(f"unknown SMG variant {name!r}; known: {', '.join(SMG_VARIANTS)}")
    return SMG_VARIANTS[name]


def smg_degrade(
    z_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    masks: torch.Tensor,
    kernel: int = SMG_KERNEL,
    sigma: float = SMG_SIGMA,
    side: BlurSide = "inside",
    noise: torch.Tensor | None = None,
    blur: BlurKind = "plain",
) -> torch.Tensor:
    """Self-mask guidance input: each layer's image latent z_t (B, L, 4, h, w) blurred on one side of its own
    predicted mask (B, L, 1, h, w) (Eqs. 6–9, kernel 31 / sigma 3 by default)."""
    if masks.shape[:2] != z_t.shape[:2] or masks.shape[-2:] != z_t.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} must be (B, L, 1, h, w) for latents {tuple(z_t.shape)}")
    return blur_degrade(z_t, eps, alpha_bar, masks, kernel, sigma, side, noise, blur)


def smg_combine(eps_cfg: torch.Tensor, eps_source: torch.Tensor, eps_degraded: torch.Tensor,
                scale: float, combine: Combine = "sag") -> torch.Tensor:
    """Push the guided ε away from the degraded pass.

    "sag": ε̃ = ε_cfg + s·(ε_source − ε_degraded), ε_source = the degrading branch on the undegraded latent (only
    what the blur concealed is amplified); "paper": ε̃ = ε̂ + (1 + s)(ε_cfg − ε̂) with ε̂ = ε_degraded (the
    paper's formula taken literally: the CFG direction is amplified by s too unless ε̂ comes from the same
    guided prediction)."""
    if combine == "sag":
        return eps_cfg + scale * (eps_source - eps_degraded)
    if combine == "paper":
        return eps_degraded + (1 + scale) * (eps_cfg - eps_degraded)
    raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


def sag_attention_mask(attn_probs: torch.Tensor, heads: int, map_size: tuple[int, int],
                       latent_size: tuple[int, int]) -> torch.Tensor:
    """SAG's mask from self-attention probabilities (N·heads, Q, K) of a (N, C, h', w') feature map:
    mean over heads, sum over queries, > 1 → (N, 1, h, w) float at latent size (nearest upsampling)."""
    nh, q, k = attn_probs.shape
    if nh % heads or q != map_size[0] * map_size[1]:
        raise ValueError(f"attention probs {tuple(attn_probs.shape)} do not fit {heads} heads over a "
                         f"{map_size} map")
    probs = rearrange(attn_probs, "(n h) q k -> n h q k", h=heads)
    attended = probs.mean(dim=1).sum(dim=1) > SAG_ATTENTION_THRESHOLD  # (N, K)
    mask = rearrange(attended, "n (y x) -> n 1 y x", y=map_size[0], x=map_size[1]).to(attn_probs.dtype)
    return F.interpolate(mask, size=latent_size)  # (N, 1, h, w)


def sag_degrade(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float, attn_mask: torch.Tensor,
                kernel: int = SAG_KERNEL, sigma: float = SAG_SIGMA) -> torch.Tensor:
    """SAG-style input for the Table 3 ablation: blur x̂_0 where the self-attention mask (B, L, 1, h, w) is set,
    re-noise with ε, keep z_t elsewhere (Hong et al., as in diffusers' SAG pipeline)."""
    return blur_degrade(z_t, eps, alpha_bar, attn_mask, kernel, sigma, side="inside")


# ------------------------------------------------------------------------------------------------ x0 replacement


def replace_x0(prev_sample: torch.Tensor, x0_pred: torch.Tensor, x0_new: torch.Tensor,
               alpha_bar_prev: torch.Tensor | float, where: torch.Tensor) -> torch.Tensor:
    """Swap the predicted x_0 in a finished DDIM step (Song et al. Eq. 12) for `x0_new` where `where` is True.

    DDIM: x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1−ᾱ_{t−1}−σ²)·ε + σ·z, so replacing x̂_0 adds √ᾱ_{t−1}·(x0_new − x̂_0) and
    keeps the model's ε term. `where` broadcasts against the latents (e.g. (B, L, C, 1, 1) bool).
    """
    a = _broadcast(alpha_bar_prev, prev_sample)
    return torch.where(where, prev_sample + a.sqrt() * (x0_new - x0_pred), prev_sample)


# ------------------------------------------------------------------------------------------------ CFG negatives, kept layers


def paper_negatives(layer_prompts: list[str]) -> tuple[str, list[str]]:
    """§5.2 negatives: global and background = the foreground prompts joined; each foreground = "the background"."""
    joined = ", ".join(layer_prompts[1:])
    return joined, [joined] + [BACKGROUND_PROMPT] * (len(layer_prompts) - 1)


@dataclass
class KeepLayers:
    """Known clean latents whose predicted x0 replaces the model's (Appendix D): image latents of
    `image_layers` at every step, mask latents of `mask_layers` during the first `mask_steps` steps
    (None: every step)."""

    latents: torch.Tensor  # (B, L, 8, h, w) clean latents (image ‖ mask)
    image_layers: tuple[int, ...] = ()
    mask_layers: tuple[int, ...] = ()
    mask_steps: int | None = None

    def where(self, step: int, latent_channels: int) -> torch.Tensor:
        """(1, L, 8, 1, 1) bool: the channels whose x0 is replaced at loop step `step` (0-based)."""
        L = self.latents.shape[1]
        sel = torch.zeros(1, L, 2 * latent_channels, 1, 1, dtype=torch.bool, device=self.latents.device)
        sel[:, list(self.image_layers), :latent_channels] = True
        if self.mask_steps is None or step < self.mask_steps:
            sel[:, list(self.mask_layers), latent_channels:] = True
        return sel
