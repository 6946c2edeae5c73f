"""LayerDiffPipeline: DDIM sampling of layered images with CFG + self-mask guidance (paper §4.1, §4.2, §5.2).

    pipe = LayerDiffPipeline.from_pretrained("runs/layerdiff")            # a run folder written by model.training.trainer
    out = pipe("a dog on the grass", ["the background", "a dog"], generator=torch.Generator().manual_seed(0))
    out.composites[0].save("composite.png")

Per step: one batched UNet call for the conditional and negative-prompt branches (CFG, paper negatives; plus
empty prompts when the SMG variant reads them), then — with self-guidance — one call on the degraded latents
(it depends on the first call's output, so it cannot join it). What the UNet derives from the prompts alone (the
enhanced layer prompts, the intra-layer keys/values) is prepared once per call (`LayerDiffUNet.prepare_text`). The model predicts, the scheduler steps, `model.sampling.guidance` combines, this file loops.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.models.attention_processor import Attention
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange
from PIL import Image

from mlcid.composite import composite as composite_eq4
from model.sampling import guidance as G
from model.sampling.guidance import KeepLayers, SMGConfig, paper_negatives  # noqa: F401 (part of this module's API)
from model.loading import check_run_folder, encode_prompts
from model.training.run_folder import fetch_pipeline_folder
from model.network.unet import LayerDiffUNet, PreparedText  # LayerDiffUNet imported so diffusers can load the run's ["model.network.unet", "LayerDiffUNet"]
from model.sampling.output import Intermediate, LayerDiffPipelineOutput  # noqa: F401 (part of this module's API)

log = logging.getLogger(__name__)
OUTPUT_TYPES = ("pil", "np", "latent")
SELF_GUIDANCE = {"cfg": None, "cfg+smg": "_smg_latents", "cfg+sag": "_sag_latents"}  # mode → degrader method
# Tensors `callback_on_step_end` may ask for (diffusers' `callback_on_step_end_tensor_inputs`), all (B, L, 8, h, w):
# "latents" x_{t-1} after the step (and after any x0 replacement), "noise_pred" the guided ε the scheduler stepped
# with, "pred_original_sample" the scheduler's x̂_0 before any replacement.
CALLBACK_TENSOR_INPUTS = ("latents", "noise_pred", "pred_original_sample")


class _StoreAttentionProcessor:
    """Self-attention processor that keeps its attention probabilities (for the SAG ablation), one list per
    denoising step (one entry per UNet chunk)."""

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (N·heads, Q, d)
        key = attn.head_to_batch_dim(attn.to_k(hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (N·heads, Q, K)
        self.probs.append(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class _LoopState:
    """Per-call state of the self-guidance: the last predicted masks, the SAG attention store."""

    masks: torch.Tensor | None = None  # (B, L, 1, h, w) latent-resolution layer masks
    store: _StoreAttentionProcessor | None = None
    map_size: tuple[int, int] | None = None


class LayerDiffPipeline(DiffusionPipeline):
    """Text → layered image: background + foreground layers, each an RGB image and a mask (paper Fig. 2)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    cache_text = True  # False: prompt-derived UNet inputs recomputed every step (as before the cache; same outputs)

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, training_resolution: int | None = None):
        super().__init__()
        self.register_to_config(training_resolution=training_resolution)  # px; the default sampling size
        if not isinstance(unet, LayerDiffUNet):
            raise ValueError(f"LayerDiffPipeline needs a LayerDiffUNet, got {type(unet).__name__}")
        if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"LayerDiff predicts ε; scheduler prediction_type is {scheduler.config.prediction_type!r}")
        if not isinstance(scheduler, DDIMScheduler):  # §5.2 samples with DDIM; the x0 replacement assumes it
            warnings.warn(f"LayerDiffPipeline samples with DDIM (paper §5.2; the layer editing's x0 replacement is "
                          f"DDIM's Eq. 12): the given {type(scheduler).__name__} is replaced by a DDIMScheduler "
                          "with its config", UserWarning, stacklevel=2)
            scheduler = DDIMScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    # ------------------------------------------------------------------ loading
    @classmethod
    def check_run_folder(cls, folder: str | Path) -> Path:
        """Raise ValueError unless `folder` is a LayerDiff run folder (`model.loading.check_run_folder`)."""
        return check_run_folder(folder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "LayerDiffPipeline":
        """Load a run folder through diffusers (checked first; no remote code, no custom pipelines). A URL
        (`s3://bucket/runs/x`, any fsspec URL) is downloaded to the local cache first."""
        for forbidden in ("trust_remote_code", "custom_pipeline"):
            if kwargs.get(forbidden):
                raise ValueError(f"{forbidden} is not supported by LayerDiffPipeline")
        path = cls.check_run_folder(fetch_pipeline_folder(pretrained_model_name_or_path))
        return super().from_pretrained(str(path), **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' `load_config`, reading a run folder's custom-pipeline `_class_name` (model.hub.RUN_CLASS_NAME,
        for plain `DiffusionPipeline` users) as this class: the folder's pipeline.py is never executed here."""
        from model.hub import RUN_CLASS_NAME

        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if config.get("_class_name") == RUN_CLASS_NAME:
            config["_class_name"] = cls.__name__
        return out

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """diffusers' save, then the hub files (model card, pipeline.py entry, `_class_name`; see model.hub)."""
        from model.hub import ModelCardInfo, write_run_files

        super().save_pretrained(save_directory, *args, **kwargs)
        write_run_files(save_directory, ModelCardInfo(resolution=self.config.training_resolution,
                                                      max_layers=int(self.unet.config.max_layers)))

    @classmethod
    def from_sd(cls, sd: str | Path, max_layers: int = 4, dtype: torch.dtype = torch.float32,
                **unet_options: Any) -> "LayerDiffPipeline":
        """An UNTRAINED LayerDiff initialised from an SD-1.x folder or hub id (Appendix A): for tests and demos
        before a run exists. `save_pretrained(folder)` makes it a run folder that `from_pretrained` loads."""
        from model.loading import load_sd_components

        c = load_sd_components(sd, dtype, unet_in_channels=4)
        unet = LayerDiffUNet.from_unet(c.unet, max_layers=max_layers, **unet_options)
        return cls(unet=unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, scheduler=c.scheduler)

    # ------------------------------------------------------------------ sizes and codecs
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.latent_channels)

    @property
    def default_size(self) -> int:
        """The run's training resolution when recorded, else the UNet's native size."""
        trained = self.config.get("training_resolution")
        return int(trained) if trained else int(self.unet.unet.config.sample_size) * self.vae_scale_factor

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, L, 3, H, W) in [-1, 1] → latents (B, L, 4, h, w) = posterior mode × scaling (deterministic)."""
        B = pixels.shape[0]
        flat = rearrange(pixels, "b l c h w -> (b l) c h w").to(self._execution_device, self.vae.dtype)
        z = self.vae.encode(flat).latent_dist.mode() * self.vae.config.scaling_factor  # (B·L, 4, h, w)
        return rearrange(z, "(b l) c h w -> b l c h w", b=B)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, L, 4, h, w) → pixels (B, L, 3, H, W) in [-1, 1], `chunk` images per VAE call."""
        B = latents.shape[0]
        flat = rearrange(latents, "b l c h w -> (b l) c h w").to(self.vae.dtype) / self.vae.config.scaling_factor
        parts = [self.vae.decode(z).sample for z in flat.split(chunk or flat.shape[0])]
        return rearrange(torch.cat(parts).clamp(-1, 1), "(b l) c h w -> b l c h w", b=B)

    def prepare_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> torch.Tensor:
        """Set the scheduler's steps; with strength < 1 keep the last `int(steps·strength)` (SDEdit)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        keep = min(int(num_inference_steps * strength), num_inference_steps)
        return self.scheduler.timesteps[num_inference_steps - keep:]

    def alpha_bar(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """ᾱ_t on the execution device; a negative t (after the last DDIM step) gives the final ᾱ."""
        t = int(timestep)
        a = self.scheduler.alphas_cumprod[t] if t >= 0 else self.scheduler.final_alpha_cumprod
        return a.to(self._execution_device, torch.float32)

    def _prev_timestep(self, t: int) -> int:
        return t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, global_prompt, layer_prompts, num_inference_steps, guidance_scale, smg_scale, guidance,
                     smg, height, width, num_images, strength, output_type,
                     latents, smg_mask_interval, max_batch, eta=0.0, intermediate_every=1,
                     callback_tensor_inputs=("latents",), smg_start=0.0, smg_end=1.0) -> None:
        """Raise ValueError naming the first bad argument (before any model runs)."""
        if not isinstance(global_prompt, str) or not global_prompt.strip():
            raise ValueError(f"global_prompt must be a non-empty string describing the whole image (an empty one is "
                             f"the unconditional input CFG steers away from), got {global_prompt!r:.80}")
        if not layer_prompts:
            raise ValueError("no layer prompts: give the background prompt first, e.g. ['the background', 'a dog']")
        if isinstance(layer_prompts, str) or not all(isinstance(p, str) for p in layer_prompts):
            raise ValueError(f"layer_prompts must be a list of strings, got {layer_prompts!r:.200}")
        L, max_layers = len(layer_prompts), int(self.unet.config.max_layers)
        if L < 2:
            raise ValueError(f"need a background and at least one foreground layer prompt, got {L} prompt(s)")
        if L > max_layers:
            raise ValueError(f"{L} layer prompts exceed this model's max_layers={max_layers}")
        G.check_scale("guidance_scale", guidance_scale)
        G.check_scale("smg_scale", smg_scale)
        G.check_scale("eta", eta)
        if guidance not in SELF_GUIDANCE:
            raise ValueError(f"guidance must be one of {sorted(SELF_GUIDANCE)}, got {guidance!r}")
        if not isinstance(smg, SMGConfig):
            raise ValueError(f"smg must be a model.sampling.guidance.SMGConfig, got {type(smg).__name__}")
        for name, value in (("num_inference_steps", num_inference_steps), ("num_images", num_images),
                            ("smg_mask_interval", smg_mask_interval), ("intermediate_every", intermediate_every),
                            ("max_batch", 1 if max_batch is None else max_batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(f"{name} must be a positive multiple of {self.vae_scale_factor}, got {value!r}")
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(f"strength {strength} leaves no denoising step out of {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not 0.0 <= float(smg_start) < float(smg_end) <= 1.0:
            raise ValueError(f"need 0 <= smg_start < smg_end <= 1 (fractions of the steps), got {smg_start}, {smg_end}")
        if any(n not in CALLBACK_TENSOR_INPUTS for n in callback_tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs must name some of {CALLBACK_TENSOR_INPUTS}, "
                             f"got {callback_tensor_inputs!r}")
        shape = (num_images, L, 2 * self.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (B, L, image ‖ mask channels, h, w), "
                             f"got {tuple(latents.shape)}")

    @torch.no_grad()
    def encode_text(self, global_prompts: list[str], layer_prompts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each prompt separately (identical prompts once) → global (N, 77, D), layer (N, L, 77, D)."""
        N, L = len(layer_prompts), len(layer_prompts[0])
        flat = list(global_prompts) + [p for ps in layer_prompts for p in ps]
        unique = sorted(set(flat))
        emb = encode_prompts(self.tokenizer, self.text_encoder, unique).to(self._execution_device, self.unet.dtype)
        index = torch.tensor([unique.index(p) for p in flat], device=emb.device)
        all_emb = emb[index]  # (N + N·L, 77, D)
        return all_emb[:N], rearrange(all_emb[N:], "(n l) t d -> n l t d", n=N, l=L)

    # ------------------------------------------------------------------ model calls
    def _prepare_text(self, global_text: torch.Tensor, layer_text: torch.Tensor) -> PreparedText | tuple:
        """Global (N, 77, D) and layer (N, L, 77, D) prompts prepared once per call (unless `cache_text` is off)."""
        return self.unet.prepare_text(global_text, layer_text) if self.cache_text else (global_text, layer_text)

    @staticmethod
    def _text_rows(text: PreparedText | tuple, rows: slice) -> PreparedText | tuple:
        """The text inputs of samples `rows` (a branch, a chunk)."""
        return text[rows] if isinstance(text, PreparedText) else (text[0][rows], text[1][rows])

    def _predict(self, x: torch.Tensor, t: torch.Tensor, text: PreparedText | tuple,
                 max_batch: int | None) -> torch.Tensor:
        """UNet ε for x (N, L, 8, h, w) at timestep t, `text` from `_prepare_text`, `max_batch` samples per call."""
        n, outs = x.shape[0], []
        step = max_batch or n
        for i in range(0, n, step):
            part = self._text_rows(text, slice(i, i + step))
            prepared = part if isinstance(part, PreparedText) else None
            g, l = (part.global_text, part.layer_text) if prepared else part
            outs.append(self.unet(x[i:i + step].to(self.unet.dtype), t, g, l, prepared=prepared).sample)
        return torch.cat(outs).float()

    def _predicted_masks(self, mask_latents: torch.Tensor, mask_eps: torch.Tensor, alpha: torch.Tensor,
                         chunk: int | None) -> torch.Tensor:
        """§4.2: mask x̂_0 (Eq. 3) → VAE decode → channel mean → arg-max over layers → (B, L, 1, h, w) latent-size
        masks (area fractions of the one-hot pixel masks)."""
        x0 = G.predict_x0(mask_latents, mask_eps, alpha)  # (B, L, 4, h, w)
        pixels = self.decode_latents(x0, chunk)  # (B, L, 3, H, W)
        return G.resize_masks(G.layer_masks_from_x0(pixels), tuple(mask_latents.shape[-2:])).float()

    def _smg_latents(self, x, preds, alpha, step, state, opts) -> torch.Tensor:
        """Self-mask guidance input: image latents blurred on one side of each layer's predicted mask.
        `preds`: ε (B, L, 8, h, w) by source ("cfg", "cond", "negative", "uncond" where predicted)."""
        c, smg = self.latent_channels, opts["smg"]
        if state.masks is None or step % opts["smg_mask_interval"] == 0:
            mask_eps = preds[smg.masks_from][:, :, c:]
            state.masks = self._predicted_masks(x[:, :, c:], mask_eps, alpha, opts["vae_chunk"])
        kernel, sigma = smg.blur_at(tuple(x.shape[-2:]))
        degraded = G.smg_degrade(x[:, :, :c], preds[smg.degrade_from][:, :, :c], alpha, state.masks, kernel, sigma,
                                 smg.side, blur=smg.blur)
        return torch.cat([degraded, x[:, :, c:]], dim=2)  # (B, L, 8, h, w)

    def _sag_latents(self, x, preds, alpha, step, state, opts) -> torch.Tensor:
        """SAG ablation input: image latents blurred where the mid-block self-attention of the base branch is set."""
        c, B, L = self.latent_channels, x.shape[0], x.shape[1]
        probs = torch.cat(state.store.probs)  # (N·L·heads, Q, K) for the whole first call
        heads = self._sag_attention().heads
        per_sample = probs.shape[0] // (opts["branches"] * B)
        k = opts["sag_branch"]
        base = probs[k * B * per_sample:(k + 1) * B * per_sample]  # the negative (CFG base) branch's B samples
        masks = G.sag_attention_mask(base, heads, state.map_size, tuple(x.shape[-2:]))  # (B·L, 1, h, w)
        masks = rearrange(masks, "(b l) c h w -> b l c h w", b=B, l=L)
        degraded = G.sag_degrade(x[:, :, :c], preds["negative"][:, :, :c], alpha, masks)
        return torch.cat([degraded, x[:, :, c:]], dim=2)

    def _sag_attention(self) -> Attention:
        """The first self-attention of the UNet's middle block (where SAG reads its map)."""
        for name, module in self.unet.unet.mid_block.named_modules():
            if name.endswith("attn1") and isinstance(module, Attention):
                return module
        raise ValueError("guidance 'cfg+sag' needs a UNet middle block with self-attention")

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        global_prompt: str,
        layer_prompts: list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        smg_scale: float = 3.0,
        guidance: str = "cfg+smg",
        smg: SMGConfig | None = None,
        smg_mask_interval: int = 1,
        smg_start: float = 0.0,
        smg_end: float = 1.0,
        negative_prompt: str | None = None,
        negative_layer_prompts: list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        strength: float = 1.0,
        keep: KeepLayers | None = None,
        eta: float = 0.0,
        max_batch: int | None = None,
        output_type: str = "pil",
        return_intermediates: bool = False,
        intermediate_every: int = 5,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
    ) -> LayerDiffPipelineOutput | tuple:
        """Sample `num_images` layered images.

        layer_prompts[0] is the background ("the background"), then foregrounds back→front. Guidance: CFG with
        the paper's negatives (override with `negative_prompt` / `negative_layer_prompts`), plus self-mask
        guidance ("cfg+smg", the variant `smg` (default `SMGConfig()`); masks re-decoded every
        `smg_mask_interval` steps) or SAG ("cfg+sag", Table 3) at `smg_scale`, on the steps i with
        smg_start <= i / steps < smg_end (default all, as the paper; the last 30 %, smg_start=0.7 with
        smg_mask_interval=2, kept learn-bench's gains at half the cost: docs/learn_bench.md).
        `latents` (B, L, 8, h, w) are
        the start at the first kept timestep (`strength` < 1: SDEdit); `keep` pins known layers' x0
        (applications). `max_batch` caps samples per UNet call. After every step `callback_on_step_end(pipe,
        step, t, {name: tensor})` gets the `callback_on_step_end_tensor_inputs` (`CALLBACK_TENSOR_INPUTS`) and
        may return {"latents": …} to replace them.
        """
        # 1. Check inputs (nothing has run yet).
        height = height or self.default_size
        width = width or self.default_size
        smg = SMGConfig() if smg is None else smg
        self.check_inputs(global_prompt, layer_prompts, num_inference_steps, guidance_scale, smg_scale, guidance,
                          smg, height, width, num_images, strength, output_type,
                          latents, smg_mask_interval, max_batch, eta, intermediate_every,
                          tuple(callback_on_step_end_tensor_inputs), smg_start, smg_end)
        neg_global, neg_layers = paper_negatives(list(layer_prompts))
        neg_global = neg_global if negative_prompt is None else negative_prompt
        neg_layers = neg_layers if negative_layer_prompts is None else list(negative_layer_prompts)
        if len(neg_layers) != len(layer_prompts):
            raise ValueError(f"{len(neg_layers)} negative layer prompts for {len(layer_prompts)} layers")
        B, L, c = num_images, len(layer_prompts), self.latent_channels
        device = self._execution_device

        # 2. Text per branch: conditional, the negatives (the CFG base; skipped when CFG is off), and empty
        #    prompts when the SMG variant reads the unconditional branch; one batched UNet call runs them all.
        do_cfg = guidance_scale != 1.0
        self_guided = SELF_GUIDANCE[guidance] is not None and smg_scale > 0
        uncond = self_guided and guidance == "cfg+smg" and smg.needs_uncond
        branches = ["cond"] + ["negative"] * do_cfg + ["uncond"] * uncond  # branch order in a call
        prompts = {"cond": (global_prompt, list(layer_prompts)), "negative": (neg_global, neg_layers), "uncond": ("", [""] * L)}
        g_text, l_text = self.encode_text([prompts[b][0] for b in branches for _ in range(B)],
                                          [prompts[b][1] for b in branches for _ in range(B)])
        text = self._prepare_text(g_text, l_text)  # all branches, (branches·B) samples
        branch_text = {b: self._text_rows(text, slice(k * B, (k + 1) * B)) for k, b in enumerate(branches)}
        branch_text.setdefault("negative", branch_text["cond"])  # no CFG: the conditional branch stands in

        # 3. Timesteps and initial latents (B, L, 8, h, w).
        timesteps = self.prepare_timesteps(num_inference_steps, strength)
        shape = (B, L, 2 * c, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            latents = latents * self.scheduler.init_noise_sigma
        latents = latents.to(device, torch.float32)

        # 4. Self-guidance setup (SAG reads the negative branch's attention: branch index 1 under CFG, else 0).
        degrade = getattr(self, SELF_GUIDANCE[guidance]) if self_guided else None
        degrade_from = smg.degrade_from if guidance == "cfg+smg" else "negative"
        state = _LoopState()
        opts = dict(smg=smg, smg_mask_interval=smg_mask_interval, vae_chunk=(max_batch * L if max_batch else None),
                    branches=len(branches), sag_branch=branches.index("negative") if do_cfg else 0)
        original_processor = None
        if self_guided and guidance == "cfg+sag":
            attn = self._sag_attention()
            original_processor, state.store = attn.processor, _StoreAttentionProcessor()
            state.map_size = self._mid_map_size(shape)
            attn.set_processor(state.store)

        # 5. Denoising loop.
        intermediates: list[Intermediate] = []
        extra = {"eta": eta, "generator": generator} if eta > 0 else {}
        try:
            with self.progress_bar(total=len(timesteps)) as progress:
                for i, t in enumerate(timesteps):
                    alpha = self.alpha_bar(t)
                    # 5a. every branch in one batched call
                    if state.store is not None:
                        state.store.probs.clear()  # keep only this call's attention maps
                    x_in = torch.cat([latents] * len(branches))  # (branches·B, L, 8, h, w)
                    eps_all = self._predict(x_in, t, text, max_batch)
                    preds = {b: eps_all[k * B:(k + 1) * B] for k, b in enumerate(branches)}
                    preds.setdefault("negative", preds["cond"])
                    eps = G.cfg(preds["negative"], preds["cond"], guidance_scale) if do_cfg else preds["cond"]
                    preds["cfg"] = eps
                    # 5b. self-guidance (on the steps of its window): degraded latents through one branch, the
                    # guided ε pushed away from it
                    if degrade is not None and smg_start <= i / len(timesteps) < smg_end:
                        x_deg = degrade(latents, preds, alpha, i, state, opts)
                        eps_deg = self._predict(x_deg, t, branch_text[degrade_from], max_batch)
                        combine = smg.combine if guidance == "cfg+smg" else "sag"
                        eps = torch.cat([G.smg_combine(eps[:, :, :c], preds[degrade_from][:, :, :c],
                                                       eps_deg[:, :, :c], smg_scale, combine), eps[:, :, c:]], dim=2)
                    # 5c. the scheduler steps; known layers get their x0 back (Song et al. Eq. 12)
                    out = self.scheduler.step(eps, t, latents, **extra)
                    latents = out.prev_sample
                    if keep is not None:
                        where = keep.where(i, c).to(device)
                        x0_new = keep.latents.to(device, torch.float32)
                        latents = G.replace_x0(latents, out.pred_original_sample, x0_new,
                                               self.alpha_bar(self._prev_timestep(int(t))), where)
                        if i == len(timesteps) - 1:  # the output is the replaced x0 itself: exactly the original
                            latents = torch.where(where, x0_new, latents)
                    if return_intermediates and (i % intermediate_every == 0 or i == len(timesteps) - 1):
                        intermediates.append(self._preview(i, int(t), out.pred_original_sample, max_batch))
                    if callback_on_step_end is not None:
                        named = dict(latents=latents, noise_pred=eps, pred_original_sample=out.pred_original_sample)
                        result = callback_on_step_end(self, i, int(t), {n: named[n] for n in
                                                                         callback_on_step_end_tensor_inputs}) or {}
                        latents = result.get("latents", latents)
                    progress.update()
        finally:
            if original_processor is not None:
                self._sag_attention().set_processor(original_processor)

        # 6. Decode layer images and masks; composite (Eq. 4).
        self.maybe_free_model_hooks()
        result = self._outputs(latents, output_type, max_batch)
        settings = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, smg_scale=smg_scale,
                        guidance=guidance, strength=strength, eta=eta, height=height, width=width)
        output = LayerDiffPipelineOutput(latents=latents, global_prompt=global_prompt,
                                         layer_prompts=list(layer_prompts), settings=settings,
                                         intermediates=intermediates if return_intermediates else None, **result)
        return output if return_dict else (output.layer_images, output.masks, output.composites, output.latents)

    @torch.no_grad()
    def decode_layers(self, latents: torch.Tensor, output_type: str = "np",
                      max_batch: int | None = None) -> LayerDiffPipelineOutput:
        """Clean latents (B, L, 8, h, w) (image ‖ mask, e.g. `applications.encode_layers`) → what a sampling call
        returns for them: decoded layers, one-hot masks, RGBA layers, Eq. 4 composites."""
        if output_type not in ("np", "pil"):
            raise ValueError(f"output_type must be 'np' or 'pil', got {output_type!r}")
        return LayerDiffPipelineOutput(latents=latents, **self._outputs(latents, output_type, max_batch))

    def _mid_map_size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Spatial size of the UNet's middle block for latents of `shape` (each downsampler halves, rounding up)."""
        h, w = shape[-2:]
        for _ in range(self.unet.unet.num_upsamplers):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def _decode_uint8(self, latents: torch.Tensor, max_batch: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(B, L, 8, h, w) → images (B, L, H, W, 3) uint8 and one-hot masks (B, L, H, W) 0/255 uint8."""
        c, L = self.latent_channels, latents.shape[1]
        chunk = max_batch * L if max_batch else None
        images = self.decode_latents(latents[:, :, :c], chunk)  # (B, L, 3, H, W) in [-1, 1]
        masks = G.layer_masks_from_x0(self.decode_latents(latents[:, :, c:], chunk))  # (B, L, 1, H, W)
        images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        images = rearrange(images, "b l c h w -> b l h w c").cpu().numpy()
        return images, (masks[:, :, 0] * 255).to(torch.uint8).cpu().numpy()

    def _preview(self, step: int, timestep: int, x0: torch.Tensor, max_batch: int | None) -> Intermediate:
        images, masks = self._decode_uint8(x0, max_batch)
        return Intermediate(step=step, timestep=timestep, images=images, masks=masks)

    def _outputs(self, latents: torch.Tensor, output_type: str, max_batch: int | None) -> dict[str, Any]:
        """Decoded images, masks, RGBA layers and composites in the requested form."""
        if output_type == "latent":
            return {}
        images, masks = self._decode_uint8(latents, max_batch)  # (B, L, H, W, 3), (B, L, H, W)
        B, L = images.shape[:2]
        alpha = masks.copy()
        alpha[:, 0] = 255  # the background layer is opaque
        rgba = np.concatenate([images, alpha[..., None]], axis=-1)  # (B, L, H, W, 4)
        composites = np.stack([composite_eq4(images[b, 0], list(images[b, 1:]), list(masks[b, 1:]))
                               for b in range(B)])  # (B, H, W, 3)
        if output_type == "np":
            return dict(layer_images=images, masks=masks, rgba_layers=rgba, composites=composites)
        return dict(
            layer_images=[[Image.fromarray(images[b, l]) for l in range(L)] for b in range(B)],
            masks=[[Image.fromarray(masks[b, l], mode="L") for l in range(L)] for b in range(B)],
            rgba_layers=[[Image.fromarray(rgba[b, l], mode="RGBA") for l in range(L)] for b in range(B)],
            composites=[Image.fromarray(composites[b]) for b in range(B)],
        )
