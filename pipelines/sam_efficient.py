"""SAM's image encoder within GPU memory: attention through `F.scaled_dot_product_attention`, and the batch size
that fits the free device memory.

Attention. segment-anything's ViT `Attention` materialises the (B·heads, N, N) score matrix and adds the
decomposed relative-position bias to it (`add_decomposed_rel_pos`): at ViT-H's global blocks N = 64² = 4096, so
one image holds 16 · 4096² scores (1 GiB in fp32) several times over. The bias has a low-rank form,

    bias[q, (kh, kw)] = rel_h[q, kh] + rel_w[q, kw] = [rel_h[q] | rel_w[q]] · [onehot(kh) | onehot(kw)],

so appending `rel_h | rel_w` to each (pre-scaled) query and the one-hot key position to each key gives
q'·k' = scale·q·k + bias exactly. `sdpa_forward` does that and calls SDPA with `scale=1`: the same numbers
(up to float rounding; `test_sam_sdpa_matches_eager` checks it on CPU), computed by the fused
memory-efficient/flash kernels that never store the N×N matrix. Head dims are zero-padded to a multiple of 8
(ViT-H: 80 + 64 + 64 → 208 at global blocks, 80 + 14 + 14 → 112 in windows), which the fused kernels need.

Memory. `activation_bytes(g, dtype_bytes)` is the per-image peak of live activations in the encoder with
`sdpa_forward` (which frees each temporary as soon as it can). Per block, with N = (img/patch)² tokens, N_a the
attended tokens (N at global blocks; windows padded: ViT-H ⌈64/14⌉²·14² = 4900), C channels, D the padded
head dim: the attention phase holds the shortcut N·C plus N_a·max(4·C + 3·heads·D, C + 4·heads·D) (x, qkv, q', k',
v' while v is padded | x, q', k', v', output), the MLP phase N·(2·C + 8·C). Checked against the live-tensor
peak measured op by op on CPU (`test_activation_formula_matches_measured_peak`: within 5%). ViT-H in bf16:
128 MiB per image (the eager fp32 attention holds 16 · 4096² · 4 B = 1 GiB of scores per image per copy at a
global block — scores, scores + bias, softmax). `batch_size_for_memory` divides the free device memory (what
`torch.cuda.mem_get_info` reports free plus what PyTorch's caching allocator holds unused) by `SAFETY` × that
peak (256 MiB: fragmentation, cuBLAS/cuDNN workspaces, the neck and the decoder) and clamps it to [1, cap]; the
segment stage does it once, at its first call, when every model of the actor is loaded and the other stages'
transient activations are back in the allocator's cache (stages run one after another, so SAM can reuse them).
The cap (32 by default) matches the runner's default chunk of 32 items, the most one call can see. Per GPU class,
with every model of the `real` preset resident in bf16 (≈ 11.2 GiB: InstructBLIP-Flan-T5-XL 7.7, SD 1.5
inpainting 2.0, SAM ViT-H 1.2, OWLv2-B 0.3, Depth-Anything-S 0.05) and ~0.5 GiB of CUDA context:

    GPU (usable memory)      free for SAM    ⌊free / 256 MiB⌋    batch used (cap 32)
    T4 16 GB (14.6 GiB)      2.9 GiB         11                  11 (fp16: no bf16)
    L4 (22.0 GiB)            10.3 GiB        41                  32
    A10G (22.5 GiB)          10.8 GiB        43                  32
    A100 40 GB (39.4 GiB)    27.7 GiB        110                 32
    A100/H100 80 GB (79.2)   67.5 GiB        270                 32
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SAFETY = 2.0  # allocator fragmentation, cuBLAS/cuDNN workspaces, the neck and the decoder of one image


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def sdpa_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`segment_anything.modeling.image_encoder.Attention.forward` through SDPA: (B, H, W, C) → (B, H, W, C)."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, h, w, _ = x.shape
    n, heads = h * w, self.num_heads
    qkv = self.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    q, k, v = qkv.unbind(0)  # (B, heads, N, d) each
    del qkv  # its storage lives on only through q, k, v
    d = q.shape[-1]
    if self.use_rel_pos:
        rh, rw = get_rel_pos(h, h, self.rel_pos_h), get_rel_pos(w, w, self.rel_pos_w)  # (h, h, d), (w, w, d)
        r_q = q.reshape(b * heads, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh.to(q.dtype)).reshape(b, heads, n, h)  # bias over key rows
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw.to(q.dtype)).reshape(b, heads, n, w)  # bias over key cols
        dim = _pad8(d + h + w)
        rows = torch.arange(h, device=x.device).repeat_interleave(w)  # (N,) key row of each key token
        cols = torch.arange(w, device=x.device).repeat(h)  # (N,) key column
        onehot = torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], dim=-1).to(q.dtype)  # (N, h + w)
        zeros = q.new_zeros(b, heads, n, dim - d - h - w)  # padding to a multiple of 8: changes no dot product
        q = torch.cat([q * self.scale, rel_h, rel_w, zeros], dim=-1)  # (B, heads, N, dim)
        del rel_h, rel_w, r_q  # free before the next copies (activation_bytes counts what stays alive)
        k = torch.cat([k, onehot.expand(b, heads, n, h + w), zeros], dim=-1)  # (B, heads, N, dim)
        scale = 1.0
    else:
        dim, scale = _pad8(d), self.scale
        q, k = F.pad(q, (0, dim - d)), F.pad(k, (0, dim - d))
    v = F.pad(v, (0, dim - d))  # (B, heads, N, dim): fused kernels want one head dim
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :d]  # (B, heads, N, d)
    del q, k, v
    out = out.permute(0, 2, 1, 3).reshape(b, h, w, heads * d)  # (B, H, W, C)
    return self.proj(out)


def use_sdpa(sam) -> int:
    """Route every ViT attention of `sam.image_encoder` through `sdpa_forward`; returns how many were switched."""
    from segment_anything.modeling.image_encoder import Attention

    count = 0
    for module in sam.image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = sdpa_forward.__get__(module)
            count += 1
    return count


def activation_bytes(geometry, dtype_bytes: int = 2) -> int:
    """Per-image activation peak of SAM's image encoder with SDPA attention (see the module docstring)."""
    g = geometry
    side, c, heads = g.img_size // g.patch_size, g.encoder_embed_dim, g.encoder_num_heads
    d = c // heads
    peak = 0
    tokens = side * side  # N
    for block in range(g.encoder_depth):
        window = 0 if block in g.encoder_global_attn_indexes else g.window_size
        span = side if window == 0 else window  # attention grid side
        attended = tokens if window == 0 else math.ceil(side / window) ** 2 * window * window  # N_a, padded
        dim = _pad8(d + 2 * span)  # D
        # shortcut (N·C), then the larger of: x, qkv, q', k', v' (while v is padded) | x, q', k', v', output
        attention = tokens * c + attended * max(4 * c + 3 * heads * dim, c + 4 * heads * dim)
        mlp = tokens * (2 * c + 2 * 4 * c)  # x, norm, fc1, GELU
        peak = max(peak, attention, mlp)
    return peak * dtype_bytes


def free_device_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, counting what PyTorch's caching allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def batch_size_for_memory(free_bytes: int, geometry, dtype_bytes: int, cap: int) -> int:
    """⌊free / (SAFETY · activation_bytes)⌋ clamped to [1, cap]."""
    per_image = SAFETY * activation_bytes(geometry, dtype_bytes)
    return max(1, min(int(cap), int(free_bytes // per_image)))
