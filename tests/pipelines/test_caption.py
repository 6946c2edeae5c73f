"""Global and per-object captions with the tiny InstructBLIP preset: batching, empty output, crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.base import Item, ObjectLayer
from pipelines.caption import (
    GLOBAL_INSTRUCTION,
    OBJECT_INSTRUCTION,
    CaptionOptions,
    GlobalCaption,
    ObjectCaption,
    ObjectCaptionOptions,
    clean_caption,
    crop_object,
)
from pipelines.devices import ModelStageConfig


def cpu(model, batch_size=16, **kw):
    return ModelStageConfig(model=model, device="cpu", batch_size=batch_size, **kw)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from pipelines.tiny import build_tiny_models

    return str(build_tiny_models(tmp_path_factory.mktemp("tiny"), only=["instructblip"])["instructblip"])


@pytest.fixture(scope="module")
def caption_stage(blip_dir):
    stage = GlobalCaption(cpu(blip_dir, 3), CaptionOptions(max_new_tokens=6))
    stage.setup()
    return stage


def _items(n=3, source=None):
    rng = np.random.default_rng(2)
    return [Item(key=f"k{i}", image=rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8),
                 source={"caption": source}) for i in range(n)]


def test_paper_instructions():
    assert GLOBAL_INSTRUCTION == ("Please provide a comprehensive description of the image, including the color, "
                                  "shapes, and any actions taking place.")
    assert OBJECT_INSTRUCTION == "Briefly describe the main subject of the image."


def test_global_caption_batched_equals_one_by_one(caption_stage):
    items = caption_stage(_items())
    assert all(it.alive and isinstance(it.global_prompt, str) and it.global_prompt for it in items)
    assert all(it.global_prompt == clean_caption(it.global_prompt) for it in items)
    tokens = caption_stage.captioner.processor.tokenizer(items[0].global_prompt, add_special_tokens=False)
    assert len(tokens["input_ids"]) <= 6 + 2  # capped by max_new_tokens (decode may split pieces slightly)
    caption_stage.batch_size = 1
    try:
        single = caption_stage(_items())
    finally:
        caption_stage.batch_size = 3
    assert [it.global_prompt for it in single] == [it.global_prompt for it in items]


def test_empty_caption_keeps_source_or_drops(blip_dir):
    stage = GlobalCaption(cpu(blip_dir), CaptionOptions(max_new_tokens=4, share_model=False))  # weights edited
    stage.setup()
    stage.captioner.model.language_model.lm_head.weight.data.zero_()  # every step: argmax = <pad> → ""
    with_source = stage(_items(2, source="  a red   square on grass "))
    assert [it.global_prompt for it in with_source] == ["a red square on grass"] * 2
    assert all(it.alive for it in with_source)
    without = stage(_items(2, source=None))
    assert [it.drop_reason for it in without] == ["empty_caption", "empty_caption"]
    assert all(it.global_prompt is None for it in without)


def test_object_captions_batched_across_items(blip_dir):
    stage = ObjectCaption(cpu(blip_dir, 4), ObjectCaptionOptions(max_new_tokens=4, share_model=False))
    items = _items(3)
    for it in items:
        h, w = it.image.shape[:2]
        a = np.zeros((h, w), bool)
        a[5:20, 5:25] = True
        it.objects = [ObjectLayer(a, (5, 5, 25, 20), 0.9, "Cat"), ObjectLayer(~a, (0, 0, w, h), 0.4, "Dog")]
    items[1].drop("no_mask")
    stage(items)
    assert all(isinstance(o.prompt, str) and o.prompt for i in (0, 2) for o in items[i].objects)
    assert all(o.prompt is None for o in items[1].objects)
    # one object at a time gives the same prompts
    stage.batch_size = 1
    again = [ObjectLayer(o.mask, o.box, o.score, o.label) for o in items[2].objects]
    solo = Item(key="solo", image=items[2].image, objects=again)
    stage([solo])
    assert [o.prompt for o in solo.objects] == [o.prompt for o in items[2].objects]
    # an empty generated caption falls back to the label
    stage.captioner.model.language_model.lm_head.weight.data.zero_()
    stage([solo])
    assert [o.prompt for o in solo.objects] == ["cat", "dog"]


def test_caption_and_object_caption_share_one_model(caption_stage, blip_dir):
    other = ObjectCaption(cpu(blip_dir))
    other.setup()
    assert other.captioner.model is caption_stage.captioner.model
    alone = ObjectCaption(cpu(blip_dir), ObjectCaptionOptions(share_model=False))
    alone.setup()
    assert alone.captioner.model is not caption_stage.captioner.model


def test_decoder_only_language_model_returns_only_new_tokens():
    """InstructBLIP-Vicuna style: the prompt is padded on the left and cut off the generated ids."""
    from pipelines.tiny import make_instructblip

    model, processor = make_instructblip(language_model="llama")
    stage = GlobalCaption(cpu("<in memory>"), CaptionOptions(max_new_tokens=3, share_model=False))
    stage.captioner.use(model, processor)
    model.generation_config.min_new_tokens = 3
    assert processor.tokenizer.padding_side == "left" and not stage.captioner.encoder_decoder
    items = stage(_items(2))
    for it in items:
        ids = processor.tokenizer(it.global_prompt, add_special_tokens=False)["input_ids"]
        assert 1 <= len(ids) <= 3 + 2  # three new tokens (decoded pieces may re-split), no prompt echo
        assert "comprehensive" not in it.global_prompt


def test_crop_object_box_and_fill():
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True
    mask[2, 3] = False
    crop = crop_object(image, mask, fill=(1, 2, 3))
    assert crop.shape == (4, 6, 3)
    assert (crop[0, 0] == (1, 2, 3)).all()
    np.testing.assert_array_equal(crop[1:, 1:], image[3:6, 4:9])
    with pytest.raises(ValueError, match="empty mask"):
        crop_object(image, np.zeros((10, 12), bool))
    with pytest.raises(ValueError, match="does not match"):
        crop_object(image, np.ones((5, 5), bool))


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GlobalCaption(cpu(str(tmp_path / "missing"))).setup()
    with pytest.raises(ValueError, match="max_new_tokens"):
        CaptionOptions(max_new_tokens=0)


def test_fp16_keeps_transformers_fp32_modules(blip_dir):
    """`from_pretrained(dtype=fp16)` keeps T5's `wo` and `query_tokens` in fp32; the stage must not undo it."""
    from transformers import InstructBlipForConditionalGeneration

    from pipelines.caption import keep_in_fp32_names

    stage = GlobalCaption(cpu(blip_dir, dtype="float16"), CaptionOptions(max_new_tokens=2, share_model=False))
    stage.setup()
    model = stage.captioner.model
    keep = keep_in_fp32_names(model)
    assert {"wo", "query_tokens"} <= keep  # T5's and InstructBLIP's own lists: the test is about real modules
    assert "query_tokens" in InstructBlipForConditionalGeneration._keep_in_fp32_modules
    wo = [p for n, p in model.named_parameters() if n.endswith(".wo.weight")]
    assert len(wo) == 4 and all(p.dtype == torch.float32 for p in wo)
    assert model.query_tokens.dtype == torch.float32
    assert model.language_model.lm_head.weight.dtype == torch.float16  # the rest is half
    # An in-memory fp32 model handed to `use` ends up the same way.
    from pipelines.tiny import make_instructblip

    other = GlobalCaption(cpu("<in memory>", dtype="float16"), CaptionOptions(share_model=False))
    other.captioner.use(*make_instructblip())
    dtypes = {n: p.dtype for n, p in other.captioner.model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if n.endswith(".wo.weight") or n == "query_tokens")
    assert other.captioner.model.language_model.lm_head.weight.dtype == torch.float16


