"""LayerPromptEnhancer: identity at init, padding isolation, layers and global prompt both matter, all learn."""

from __future__ import annotations

import pytest
import torch

from model.network.prompt_enhancer import LayerPromptEnhancer

B, L, T, TG, D = 2, 3, 5, 7, 32


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, T, D, generator=g), torch.randn(B, TG, D, generator=g)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("use_ffn", [True, False])
def test_identity_at_init(use_ffn):
    enhancer = LayerPromptEnhancer(D, heads=4, max_layers=4, use_ffn=use_ffn)
    layer_text, global_text = inputs()
    out = enhancer(layer_text, global_text, torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert out.shape == (B, L, T, D)
    torch.testing.assert_close(out, layer_text, atol=0, rtol=0)
    assert (enhancer.ff is None) == (not use_ffn)


def test_padding_layers_do_not_reach_valid_layers():
    enhancer = LayerPromptEnhancer(D, heads=4, max_layers=4)
    randomize(enhancer)
    layer_text, global_text = inputs()
    valid = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    other = layer_text.clone()
    other[~valid] = torch.randn(other[~valid].shape) * 5
    with torch.no_grad():
        a, b = enhancer(layer_text, global_text, valid), enhancer(other, global_text, valid)
        c = enhancer(other, global_text)  # no mask: padding content now leaks (proves the mask does the work)
    torch.testing.assert_close(a[valid], b[valid], atol=1e-6, rtol=0)
    assert (c[valid] - b[valid]).abs().max() > 1e-3


def test_other_layers_and_global_prompt_matter():
    enhancer = LayerPromptEnhancer(D, heads=4, max_layers=4)
    randomize(enhancer)
    layer_text, global_text = inputs()
    with torch.no_grad():
        base = enhancer(layer_text, global_text)
        changed_layer = layer_text.clone()
        changed_layer[:, 2] += torch.randn(B, T, D)  # (a constant shift would vanish in the LayerNorm)
        cross_layer = enhancer(changed_layer, global_text)
        new_global = enhancer(layer_text, global_text + torch.randn(B, TG, D))
        swapped = enhancer(layer_text[:, [1, 0, 2]], global_text)
    assert (cross_layer[:, 0] - base[:, 0]).abs().max() > 1e-3  # self-attention spans all layers' tokens
    assert (new_global - base).abs().max() > 1e-3  # cross-attention to the global prompt
    # the layer-index embedding tells identical content on different layer slots apart
    assert (swapped[:, 0] - base[:, 1]).abs().max() > 1e-3


def test_all_parameters_learn_after_one_step():
    enhancer = LayerPromptEnhancer(D, heads=4, max_layers=3)
    layer_text, global_text = inputs()
    target = torch.randn(B, L, T, D)
    opt = torch.optim.AdamW(enhancer.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(enhancer(layer_text, global_text), target).backward()
        opt.step() if _ == 0 else None
    dead = [n for n, p in enhancer.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []


def test_bad_inputs():
    enhancer = LayerPromptEnhancer(D, heads=4, max_layers=2)
    layer_text, global_text = inputs()
    with pytest.raises(ValueError, match="exceed max_layers"):
        enhancer(layer_text, global_text)
    with pytest.raises(ValueError, match="expects layer_text"):
        enhancer(layer_text[:, 0], global_text)
    with pytest.raises(ValueError, match="not divisible"):
        LayerPromptEnhancer(30, heads=4)
