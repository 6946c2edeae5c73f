"""Layer-specific prompt enhancer (paper §4.2, Fig. 3c): layer prompts look at each other, then at the global prompt.

1. self-attention over the tokens of ALL layer prompts of a sample together, (B, L·T, D); tokens of padding
   layers are masked out as keys, so they cannot change the valid layers;
2. cross-attention from the layer-prompt tokens (queries) to the global-prompt tokens (keys/values);
3. an optional FFN.

Each step is pre-norm + residual with its last linear zero-initialised (Appendix A), so at init the enhanced
prompts equal the input prompts. A learnable layer-index embedding (zero at init) is added to the
self-attention input so identical prompts on different layers can still be told apart.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from einops import rearrange, repeat
from torch import nn

from model.network.layer_attention import MultiHeadAttention, zero_module


class LayerPromptEnhancer(nn.Module):
    """Refines layer-prompt embeddings (B, L, T, D) with each other and the global prompt (B, Tg, D)."""

    def __init__(self, dim: int, heads: int = 8, max_layers: int = 4, use_ffn: bool = True, ff_mult: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"prompt enhancer: text dim {dim} is not divisible by heads {heads}")
        self.dim = dim
        self.max_layers = max_layers
        self.layer_embed = nn.Parameter(torch.zeros(max_layers, dim))
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, heads=heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, context_dim=dim, heads=heads)
        if use_ffn:
            self.norm_ff = nn.LayerNorm(dim)
            self.ff = FeedForward(dim, mult=ff_mult, activation_fn="geglu")
        else:
            self.norm_ff, self.ff = None, None
        self.zero_init_outputs()

    def zero_init_outputs(self) -> None:
        """Zero the last linear of each step: the enhancer is then the identity."""
        zero_module(self.self_attn.to_out)
        zero_module(self.cross_attn.to_out)
        if self.ff is not None:
            zero_module(self.ff.net[-1])

    def forward(self, layer_text: torch.Tensor, global_text: torch.Tensor,
                layer_valid: torch.Tensor | None = None) -> torch.Tensor:
        """layer_text (B, L, T, D), global_text (B, Tg, D), layer_valid (B, L) bool or None → (B, L, T, D)."""
        if layer_text.ndim != 4 or global_text.ndim != 3:
            raise ValueError(
                f"prompt enhancer expects layer_text (B, L, T, D) and global_text (B, Tg, D), "
                f"got {tuple(layer_text.shape)} and {tuple(global_text.shape)}"
            )
        B, L, T, D = layer_text.shape
        if D != self.dim or global_text.shape[-1] != self.dim or global_text.shape[0] != B:
            raise ValueError(
                f"prompt enhancer built for dim {self.dim} got layer_text {tuple(layer_text.shape)} "
                f"and global_text {tuple(global_text.shape)}"
            )
        if L > self.max_layers:
            raise ValueError(f"prompt enhancer: {L} layers exceed max_layers={self.max_layers}")

        # 1. self-attention over all layers' tokens of a sample together
        x = rearrange(layer_text, "b l t d -> b (l t) d")
        h = self.norm_self(x) + repeat(self.layer_embed[:L].to(x.dtype), "l d -> 1 (l t) d", t=T)
        key_mask = None if layer_valid is None else repeat(layer_valid, "b l -> b (l t)", t=T)  # (B, L·T)
        x = x + self.self_attn(h, key_mask=key_mask)  # (B, L·T, D)

        # 2. cross-attention: layer tokens (queries) → global prompt tokens (keys/values)
        x = x + self.cross_attn(self.norm_cross(x), context=global_text.to(x.dtype))

        # 3. optional FFN
        if self.ff is not None:
            x = x + self.ff(self.norm_ff(x))
        return rearrange(x, "b (l t) d -> b l t d", l=L)
