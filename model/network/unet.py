"""LayerDiffUNet: the SD-1.x UNet turned into a layer-collaborative denoiser of (image, mask) latents per layer.

Layers ride on the batch axis of the SD UNet, (B·L). The SD blocks are unchanged and see the global prompt;
after every SD transformer block a layer-collaborative block (model/layer_attention.py) mixes the layers and
injects each layer's enhanced prompt (model/prompt_enhancer.py). A mask branch reads the mask latent through
`conv_in_mask` (scaled by a zero-initialised scalar, added to SD's conv_in output) and predicts the mask noise
through `conv_out_mask`. At init every new branch is zero, so the image-noise output of each layer equals SD's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange, repeat
from torch import nn

from model.network.layer_attention import (
    LAYER_CONTEXT_KEY,
    LayerCollaborativeBlock,
    LayerCollabTransformerBlock,
    LayerContext,
)
from model.network.prompt_enhancer import LayerPromptEnhancer

# Every UNet2DConditionModel constructor option falls in one of three groups (a test checks the union is all of
# them, so a new diffusers option has to be classified here before LayerDiffUNet accepts a config):
# 1. options the explicit forward below implements as diffusers' forward does (parity-tested, tests/model/test_unet.py)
SUPPORTED_UNET_OPTIONS = frozenset({
    "sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "dropout", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
    "reverse_transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "upcast_attention", "resnet_time_scale_shift", "time_embedding_type", "time_embedding_dim",
    "time_embedding_act_fn", "timestep_post_act", "conv_in_kernel", "conv_out_kernel", "cross_attention_norm",
    "mid_block_only_cross_attention",
    "resnet_skip_time_act", "resnet_out_scale_factor",  # read only by the Simple*/Resnet* blocks refused in 3.
})
# 2. options it does not implement (extra embeddings or inputs the forward never computes): name → the only value
_UNSUPPORTED = {
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": 64,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "dual_cross_attention": False,
    "attention_type": "default",
}
# 3. block types: only those whose transformer blocks are SD's BasicTransformerBlocks (a collab block follows each)
_BLOCK_TYPES = {
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
}
_WRAPPED_KEY = re.compile(r"(transformer_blocks\.\d+)\.")
# Weights live in `diffusion_pytorch_model.layerdiff.safetensors` (diffusers' variant naming), so a plain
# `UNet2DConditionModel.from_pretrained(run, subfolder="unet")` finds no weights file and raises instead of
# "succeeding" with random weights; LayerDiffUNet.from_pretrained / the pipeline pick the variant by default.
WEIGHTS_VARIANT = "layerdiff"
WEIGHTS_NAME = f"diffusion_pytorch_model.{WEIGHTS_VARIANT}.safetensors"


@dataclass
class LayerDiffUNetOutput(BaseOutput):
    """`sample` (B, L, 8, h, w): channels 0:4 image-noise ε, 4:8 mask-noise ε' (zeros on padding layers)."""

    sample: torch.Tensor


@dataclass(frozen=True)
class PreparedText:
    """What `LayerDiffUNet.forward` computes from the prompts alone, made once by `prepare_text` and passed as
    `forward(sample, t, global_text, layer_text, layer_valid, prepared=…)` at every denoising step of a call: the
    same outputs without re-running the prompt enhancer and the intra-layer key/value projections per step. It
    keeps the tensors it was made from; the forward refuses it with any others."""

    global_text: torch.Tensor  # (B, T, D) as given
    layer_text: torch.Tensor  # (B, L, T', D) as given
    layer_valid: torch.Tensor | None  # (B, L) as given
    encoder_hidden_states: torch.Tensor  # (B·L, T, D) the global prompt, once per layer
    context: LayerContext  # enhanced layer prompts (B·L, T', D), checked validity, each block's intra-layer (k, v)

    def made_from(self, global_text, layer_text, layer_valid) -> bool:
        """True when these are the very tensors (not equal copies) this was prepared from."""
        return all(a is b for a, b in zip((self.global_text, self.layer_text, self.layer_valid),
                                          (global_text, layer_text, layer_valid)))

    def __getitem__(self, samples: slice) -> "PreparedText":
        """The same text for a slice of the B samples (a branch, a chunk of a batched call)."""
        L, ctx = self.context.num_layers, self.context
        rows = slice(None if samples.start is None else samples.start * L,
                     None if samples.stop is None else samples.stop * L)
        kv = None if ctx.intra_kv is None else {m: (k[rows], v[rows]) for m, (k, v) in ctx.intra_kv.items()}
        return PreparedText(self.global_text[samples], self.layer_text[samples],
                            None if self.layer_valid is None else self.layer_valid[samples],
                            self.encoder_hidden_states[rows],
                            LayerContext(L, ctx.layer_text[rows],
                                         None if ctx.layer_valid is None else ctx.layer_valid[samples], kv))


