"""SAM box-prompted masks with the tiny segment-anything preset: shapes, batching, thresholds, safe loading."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipelines.base import Detection, Item
from pipelines.devices import ModelStageConfig
from pipelines.segment import SAM_ARCHS, SamGeometry, SamSegmenter, SegmentOptions, clip_box, load_sam


def sam_stage(model, batch_size=4, **options):
    return SamSegmenter(ModelStageConfig(model=str(model), device="cpu", batch_size=batch_size),
                        SegmentOptions(**options))


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    from pipelines.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"), only=["sam"])["sam"]


def _items(n=3, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h = 40 + 8 * i
        img = rng.integers(0, 255, (h, 64, 3), dtype=np.uint8)
        img[8:24, 8:30] = (250, 20, 20)
        dets = [Detection((8.0, 8.0, 30.0, 24.0), 0.9, "Person"), Detection((20.0, 10.0, 60.0, h - 2.0), 0.5, "Car")]
        items.append(Item(key=f"k{i}", image=img, detections=dets))
    return items


def test_masks_shapes_order_and_batching(sam_dir):
    seg = sam_stage(sam_dir, 3, mask_threshold=-1e9)
    items = seg(_items())
    for it in items:
        assert it.alive
        assert len(it.masks) == len(it.detections) == 2
        for m in it.masks:
            assert m.dtype == bool and m.shape == it.image.shape[:2]
            assert m.all()  # threshold below every logit: the whole image
    # batched image encoder == one image at a time
    seg.mask_threshold = 0.0
    batched = seg(_items())
    seg.batch_size = 1
    single = seg(_items())
    for a, b in zip(batched, single):
        for ma, mb in zip(a.masks, b.masks):
            np.testing.assert_array_equal(ma, mb)


def test_clip_to_box_and_no_mask_drop(sam_dir):
    seg = sam_stage(sam_dir, mask_threshold=-1e9, clip_to_box=True)
    it = seg(_items(1))[0]
    for m, d in zip(it.masks, it.detections):
        x0, y0, x1, y1 = clip_box(d.box, *m.shape)
        assert m[y0:y1, x0:x1].all() and m.sum() == (x1 - x0) * (y1 - y0)
    seg = sam_stage(sam_dir, mask_threshold=1e9)
    it = seg(_items(1))[0]
    assert it.drop_reason == "no_mask"


def test_dropped_items_are_skipped(sam_dir):
    items = _items(2)
    items[0].drop("no_detection")
    sam_stage(sam_dir)(items)
    assert items[0].masks == [] and len(items[1].masks) == 2


def test_load_sam_folder_and_file(sam_dir, tmp_path):
    config = json.loads((sam_dir / "sam_config.json").read_text())
    assert SamGeometry.from_dict(config).img_size == 64
    sam = load_sam(sam_dir)
    ref = torch.load(sam_dir / "sam.pth", weights_only=True)
    assert torch.equal(sam.state_dict()["mask_decoder.iou_token.weight"], ref["mask_decoder.iou_token.weight"])
    # a bare checkpoint file takes its geometry from `arch`: the tiny weights do not fit ViT-H
    with pytest.raises(RuntimeError):
        load_sam(sam_dir / "sam.pth", arch="vit_b")
    assert SAM_ARCHS["vit_h"].encoder_embed_dim == 1280


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="SAM checkpoint"):
        sam_stage(tmp_path / "sam_vit_h_4b8939.pth").setup()
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="sam_config.json"):
        load_sam(tmp_path / "folder")


def test_vit_h_geometry_matches_segment_anything_registry():
    """Our builder at the ViT-H geometry makes exactly `sam_model_registry["vit_h"]`'s parameters (on meta)."""
    from segment_anything import sam_model_registry

    from pipelines.segment import build_sam_model

    with torch.device("meta"):
        ours, theirs = build_sam_model(SAM_ARCHS["vit_h"]).state_dict(), sam_model_registry["vit_h"]().state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize("window", [4, 3])  # 3: the 8×8 token grid is padded to 9×9 in windows
def test_sam_sdpa_matches_eager(window):
    """SDPA with the relative-position bias folded into q/k gives segment-anything's own attention (CPU, fp32)."""
    from pipelines.sam_efficient import use_sdpa
    from pipelines.segment import build_sam_model
    from pipelines.tiny import tiny_sam_geometry

    geometry = SamGeometry(**{**tiny_sam_geometry().to_dict(), "window_size": window,
                              "encoder_global_attn_indexes": (1,)})
    torch.manual_seed(0)
    sam = build_sam_model(geometry)
    with torch.no_grad():  # zero-initialised rel-pos tables would hide the bias path
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        eager = sam.image_encoder(x)
        assert use_sdpa(sam) == geometry.encoder_depth
        fused = sam.image_encoder(x)
    assert eager.shape == fused.shape == (2, 32, 8, 8)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)


