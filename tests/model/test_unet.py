"""LayerDiffUNet: parity with SD at init, padding isolation, gradients, persistence, checkpointing, layer text."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from model.network.layer_attention import LAYER_CONTEXT_KEY, LayerContext
from model.network.unet import LayerDiffUNet
from tests.builders import SIZE, T_GLOBAL, T_LAYER, TEXT_DIM, make_inputs, randomize_new_modules, tiny_sd_unet


@pytest.fixture(scope="module")
def sd_unet() -> UNet2DConditionModel:
    return tiny_sd_unet()


@torch.no_grad()
def sd_reference(sd: UNet2DConditionModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """SD on each layer's image latent with the global prompt → (B, L, 4, h, w)."""
    x, t, g = inputs["sample"], inputs["timesteps"], inputs["global_text"]
    B, L = x.shape[:2]
    out = sd(x[:, :, :4].reshape(B * L, 4, SIZE, SIZE), t.reshape(B * L), g.repeat_interleave(L, dim=0)).sample
    return out.reshape(B, L, 4, SIZE, SIZE)


@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_parity_with_sd_at_init(sd_unet, num_layers):
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=4).eval()
    inputs = make_inputs(B=2, L=num_layers)
    assert num_layers == 1 or len(inputs["timesteps"][0].unique()) > 1  # per-layer timesteps really differ
    with torch.no_grad():
        out = model(**inputs).sample
    ref = sd_reference(sd_unet, inputs)
    assert out.shape == (2, num_layers, 8, SIZE, SIZE)
    torch.testing.assert_close(out[:, :, :4], ref, atol=1e-5, rtol=0)
    # mask head at init = SD's conv_out on the same features (the features do not see the mask latent yet)
    torch.testing.assert_close(out[:, :, 4:], ref, atol=1e-5, rtol=0)


def test_parity_with_padding_layers(sd_unet):
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=4).eval()
    inputs = make_inputs(B=3, L=4, seed=5)
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = model(**inputs, layer_valid=valid).sample
    ref = sd_reference(sd_unet, inputs)
    torch.testing.assert_close(out[valid][:, :4], ref[valid], atol=1e-5, rtol=0)
    assert torch.all(out[~valid] == 0)


def test_padding_content_never_reaches_valid_layers(sd_unet):
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=4).eval()
    randomize_new_modules(model)
    inputs = make_inputs(B=2, L=4, seed=7)
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    other = {k: v.clone() for k, v in inputs.items()}
    g = torch.Generator().manual_seed(99)
    pad = ~valid
    other["sample"][pad] = torch.randn(other["sample"][pad].shape, generator=g) * 10
    other["layer_text"][pad] = torch.randn(other["layer_text"][pad].shape, generator=g) * 10
    other["timesteps"][pad] = 999 - other["timesteps"][pad]
    with torch.no_grad():
        a = model(**inputs, layer_valid=valid).sample
        b = model(**other, layer_valid=valid).sample
        c = model(**other).sample  # same content, but now the padding layers count
    torch.testing.assert_close(a[valid], b[valid], atol=1e-6, rtol=0)
    assert (c[valid] - a[valid]).abs().max() > 1e-3  # the randomised layer attention really mixes layers


def test_timestep_broadcast(sd_unet):
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=4).eval()
    randomize_new_modules(model)
    inputs = make_inputs(B=2, L=3)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        per_layer = model(**{**inputs, "timesteps": t[:, None].expand(2, 3)}).sample
        per_sample = model(**{**inputs, "timesteps": t}).sample
        scalar = model(**{**inputs, "timesteps": 10}).sample
        per_layer_10 = model(**{**inputs, "timesteps": torch.full((2, 3), 10)}).sample
    torch.testing.assert_close(per_sample, per_layer)
    torch.testing.assert_close(scalar, per_layer_10)


def test_every_parameter_learns(sd_unet):
    """After one AdamW step every parameter gets gradient, except the prompt enhancer's inner weights: they sit
    behind TWO zero-initialised linears in series (enhancer output projections → intra-layer attention output),
    so they need a second step; then every parameter gets gradient."""
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=2).train()
    inputs = make_inputs(B=2, L=2, seed=3)
    target = torch.randn(2, 2, 8, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def backward_and_list_dead() -> list[str]:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(**inputs).sample, target).backward()
        return [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]

    new = model.new_parameters()
    for group in ["inter_attn", "intra_attn", "collab.ff", "layer_pos", "prompt_enhancer", "conv_in_mask",
                  "mask_scale", "conv_out_mask"]:
        assert any(group in name for name in new), group  # every kind of new module is present

    backward_and_list_dead()
    opt.step()
    dead = backward_and_list_dead()
    enhancer_outputs = ("self_attn.to_out", "cross_attn.to_out", "ff.net.2")
    assert dead, "expected the enhancer's inner weights to wait one more step"
    assert all(n.startswith("prompt_enhancer.") and not any(o in n for o in enhancer_outputs) for n in dead), dead
    opt.step()
    assert backward_and_list_dead() == []


