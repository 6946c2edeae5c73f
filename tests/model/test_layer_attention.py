"""Layer-collaborative block: the broadcast inter-layer attention (small maps) and the SDPA one (large maps) both
equal the unfused math, written out here per position in float64, on random weights, padding layers included."""

from __future__ import annotations

import pytest
import torch

from model.network import layer_attention as LA
from model.network.layer_attention import LayerCollaborativeBlock, LayerContext


@torch.no_grad()
def reference_inter_layer(block: LayerCollaborativeBlock, x: torch.Tensor, L: int,
                          valid: torch.Tensor | None) -> torch.Tensor:
    """Normed x (B·L, N, C) → inter-layer attention (B·L, N, C): at each position n of sample b, the L layer
    vectors (+ layer embedding) attend to each other, head by head, softmax(q·k/√d) over valid key layers."""
    attn = block.inter_attn
    BL, N, C = x.shape
    B, H = BL // L, attn.heads
    d = C // H
    x = x.double().reshape(B, L, N, C)
    if block.layer_pos is not None:
        x = x + block.layer_pos[:L, None].double()
    out = torch.zeros(B, L, N, C, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            tokens = x[b, :, n]  # (L, C)
            q, k, v = (tokens @ p.weight.double().T for p in (attn.to_q, attn.to_k, attn.to_v))
            heads = []
            for h in range(H):
                sl = slice(h * d, (h + 1) * d)
                scores = q[:, sl] @ k[:, sl].T / d**0.5  # (L, L)
                if valid is not None:
                    scores[:, ~valid[b]] = float("-inf")
                heads.append(scores.softmax(dim=1) @ v[:, sl])
            out[b, :, n] = torch.cat(heads, dim=1)
    out = out.reshape(BL, N, C) @ attn.to_out.weight.double().T + attn.to_out.bias.double()
    return out.float()


def random_block(C: int, seed: int = 0) -> LayerCollaborativeBlock:
    torch.manual_seed(seed)
    block = LayerCollaborativeBlock(dim=C, text_dim=16, heads=4, max_layers=4)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.eval()


@pytest.mark.parametrize("L", [1, 2, 3, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_both_inter_layer_paths_equal_the_unfused_math(L, padded):
    B, N, C = 2, 6, 16
    block = random_block(C, seed=L)
    x = torch.randn(B * L, N, C, generator=torch.Generator().manual_seed(1))
    valid = None
    if padded:
        valid = torch.ones(B, L, dtype=torch.bool)
        valid[1, L - 1] = L == 1  # the last layer of sample 1 is padding (a sample keeps >= 1 valid layer)
    ctx = LayerContext(num_layers=L, layer_text=torch.zeros(B * L, 3, 16), layer_valid=valid)
    ref = reference_inter_layer(block, x, L, valid)
    with torch.no_grad():
        broadcast = block._inter_layer_broadcast(x, ctx)
        sdpa = block._inter_layer_sdpa(x, ctx)
    torch.testing.assert_close(broadcast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa, ref, atol=1e-5, rtol=1e-5)


def test_forward_picks_the_path_by_size_and_both_agree(monkeypatch):
    B, L, N, C = 1, 3, 8, 16
    block = random_block(C)
    x = torch.randn(B * L, N, C, generator=torch.Generator().manual_seed(2))
    ctx = LayerContext(num_layers=L, layer_text=torch.randn(B * L, 3, 16))
    used = []
    for name in ("_inter_layer_broadcast", "_inter_layer_sdpa"):
        real = getattr(block, name)
        monkeypatch.setattr(block, name, lambda x, ctx, real=real, name=name: used.append(name) or real(x, ctx))
    with torch.no_grad():
        small = block(x, ctx)
        monkeypatch.setattr(LA, "BROADCAST_MAX_ELEMENTS", B * L * L * N * C - 1)
        large = block(x, ctx)
    assert used == ["_inter_layer_broadcast", "_inter_layer_sdpa"]
    torch.testing.assert_close(small, large, atol=1e-5, rtol=1e-5)