def test_non_finite_caption_is_a_counted_fallback(blip_dir):
    """NaN logits make greedy decoding pick the NaN token: a non-empty garbage caption unless it is flagged."""
    stage = GlobalCaption(cpu(blip_dir), CaptionOptions(max_new_tokens=3, share_model=False))
    stage.setup()
    tokenizer = stage.captioner.processor.tokenizer
    word = tokenizer.convert_tokens_to_ids("▁red")
    stage.captioner.model.language_model.lm_head.weight.data[word] = float("nan")  # logit of "red" is NaN
    items = stage(_items(2, source="a square on grass"))
    assert [it.global_prompt for it in items] == ["a square on grass"] * 2
    assert [it.prompt_source for it in items] == ["alt_text", "alt_text"]
    dropped = stage(_items(1, source=None))[0]
    assert dropped.drop_reason == "empty_caption"
    # a healthy caption is recorded as such
    fine = GlobalCaption(cpu(blip_dir), CaptionOptions(max_new_tokens=3, share_model=False))(_items(1))[0]
    assert fine.prompt_source == "caption" and fine.global_prompt
    # object captions fall back to the label, recorded as "label"
    objects = ObjectCaption(cpu(blip_dir), ObjectCaptionOptions(max_new_tokens=3, share_model=False))
    objects.setup()
    objects.captioner.model.language_model.lm_head.weight.data[word] = float("nan")
    it = _items(1)[0]
    mask = np.zeros(it.image.shape[:2], bool)
    mask[5:20, 5:25] = True
    it.objects = [ObjectLayer(mask, (5, 5, 25, 20), 0.9, "Cat")]
    objects([it])
    assert (it.objects[0].prompt, it.objects[0].prompt_source) == ("cat", "label")