def test_save_and_load_round_trip(sd_unet, tmp_path):
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=3, use_prompt_enhancer=True).eval()
    randomize_new_modules(model)
    model.save_pretrained(tmp_path / "ld")
    from model.network.unet import WEIGHTS_NAME
    from model.training.checkpoint import WEIGHTS

    assert WEIGHTS == WEIGHTS_NAME and (tmp_path / "ld" / WEIGHTS_NAME).exists()
    assert not (tmp_path / "ld" / "diffusion_pytorch_model.safetensors").exists()
    loaded = LayerDiffUNet.from_pretrained(tmp_path / "ld").eval()
    assert loaded.config.max_layers == 3 and loaded.in_channels_per_layer == 8 and loaded.latent_channels == 4
    inputs = make_inputs(B=1, L=3)
    valid = torch.tensor([[True, True, False]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, layer_valid=valid).sample,
                                   model(**inputs, layer_valid=valid).sample, atol=0, rtol=0)


def test_plain_sd_unet_class_refuses_a_layerdiff_folder(sd_unet, tmp_path):
    """The trap: UNet2DConditionModel.from_pretrained on a LayerDiff unet/ folder must fail, not load random weights."""
    from diffusers import UNet2DConditionModel

    LayerDiffUNet.from_unet(sd_unet, max_layers=2).save_pretrained(tmp_path / "run" / "unet")
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        UNet2DConditionModel.from_pretrained(tmp_path / "run", subfolder="unet")


@pytest.mark.parametrize("mode", ["full", "layer_blocks"])
def test_gradient_checkpointing_matches(sd_unet, mode):
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=2).train()
    randomize_new_modules(model)
    inputs = make_inputs(B=2, L=2)
    valid = torch.tensor([[True, True], [True, False]])

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, layer_valid=valid).sample.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = loss_and_grads()
    if mode == "full":
        model.enable_gradient_checkpointing()
        assert model.is_gradient_checkpointing
    else:
        model.enable_layer_block_checkpointing()
        assert all(w.checkpoint_collab for w in model.collab_blocks())
    loss_b, grads_b = loss_and_grads()
    model.disable_gradient_checkpointing()
    model.enable_layer_block_checkpointing(False)
    assert not model.is_gradient_checkpointing
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("use_prompt_enhancer", [True, False])
def test_layer_text_matters(sd_unet, use_prompt_enhancer):
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=3, use_prompt_enhancer=use_prompt_enhancer).eval()
    assert (model.prompt_enhancer is not None) == use_prompt_enhancer
    inputs = make_inputs(B=1, L=3)
    swapped = dict(inputs, layer_text=inputs["layer_text"][:, [0, 2, 1]])
    with torch.no_grad():
        same_a, same_b = model(**inputs).sample, model(**swapped).sample
        torch.testing.assert_close(same_a, same_b, atol=1e-5, rtol=0)  # at init: SD, layer text unused
        randomize_new_modules(model)
        a, b = model(**inputs).sample, model(**swapped).sample
    for layer in (1, 2):
        assert (a[:, layer] - b[:, layer]).abs().max() > 1e-3


