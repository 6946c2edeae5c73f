"""Layer-collaborative attention block (paper §4.2, Fig. 3b) and the wrapper that puts it after an SD block.

Each SD `BasicTransformerBlock` of the UNet is wrapped in `LayerCollabTransformerBlock`: it runs the SD block
unchanged (self-attention, cross-attention to the GLOBAL prompt, FFN) and then a `LayerCollaborativeBlock`:

1. inter-layer attention: at every spatial position, self-attention across the L layers of a sample
   (padding layers masked out as keys);
2. text-guided intra-layer attention: cross-attention of each layer's tokens to that layer's (enhanced)
   prompt; q/k/v start as copies of the SD block's cross-attention (attn2);
3. a feed-forward network.

Each is pre-norm + residual and its last linear is zero-initialised (Appendix A), so at init the block is the
identity. The layer structure reaches the wrapper as a `LayerContext` inside `cross_attention_kwargs`, which
diffusers passes untouched from the UNet down to every transformer block; the wrapper pops it before the SD
block sees the kwargs. Nothing is stored on the modules between calls: what depends only on the prompts (the
intra-layer attention's keys/values of the layer text) can come precomputed in the `LayerContext`
(`LayerDiffUNet.prepare_text`, once per sampling call instead of once per step).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from einops import rearrange, repeat
from torch import nn

LAYER_CONTEXT_KEY = "layer_context"
# Inter-layer attention computes its L×L scores by broadcasting while B·L·L·N·C (the largest product it forms)
# stays below this (≈ 8 MB of float32, cache-sized); larger maps use one SDPA call. Same math either way (tested
# to 1e-5); set it to 0 to always use SDPA.
BROADCAST_MAX_ELEMENTS = 2**21


@dataclass(frozen=True)
class LayerContext:
    """What the collaborative blocks need to know about the layer axis of the (B·L) UNet batch."""

    num_layers: int  # L
    layer_text: torch.Tensor  # (B·L, T, D) enhanced layer-prompt embeddings
    layer_valid: torch.Tensor | None = None  # (B, L) bool, False = padding layer; None = all valid
    # block → its intra-layer attention's (k, v) of `layer_text`, each (B·L, heads, T, d); None = project per call
    intra_kv: Mapping[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None


class MultiHeadAttention(nn.Module):
    """Multi-head (cross-)attention through `scaled_dot_product_attention`, with an optional key mask.

    Parameter names follow diffusers' `Attention` (to_q/to_k/to_v/to_out) so SD weights copy over directly.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int | None = None,
                 qkv_bias: bool = False):
        super().__init__()
        context_dim = query_dim if context_dim is None else context_dim
        if dim_head is None:
            if query_dim % heads:
                raise ValueError(f"query_dim {query_dim} is not divisible by heads {heads}")
            dim_head = query_dim // heads
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context (B, Nk, Cc) → each (B, heads, Nk, d)."""
        k = rearrange(self.to_k(context), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.to_v(context), "b n (h d) -> b h n d", h=self.heads)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, Nq, C), context (B, Nk, Cc) or None (self-attention), key_mask (B, Nk) bool → (B, Nq, C).
        `kv`: `project_kv(context)` computed beforehand (then `context` is not read)."""
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = self.project_kv(x if context is None else context) if kv is None else kv
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Nk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Nq, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero (Appendix A: zero-initialised last linear)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class LayerCollaborativeBlock(nn.Module):
    """Inter-layer attention → text-guided intra-layer attention → FFN, each pre-norm + residual."""

    def __init__(self, dim: int, text_dim: int, heads: int, max_layers: int, ff_mult: int = 4,
                 layer_position_embedding: bool = True):
        super().__init__()
        self.max_layers = max_layers
        # 1. inter-layer attention (random init; a learnable layer-index embedding, zero at init, tells the
        #    layers apart: background first, then foregrounds back→front)
        self.norm_inter = nn.LayerNorm(dim)
        self.layer_pos = nn.Parameter(torch.zeros(max_layers, dim)) if layer_position_embedding else None
        self.inter_attn = MultiHeadAttention(dim, heads=heads)
        # 2. text-guided intra-layer attention (q/k/v/norm copied from SD's cross-attention by init_from_sd_block)
        self.norm_intra = nn.LayerNorm(dim)
        self.intra_attn = MultiHeadAttention(dim, context_dim=text_dim, heads=heads)
        # 3. FFN (SD's GEGLU feed-forward shape)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, activation_fn="geglu")
        self.zero_init_outputs()

    def zero_init_outputs(self) -> None:
        """Zero the last linear of each of the three modules: the block is then the identity."""
        zero_module(self.inter_attn.to_out)
        zero_module(self.intra_attn.to_out)
        zero_module(self.ff.net[-1])

    @torch.no_grad()
    def init_from_sd_block(self, block: BasicTransformerBlock) -> None:
        """Appendix A: intra-layer attention starts from the SD block's cross-attention (norm2 + attn2 q/k/v)."""
        attn2 = block.attn2
        if attn2 is None or attn2.is_cross_attention is False:
            raise ValueError("the SD transformer block has no cross-attention (attn2) to initialise from")
        if attn2.heads != self.intra_attn.heads or attn2.to_q.weight.shape != self.intra_attn.to_q.weight.shape:
            raise ValueError(
                f"SD cross-attention shape (heads {attn2.heads}, to_q {tuple(attn2.to_q.weight.shape)}) does not "
                f"match the intra-layer attention (heads {self.intra_attn.heads}, "
                f"to_q {tuple(self.intra_attn.to_q.weight.shape)})"
            )
        self.norm_intra.load_state_dict(block.norm2.state_dict())
        for name in ("to_q", "to_k", "to_v"):
            src, dst = getattr(attn2, name), getattr(self.intra_attn, name)
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                if src.bias is None:
                    nn.init.zeros_(dst.bias)
                else:
                    dst.bias.copy_(src.bias)
        self.intra_attn.to_out.weight.copy_(attn2.to_out[0].weight)
        self.intra_attn.to_out.bias.copy_(attn2.to_out[0].bias)
        self.zero_init_outputs()  # the copied out-projection is the "last linear": zero it (Appendix A)

    def forward(self, hidden_states: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """hidden_states (B·L, N, C) → (B·L, N, C)."""
        # 1. inter-layer attention: each spatial position attends across the L layers of its sample
        x = self.norm_inter(hidden_states)
        small = x.shape[0] * ctx.num_layers * x.shape[1] * x.shape[2] <= BROADCAST_MAX_ELEMENTS
        inter = self._inter_layer_broadcast if small else self._inter_layer_sdpa
        hidden_states = hidden_states + inter(x, ctx)

        # 2. text-guided intra-layer attention: each layer's tokens attend to that layer's prompt (its keys and
        #    values precomputed once per sampling call when the context carries them)
        kv = None if ctx.intra_kv is None else ctx.intra_kv[self]
        text = None if kv is not None else ctx.layer_text.to(hidden_states.dtype)  # (B·L, T, D)
        hidden_states = hidden_states + self.intra_attn(self.norm_intra(hidden_states), context=text, kv=kv)

        # 3. FFN
        return hidden_states + self.ff(self.norm_ff(hidden_states))

    def intra_kv(self, layer_text: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The intra-layer attention's keys and values of the layer text (B·L, T, D) → each (B·L, heads, T, d)."""
        return self.intra_attn.project_kv(layer_text.to(dtype))

    def _with_layer_position(self, x: torch.Tensor, L: int) -> torch.Tensor:
        """x (B, L, N, C) plus the layer-index embedding of each layer."""
        return x if self.layer_pos is None else x + self.layer_pos[:L, None].to(x.dtype)

    def _inter_layer_sdpa(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Inter-layer attention as one SDPA call with every (sample, position) a batch item of L tokens:
        normed x (B·L, N, C) → (B·L, N, C)."""
        L, n_tokens = ctx.num_layers, x.shape[1]
        x = self._with_layer_position(rearrange(x, "(b l) n c -> b l n c", l=L), L)
        x = rearrange(x, "b l n c -> (b n) l c")  # (B·N, L, C)
        key_mask = None
        if ctx.layer_valid is not None:
            key_mask = repeat(ctx.layer_valid, "b l -> (b n) l", n=n_tokens)  # (B·N, L)
        x = self.inter_attn(x, key_mask=key_mask)  # (B·N, L, C)
        return rearrange(x, "(b n) l c -> (b l) n c", n=n_tokens)

    def _inter_layer_broadcast(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """The same attention for small maps, in the UNet's own (B, L, N) layout: projections without any
        transpose, the L×L scores and the weighted sum as broadcast products (L ≤ max_layers is tiny, where SDPA
        pays per (position, head) for sequences of 2–4 tokens). normed x (B·L, N, C) → (B·L, N, C)."""
        attn, L = self.inter_attn, ctx.num_layers
        BL, N, C = x.shape
        x = self._with_layer_position(x.view(BL // L, L, N, C), L)  # (B, L, N, C)
        q, k, v = (proj(x).view(BL // L, L, N, attn.heads, -1) for proj in (attn.to_q, attn.to_k, attn.to_v))
        scores = (q[:, :, None] * k[:, None]).sum(-1) * q.shape[-1] ** -0.5  # (B, L query, M key, N, H)
        if ctx.layer_valid is not None:
            scores = scores.masked_fill(~ctx.layer_valid[:, None, :, None, None], float("-inf"))
        weights = scores.float().softmax(dim=2).to(v.dtype)  # over the key layers
        out = (weights[..., None] * v[:, None]).sum(2)  # (B, L, N, H, d)
        return attn.to_out(out.reshape(BL, N, C))


class LayerCollabTransformerBlock(nn.Module):
    """An SD `BasicTransformerBlock` followed by a `LayerCollaborativeBlock`; drop-in for the SD block.

    Same call signature as `BasicTransformerBlock`, so `Transformer2DModel` (and its gradient checkpointing,
    which then covers both blocks) calls it unchanged. Expects a `LayerContext` under
    `cross_attention_kwargs["layer_context"]`.
    """

    def __init__(self, block: BasicTransformerBlock, collab: LayerCollaborativeBlock):
        super().__init__()
        self.block = block
        self.collab = collab
        # recompute only the collab block in backward (saves its activations; see LayerDiffUNet)
        self.checkpoint_collab = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        kwargs = dict(cross_attention_kwargs or {})
        ctx = kwargs.pop(LAYER_CONTEXT_KEY, None)
        if not isinstance(ctx, LayerContext):
            raise ValueError(
                "LayerCollabTransformerBlock needs a LayerContext in cross_attention_kwargs['layer_context']; "
                "call LayerDiffUNet.forward rather than the wrapped UNet directly"
            )
        hidden_states = self.block(
            hidden_states,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            cross_attention_kwargs=kwargs or None,
            class_labels=class_labels,
            added_cond_kwargs=added_cond_kwargs,
        )  # (B·L, N, C)
        if self.checkpoint_collab and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.collab, hidden_states, ctx, use_reentrant=False)
        return self.collab(hidden_states, ctx)