def _clean_unet_config(unet_config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of an SD UNet config (drops diffusers' private `_…` keys), checked for SD-1.x."""
    cfg = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    bad = {k: cfg[k] for k, allowed in _UNSUPPORTED.items() if cfg.get(k, allowed) != allowed}
    unknown = sorted(set(cfg) - SUPPORTED_UNET_OPTIONS - set(_UNSUPPORTED) - set(_BLOCK_TYPES))
    if bad or unknown:
        raise ValueError(f"LayerDiffUNet supports SD-1.x-style UNets only; unsupported UNet options: {bad}"
                         + (f", unknown options: {unknown}" if unknown else ""))
    for key, allowed in _BLOCK_TYPES.items():
        values = cfg[key] if isinstance(cfg.get(key), (list, tuple)) else [cfg.get(key, allowed[0])]
        wrong = [v for v in values if v not in allowed]
        if wrong:
            raise ValueError(f"LayerDiffUNet supports {key} in {allowed} only; got {wrong}")
    if cfg.get("in_channels", 4) != cfg.get("out_channels", 4):
        raise ValueError(
            f"the SD UNet must predict noise for its own input latent: in_channels={cfg.get('in_channels')} "
            f"!= out_channels={cfg.get('out_channels')} (an inpainting UNet is not a valid starting point)"
        )
    return cfg


class LayerDiffUNet(ModelMixin, ConfigMixin):
    """Denoises B samples × L layers of (image latent, mask latent) under a global prompt and per-layer prompts."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: dict,
        max_layers: int = 4,
        use_prompt_enhancer: bool = True,
        layer_ff_mult: int = 4,
        layer_position_embedding: bool = True,
        enhancer_heads: int = 8,
        enhancer_ffn: bool = True,
    ):
        super().__init__()
        if max_layers < 1:
            raise ValueError(f"max_layers must be >= 1, got {max_layers}")
        self.unet = UNet2DConditionModel(**_clean_unet_config(unet_config))
        text_dim = self.unet.config.cross_attention_dim
        if not isinstance(text_dim, int):
            raise ValueError(f"per-block cross_attention_dim {text_dim!r} is not supported; use one int (SD-1.x)")

        # 1. a layer-collaborative block after every SD transformer block
        n_wrapped = 0
        for module in self.unet.modules():
            blocks = getattr(module, "transformer_blocks", None)
            if not isinstance(blocks, nn.ModuleList):
                continue
            for i, block in enumerate(blocks):
                if not isinstance(block, BasicTransformerBlock):
                    raise ValueError(f"expected SD BasicTransformerBlock, found {type(block).__name__}")
                collab = LayerCollaborativeBlock(
                    dim=block.dim, text_dim=text_dim, heads=block.attn2.heads, max_layers=max_layers,
                    ff_mult=layer_ff_mult, layer_position_embedding=layer_position_embedding,
                )
                blocks[i] = LayerCollabTransformerBlock(block, collab)
                n_wrapped += 1
        if n_wrapped == 0:
            raise ValueError("the SD UNet config has no cross-attention transformer blocks to extend")

        # 2. mask branch: input conv (+ zero-init gate) and output conv, copies of SD's
        conv_in, conv_out = self.unet.conv_in, self.unet.conv_out
        self.conv_in_mask = nn.Conv2d(conv_in.in_channels, conv_in.out_channels, conv_in.kernel_size,
                                      padding=conv_in.padding)
        self.mask_scale = nn.Parameter(torch.zeros(()))
        self.conv_out_mask = nn.Conv2d(conv_out.in_channels, conv_out.out_channels, conv_out.kernel_size,
                                       padding=conv_out.padding)

        # 3. layer-specific prompt enhancer (ablation: off)
        self.prompt_enhancer = (
            LayerPromptEnhancer(text_dim, heads=enhancer_heads, max_layers=max_layers, use_ffn=enhancer_ffn)
            if use_prompt_enhancer else None
        )
        self.initialize_new_modules()

    # ------------------------------------------------------------------ persistence (see WEIGHTS_VARIANT)
    def save_pretrained(self, save_directory, *args, variant: str | None = None, safe_serialization: bool = True,
                        **kwargs) -> None:
        variant = WEIGHTS_VARIANT if variant is None else f"{WEIGHTS_VARIANT}_{variant}"
        super().save_pretrained(save_directory, *args, variant=variant, safe_serialization=safe_serialization,
                                **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "LayerDiffUNet":
        variant = kwargs.pop("variant", None)
        kwargs["variant"] = WEIGHTS_VARIANT if variant is None else f"{WEIGHTS_VARIANT}_{variant}"
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, max_layers: int = 4, **options) -> "LayerDiffUNet":
        """Build from a (pretrained) SD UNet: inherit all its weights, initialise new modules per Appendix A."""
        model = cls(unet_config=dict(unet.config), max_layers=max_layers, **options)
        model.load_sd_unet_state_dict(unet.state_dict())
        model = model.to(unet.device)
        return model if model.dtype == unet.dtype else model.to(unet.dtype)

    def load_sd_unet_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a plain SD UNet state dict into the wrapped UNet, then re-run the Appendix-A initialisation."""
        mapped = {_WRAPPED_KEY.sub(r"\1.block.", k): v for k, v in state_dict.items()}
        result = self.unet.load_state_dict(mapped, strict=False)
        missing = [k for k in result.missing_keys if ".collab." not in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"SD UNet state dict does not match this LayerDiffUNet's config: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        self.initialize_new_modules()

    @torch.no_grad()
    def initialize_new_modules(self) -> None:
        """Appendix A: mask convs copy SD's conv_in/conv_out, gate = 0, intra-attention copies SD's attn2,
        the last linear of every new attention/FFN is zero (so the network starts as SD, layer by layer)."""
        self.conv_in_mask.load_state_dict(self.unet.conv_in.state_dict())
        self.conv_out_mask.load_state_dict(self.unet.conv_out.state_dict())
        self.mask_scale.zero_()
        for wrapper in self.collab_blocks():
            wrapper.collab.init_from_sd_block(wrapper.block)
        if self.prompt_enhancer is not None:
            self.prompt_enhancer.zero_init_outputs()

    def collab_blocks(self) -> list[LayerCollabTransformerBlock]:
        """Every wrapped (SD block + layer-collaborative block) pair, in module order."""
        return [m for m in self.unet.modules() if isinstance(m, LayerCollabTransformerBlock)]

    def enable_layer_block_checkpointing(self, enable: bool = True) -> None:
        """Recompute only the layer-collaborative blocks in backward: their activations (about as many as the SD
        transformer blocks') are not kept, for ~1 extra forward of those blocks. An alternative to
        `enable_gradient_checkpointing()` (which already recomputes them together with the SD blocks)."""
        for wrapper in self.collab_blocks():
            wrapper.checkpoint_collab = enable

    def new_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters LayerDiff adds to SD (collab blocks, enhancer, mask branch), by name."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("unet.") or ".collab." in n}

    # ------------------------------------------------------------------ properties
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def in_channels_per_layer(self) -> int:
        return 2 * self.latent_channels

    # ------------------------------------------------------------------ forward
    def _check_sample(self, sample):
        """Validate the sample's shape; return (B, L)."""
        if sample.ndim != 5 or sample.shape[2] != self.in_channels_per_layer:
            raise ValueError(
                f"sample must be (B, L, {self.in_channels_per_layer}, h, w) = image latent ‖ mask latent per "
                f"layer, got {tuple(sample.shape)}"
            )
        B, L = sample.shape[:2]
        if L > self.config.max_layers:
            raise ValueError(f"{L} layers exceed max_layers={self.config.max_layers}")
        return B, L

    def _check_inputs(self, sample, timesteps, global_text, layer_text, layer_valid):
        """Validate shapes; return timesteps as (B, L) and layer_valid as (B, L) bool or None."""
        B, L = self._check_sample(sample)
        valid = self._check_text(global_text, layer_text, layer_valid, B, L, sample.device)
        return self._check_timesteps(timesteps, sample.device, B, L), valid

    def _check_text(self, global_text, layer_text, layer_valid, B, L, device):
        """Validate the prompts' shapes; return layer_valid as (B, L) bool or None (all valid)."""
        text_dim = self.unet.config.cross_attention_dim
        if global_text.ndim != 3 or global_text.shape[0] != B or global_text.shape[2] != text_dim:
            raise ValueError(f"global_text must be (B={B}, T, D={text_dim}), got {tuple(global_text.shape)}")
        if layer_text.ndim != 4 or layer_text.shape[:2] != (B, L) or layer_text.shape[3] != text_dim:
            raise ValueError(
                f"layer_text must be (B={B}, L={L}, T, D={text_dim}), got {tuple(layer_text.shape)}"
            )
        if layer_valid is not None:
            if layer_valid.shape != (B, L):
                raise ValueError(f"layer_valid must be (B, L)=({B}, {L}), got {tuple(layer_valid.shape)}")
            layer_valid = layer_valid.to(device=device, dtype=torch.bool)
            if not bool(layer_valid.any(dim=1).all()):
                raise ValueError("every sample needs at least one valid layer (layer_valid has an all-False row)")
            if bool(layer_valid.all()):
                layer_valid = None  # all valid: skip masking (faster attention kernels)
        return layer_valid

    @staticmethod
    def _check_timesteps(timesteps, device, B, L):
        """Timesteps as a scalar, (B,) or (B, L) → (B, L)."""
        timesteps = torch.as_tensor(timesteps, device=device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(B, L)
        elif timesteps.shape == (B,):
            timesteps = timesteps[:, None].expand(B, L)
        elif timesteps.shape != (B, L):
            raise ValueError(
                f"timesteps must be a scalar, (B,)=({B},) or (B, L)=({B}, {L}); got {tuple(timesteps.shape)}"
            )
        return timesteps

    def _text_context(self, global_text, layer_text, layer_valid, valid, precompute_kv: bool) -> PreparedText:
        """Enhance the layer prompts (B, L, T', D), flatten them onto the (B·L) batch, repeat the global prompt
        (B, T, D) per layer; with `precompute_kv` also each collaborative block's intra-layer keys/values."""
        L = layer_text.shape[1]
        enhanced = layer_text
        if self.prompt_enhancer is not None:
            enhanced = self.prompt_enhancer(layer_text, global_text, valid)  # (B, L, T', D)
        flat = rearrange(enhanced, "b l t d -> (b l) t d")  # (B·L, T', D)
        kv = {w.collab: w.collab.intra_kv(flat, self.dtype) for w in self.collab_blocks()} if precompute_kv else None
        return PreparedText(global_text, layer_text, layer_valid, repeat(global_text, "b t d -> (b l) t d", l=L),
                            LayerContext(L, flat, valid, kv))

    def prepare_text(self, global_text: torch.Tensor, layer_text: torch.Tensor,
                     layer_valid: torch.Tensor | None = None) -> PreparedText:
        """Everything the forward derives from global_text (B, T, D), layer_text (B, L, T', D) and layer_valid
        (B, L) bool | None alone, for `forward(..., prepared=…)` at every step of a sampling call."""
        if layer_text.ndim != 4:
            raise ValueError(f"layer_text must be (B, L, T, D), got {tuple(layer_text.shape)}")
        B, L = layer_text.shape[:2]
        if L > self.config.max_layers:
            raise ValueError(f"{L} layers exceed max_layers={self.config.max_layers}")
        valid = self._check_text(global_text, layer_text, layer_valid, B, L, layer_text.device)
        return self._text_context(global_text, layer_text, layer_valid, valid, precompute_kv=True)

    # The forward is diffusers' UNet2DConditionModel.forward for the options in SUPPORTED_UNET_OPTIONS (the ones in
    # _UNSUPPORTED are refused at construction), with the mask branch added at conv_in/conv_out and the layer
    # context passed down in cross_attention_kwargs. tests/model/test_unet.py proves it against diffusers' own
    # forward on the same weights, including the full SD 1.5 geometry (slow test).
    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        global_text: torch.Tensor,
        layer_text: torch.Tensor,
        layer_valid: torch.Tensor | None = None,
        return_dict: bool = True,
        prepared: PreparedText | None = None,
    ) -> LayerDiffUNetOutput | tuple[torch.Tensor]:
        """sample (B, L, 8, h, w), timesteps (B, L) | (B,) | scalar, global_text (B, T, D),
        layer_text (B, L, T', D), layer_valid (B, L) bool | None → noise (B, L, 8, h, w).
        `prepared`: `prepare_text(global_text, layer_text, layer_valid)` of these very tensors (computed once)."""
        # 1. check inputs
        timesteps, valid = self._check_inputs(sample, timesteps, global_text, layer_text, layer_valid)

        # 2. layer prompts: enhance, flatten onto the (B·L) batch; global prompt repeated per layer (or prepared)
        if prepared is None:
            prepared = self._text_context(global_text, layer_text, layer_valid, valid, precompute_kv=False)
        elif not prepared.made_from(global_text, layer_text, layer_valid):
            raise ValueError("`prepared` was made from other tensors than the global_text / layer_text / layer_valid "
                             "passed: give the prepared text's own .global_text, .layer_text and .layer_valid")
        B, L, _, height, width = sample.shape
        unet = self.unet
        c = self.latent_channels
        cross_kwargs = {LAYER_CONTEXT_KEY: prepared.context}
        encoder_hidden_states = prepared.encoder_hidden_states  # (B·L, T, D)

        # 3. time embedding, one timestep per layer
        x = rearrange(sample, "b l c h w -> (b l) c h w")  # (B·L, 8, h, w)
        t_emb = unet.get_time_embed(sample=x, timestep=rearrange(timesteps, "b l -> (b l)"))
        emb = unet.time_embedding(t_emb)  # (B·L, E); applies `timestep_post_act` itself
        if unet.time_embed_act is not None:  # `time_embedding_act_fn`
            emb = unet.time_embed_act(emb)

        # 4. conv_in on the image latent + gated conv_in_mask on the mask latent
        h = unet.conv_in(x[:, :c]) + self.mask_scale.to(x.dtype) * self.conv_in_mask(x[:, c:])  # (B·L, C0, h, w)

        # 5. down
        up_factor = 2**unet.num_upsamplers
        forward_upsample_size = height % up_factor != 0 or width % up_factor != 0
        res_stack: tuple[torch.Tensor, ...] = (h,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states,
                               cross_attention_kwargs=cross_kwargs)
            else:
                h, res = block(hidden_states=h, temb=emb)
            res_stack += res

        # 6. mid
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states,
                                   cross_attention_kwargs=cross_kwargs)
            else:
                h = unet.mid_block(h, emb)

        # 7. up
        for i, block in enumerate(unet.up_blocks):
            res = res_stack[-len(block.resnets):]
            res_stack = res_stack[: -len(block.resnets)]
            upsample_size = None
            if forward_upsample_size and i < len(unet.up_blocks) - 1:
                upsample_size = res_stack[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                          encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_kwargs,
                          upsample_size=upsample_size)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

        # 8. out: SD conv_out → image noise, conv_out_mask → mask noise
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        out = torch.cat([unet.conv_out(h), self.conv_out_mask(h)], dim=1)  # (B·L, 8, h, w)
        out = rearrange(out, "(b l) c h w -> b l c h w", b=B)
        if valid is not None:
            out = torch.where(valid[:, :, None, None, None], out, torch.zeros_like(out))  # padding layers → 0

        if not return_dict:
            return (out,)
        return LayerDiffUNetOutput(sample=out)