def test_sam_half_weights_and_eager_option(sam_dir):
    """bf16 weights (what CUDA gets) run through autocast and give masks; 'eager' keeps segment-anything's forward."""
    seg = SamSegmenter(ModelStageConfig(model=str(sam_dir), device="cpu", dtype="bfloat16", batch_size=2))
    items = seg(_items(2))
    assert seg.predictor.model.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert all(len(it.masks) == 2 and it.masks[0].dtype == bool for it in items)
    eager = sam_stage(sam_dir, attention="eager")
    eager.setup()
    sdpa = sam_stage(sam_dir)
    sdpa.setup()
    attn = lambda s: s.predictor.model.image_encoder.blocks[0].attn  # noqa: E731
    assert "forward" not in vars(attn(eager)) and "forward" in vars(attn(sdpa))
    with pytest.raises(ValueError, match="attention"):
        SegmentOptions(attention="flash")


def test_memory_sized_batch():
    from pipelines.sam_efficient import SAFETY, activation_bytes, batch_size_for_memory

    vit_h = SAM_ARCHS["vit_h"]
    per_image = activation_bytes(vit_h, 2)
    assert per_image == 128 * 2**20  # bf16 (module docstring)
    assert activation_bytes(vit_h, 4) == 2 * per_image
    assert batch_size_for_memory(8 * 2**30, vit_h, 2, cap=32) == int(8 * 2**30 // (SAFETY * per_image)) == 32
    assert batch_size_for_memory(6 * 2**30, vit_h, 2, cap=32) == 24
    assert batch_size_for_memory(64 * 2**30, vit_h, 2, cap=32) == 32
    assert batch_size_for_memory(2**20, vit_h, 2, cap=32) == 1
    assert activation_bytes(SAM_ARCHS["vit_b"], 2) < per_image


def test_auto_batch_on_cpu(sam_dir):
    from pipelines.segment import AUTO_BATCH, CPU_AUTO_BATCH

    seg = sam_stage(sam_dir, batch_size=AUTO_BATCH)
    seg(_items(1))
    assert seg.batch_size == CPU_AUTO_BATCH


def _encoder_outputs(sam_dir, **options):
    seg = sam_stage(sam_dir, **options)
    seg.setup()
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(2)]
    return seg, seg.encode(images)


def test_channels_last_and_compile_options_keep_the_output(sam_dir):
    """Tested options of issue 10: NHWC convolutions and torch.compile (graph capture through the SDPA forward)."""
    _, plain = _encoder_outputs(sam_dir)
    seg, nhwc = _encoder_outputs(sam_dir, channels_last=True)
    assert seg.predictor.model.image_encoder.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, plain, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    seg, compiled = _encoder_outputs(sam_dir, compile_mode="default", compile_backend="eager")
    assert isinstance(seg.predictor.model.image_encoder, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-5)
    assert len(seg(_items(2))[0].masks) == 2  # the whole stage runs with the compiled encoder


@pytest.mark.slow
def test_inductor_compile_matches(sam_dir):
    torch._dynamo.reset()
    _, plain = _encoder_outputs(sam_dir)
    _, compiled = _encoder_outputs(sam_dir, compile_mode="default")
    torch.testing.assert_close(compiled, plain, rtol=1e-3, atol=1e-4)


class LivePeak(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once over the ops run under it (CPU stand-in for CUDA's
    `max_memory_allocated`): each op's outputs are counted once per storage until their last tensor dies."""

    def __init__(self):
        super().__init__()
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                key = t.untyped_storage().data_ptr()
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


@pytest.mark.parametrize("window,img", [(7, 256), (14, 512)])
def test_activation_formula_matches_measured_peak(window, img):
    """`activation_bytes` predicts the live-activation peak of the SDPA encoder, measured op by op (5%)."""
    from pipelines.sam_efficient import activation_bytes, use_sdpa
    from pipelines.segment import build_sam_model

    g = SamGeometry(img_size=img, patch_size=16, encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4,
                    encoder_global_attn_indexes=(1, 3), window_size=window, prompt_embed_dim=32)
    sam = build_sam_model(g)
    use_sdpa(sam)
    x = torch.randn(2, 3, img, img)
    with torch.inference_mode():
        meter = LivePeak()
        with meter:
            sam.image_encoder(x)
    per_image = meter.peak / 2
    assert 0.95 < per_image / activation_bytes(g, 4) < 1.05