def test_bad_inputs_raise_clear_errors(sd_unet):
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=2).eval()
    inputs = make_inputs(B=1, L=2)
    with pytest.raises(ValueError, match="sample must be"):
        model(**{**inputs, "sample": inputs["sample"][:, :, :4]})
    with pytest.raises(ValueError, match="exceed max_layers"):
        model(**make_inputs(B=1, L=3))
    with pytest.raises(ValueError, match="layer_text must be"):
        model(**{**inputs, "layer_text": inputs["layer_text"][:, :1]})
    with pytest.raises(ValueError, match="timesteps must be"):
        model(**{**inputs, "timesteps": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="at least one valid layer"):
        model(**inputs, layer_valid=torch.tensor([[False, False]]))
    with pytest.raises(ValueError, match="unsupported UNet options"):
        LayerDiffUNet(unet_config={**dict(sd_unet.config), "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="in_channels"):
        LayerDiffUNet(unet_config={**dict(sd_unet.config), "in_channels": 9})


def test_from_unet_copies_sd_weights(sd_unet):
    model = LayerDiffUNet.from_unet(sd_unet, max_layers=2)
    torch.testing.assert_close(model.conv_in_mask.weight, sd_unet.conv_in.weight)
    torch.testing.assert_close(model.conv_out_mask.weight, sd_unet.conv_out.weight)
    assert model.mask_scale.item() == 0.0
    wrapper = model.collab_blocks()[0]
    sd_block = sd_unet.down_blocks[0].attentions[0].transformer_blocks[0]
    torch.testing.assert_close(wrapper.collab.intra_attn.to_k.weight, sd_block.attn2.to_k.weight)
    torch.testing.assert_close(wrapper.block.attn1.to_q.weight, sd_block.attn1.to_q.weight)
    assert torch.all(wrapper.collab.intra_attn.to_out.weight == 0)
    assert torch.all(wrapper.collab.inter_attn.to_out.weight == 0)
    assert torch.all(wrapper.collab.ff.net[-1].weight == 0)


@pytest.mark.slow
def test_benchmarks_run_tiny(capsys):
    from benchmarks import train as bench_train
    from benchmarks import train_gpu as bench_train_gpu

    rows = bench_train.main(["--tiny", "--layers", "2", "--repeats", "1", "--warmup", "0"])
    assert [r["model"] for r in rows] == ["plain UNet", "LayerDiff", "LayerDiff, collab ckpt"]
    assert all(r["s"] > 0 and r["cpu_s"] > 0 and r["mem"] > r["step_mem"] > 0 for r in rows)
    results = bench_train_gpu.main(["--tiny", "--batch-sizes", "1", "--layers", "2", "--steps", "1", "--warmup", "0"])
    assert {r.status for r in results} == {"ok"} and len(results) == 5
    assert "| layerdiff | collab |" in capsys.readouterr().out


def test_full_sd15_geometry_shapes_on_meta_device():
    """The real SD 1.5 UNet config builds and runs shape-correctly (meta tensors: no memory, no compute)."""
    from benchmarks.train import SD15_GEOMETRY

    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD15_GEOMETRY.unet_config())
        model = LayerDiffUNet(unet_config=dict(sd.config), max_layers=4)
        sample = torch.empty(2, 4, 8, 32, 32)
        out = model(sample, torch.zeros(2, 4, dtype=torch.long), torch.empty(2, 77, 768),
                    torch.empty(2, 4, 77, 768)).sample
    assert out.shape == (2, 4, 8, 32, 32)
    assert len(model.collab_blocks()) == 16  # one per SD transformer block
    n_sd = sum(p.numel() for p in sd.parameters())
    assert sum(p.numel() for p in model.parameters()) - n_sd == sum(p.numel() for p in model.new_parameters().values())


# ------------------------------------------------------------------ the forward copy vs diffusers' own forward


@torch.no_grad()
def diffusers_forward(model: LayerDiffUNet, sample, timesteps, global_text, layer_text) -> torch.Tensor:
    """Reference: diffusers' own `UNet2DConditionModel.forward` on the same module and weights. The mask branch is
    attached by hooks (conv_in sees the image latent and gets the gated conv_in_mask term added; conv_out's input
    also goes through conv_out_mask), the layer context travels in cross_attention_kwargs → (B, L, 8, h, w)."""
    B, L, C2, h, w = sample.shape
    c = C2 // 2
    x = sample.reshape(B * L, C2, h, w)  # (B·L, 8, h, w)
    enhanced = model.prompt_enhancer(layer_text, global_text, None) if model.prompt_enhancer else layer_text
    ctx = LayerContext(num_layers=L, layer_text=enhanced.reshape(B * L, *enhanced.shape[2:]))
    unet = model.unet
    hooks = [
        unet.conv_in.register_forward_pre_hook(lambda _m, args: (args[0][:, :c],)),
        unet.conv_in.register_forward_hook(lambda _m, _a, out: out + model.mask_scale * model.conv_in_mask(x[:, c:])),
        unet.conv_out.register_forward_hook(lambda _m, args, out: torch.cat([out, model.conv_out_mask(args[0])], 1)),
    ]
    try:
        out = unet(x, timesteps.reshape(B * L), global_text.repeat_interleave(L, dim=0),
                   cross_attention_kwargs={LAYER_CONTEXT_KEY: ctx}).sample
    finally:
        for hook in hooks:
            hook.remove()
    return out.reshape(B, L, C2, h, w)


def parity_inputs(model: LayerDiffUNet, B: int, L: int, size: int, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = model.unet.config.cross_attention_dim
    return {"sample": torch.randn(B, L, 8, size, size, generator=g),
            "timesteps": torch.randint(0, 1000, (B, L), generator=g),
            "global_text": torch.randn(B, 7, d, generator=g), "layer_text": torch.randn(B, L, 5, d, generator=g)}


PARITY_CONFIGS = {
    "sd-1.x": {},
    "time_embedding_act_fn + timestep_post_act": dict(time_embedding_act_fn="silu", timestep_post_act="mish"),
    "scale_shift, linear projection, upcast, 2 transformer layers": dict(
        resnet_time_scale_shift="scale_shift", use_linear_projection=True, upcast_attention=True,
        transformer_layers_per_block=2),
    "fourier time embedding, conv kernels 1/5": dict(time_embedding_type="fourier", time_embedding_dim=64,
                                                      conv_in_kernel=1, conv_out_kernel=5),
    "no mid block, only_cross_attention": dict(mid_block_type=None, only_cross_attention=True),
}


@pytest.mark.parametrize("overrides", PARITY_CONFIGS.values(), ids=PARITY_CONFIGS.keys())
@pytest.mark.parametrize("size", [SIZE, 15])  # 15: not a multiple of the up factor (explicit upsample sizes)
def test_forward_equals_diffusers_forward(sd_unet, overrides, size):
    torch.manual_seed(0)
    model = LayerDiffUNet(unet_config={**dict(sd_unet.config), **overrides}, max_layers=3).eval()
    randomize_new_modules(model)  # every new branch live, mask gate included
    if overrides.get("time_embedding_act_fn"):
        assert model.unet.time_embed_act is not None
    inputs = parity_inputs(model, B=2, L=3, size=size)
    with torch.no_grad():
        ours = model(**inputs).sample
    ref = diffusers_forward(model, **inputs)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours[:, :, 4:].abs().max() > 0


# Non-default values for every option the forward refuses.
REFUSED = {
    "center_input_sample": True, "class_embed_type": "timestep", "num_class_embeds": 10,
    "class_embeddings_concat": True, "projection_class_embeddings_input_dim": 16, "addition_embed_type": "text",
    "addition_time_embed_dim": 8, "addition_embed_type_num_heads": 4, "encoder_hid_dim": 16,
    "encoder_hid_dim_type": "text_proj", "time_cond_proj_dim": 8, "dual_cross_attention": True,
    "attention_type": "gated",
    "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
}


def test_every_unet_option_is_supported_or_refused():
    import inspect

    from model.network import unet as U

    options = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    assert options == U.SUPPORTED_UNET_OPTIONS | set(U._UNSUPPORTED) | set(U._BLOCK_TYPES)
    assert set(REFUSED) == set(U._UNSUPPORTED) | set(U._BLOCK_TYPES)  # each refusal is tested below


@pytest.mark.parametrize(("option", "value"), REFUSED.items(), ids=REFUSED.keys())
def test_unsupported_unet_option_is_refused(sd_unet, option, value):
    with pytest.raises(ValueError, match=option):
        LayerDiffUNet(unet_config={**dict(sd_unet.config), option: value})


# diffusers' SD 1.5 unet/config.json (runwayml/stable-diffusion-v1-5), verbatim apart from the private keys
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


@pytest.mark.slow
def test_forward_equals_diffusers_forward_on_full_sd15_geometry():
    """The full SD 1.5 UNet (860 M parameters, random weights) + every LayerDiff branch randomised: our forward
    equals diffusers' own on the same weights (5.6 GB RAM; 3 min wall here, 20 s of it CPU)."""
    torch.manual_seed(0)
    model = LayerDiffUNet(unet_config=SD15_UNET_CONFIG, max_layers=4).eval()
    assert len(model.collab_blocks()) == 16
    randomize_new_modules(model, std=0.02)
    inputs = parity_inputs(model, B=1, L=3, size=16)
    with torch.no_grad():
        ours = model(**inputs).sample
    ref = diffusers_forward(model, **inputs)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert ours.abs().max() > 0 and ours[:, :, 4:].abs().max() > 0
