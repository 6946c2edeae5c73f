"""Open-vocabulary detection with the tiny OWLv2 and Grounding DINO presets; the Objects365 vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.base import Item
from pipelines.devices import ModelStageConfig
from pipelines.detect import (
    DetectOptions,
    GroundingDinoDetector,
    Owlv2Detector,
    in_caption,
    load_objects365,
    query_text,
    select,
)

def cpu(model, batch_size=16):
    return ModelStageConfig(model=str(model), device="cpu", batch_size=batch_size)


SMALL_VOCAB = ["Person", "Cat", "Dog", "Chair", "Cabinet/shelf", "Wine Glass", "Car", "Potted Plant"]


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    from pipelines.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"), only=["owlv2", "grounding-dino"])


def _items(n=3, caption="a cat sitting on a chair"):
    rng = np.random.default_rng(1)
    return [Item(key=f"k{i}", image=rng.integers(0, 255, (40 + 8 * i, 64, 3), dtype=np.uint8),
                 global_prompt=caption) for i in range(n)]


def test_objects365_vocabulary():
    names = load_objects365()
    assert len(names) == len(set(names)) == 365
    assert names[:4] == ["Person", "Sneakers", "Chair", "Other Shoes"] and names[-1] == "Table Tennis"
    assert all(n == n.strip() for n in names)
    assert query_text("Cabinet/shelf") == "cabinet or shelf"


def test_in_caption_matches_whole_words_and_plurals():
    hits = in_caption(SMALL_VOCAB, "Two cats and a wine glass near the shelf; cartoon.")
    assert dict(zip(SMALL_VOCAB, hits.tolist())) == {
        "Person": False, "Cat": True, "Dog": False, "Chair": False, "Cabinet/shelf": True,
        "Wine Glass": True, "Car": False, "Potted Plant": False,
    }


def test_select_threshold_nms_topk_sorted():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [5, 5, 5.5, 30], [40, 40, 90, 90]],
                         dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.3, 0.95, 0.05])
    labels = torch.tensor([0, 1, 2, 3, 4])
    dets = select(boxes, scores, labels, SMALL_VOCAB[:5], (50, 50), 0.1, 0.5, 10)
    # box 0 suppressed by box 1 (IoU > 0.5), box 3 thinner than 1 px, box 4 under the threshold
    assert [d.label for d in dets] == ["Cat", "Dog"]
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    top2 = select(boxes, scores, labels, SMALL_VOCAB[:5], (50, 50), 0.0, 1.0, 2)
    assert [d.label for d in top2] == ["Cat", "Person"]  # no NMS, thin box still dropped, top 2


@pytest.mark.parametrize("cls,name", [(Owlv2Detector, "owlv2"), (GroundingDinoDetector, "grounding-dino")])
def test_detector_top_k_sorted_and_batching(presets, cls, name):
    vocab = None if cls is Owlv2Detector else SMALL_VOCAB  # OWLv2 takes all 365 queries at once
    det = cls(cpu(presets[name], 3), DetectOptions(score_threshold=0.0, max_detections=4, vocabulary=vocab))
    items = det(_items())
    for it in items:
        assert it.alive and 1 <= len(it.detections) <= 4
        scores = [d.score for d in it.detections]
        assert scores == sorted(scores, reverse=True)
        h, w = it.image.shape[:2]
        for d in it.detections:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert d.label in det.names
    det.batch_size = 1
    single = det(_items())
    for a, b in zip(items, single):
        assert [d.label for d in a.detections] == [d.label for d in b.detections]
        np.testing.assert_allclose([d.box for d in a.detections], [d.box for d in b.detections], atol=1e-3)


def test_owlv2_caches_text_embeddings_and_narrows(presets):
    det = Owlv2Detector(cpu(presets["owlv2"]), DetectOptions(score_threshold=0.0, max_detections=50,
                                                               narrow_by_caption=True))
    det.setup()
    assert det.query_embeds.shape[0] == 365
    cached = det.query_embeds
    items = det(_items(2, caption="a cat sitting on a chair"))
    assert det.query_embeds is cached
    for it in items:
        assert {d.label for d in it.detections} <= {"Cat", "Chair"}
    # no vocabulary word in the caption: all names stay allowed
    assert det.allowed(_items(1, caption="zzz qqq")[0]).all()


def test_no_detection_drops(presets):
    det = Owlv2Detector(cpu(presets["owlv2"]), DetectOptions(score_threshold=1.01))
    items = det(_items(2))
    assert [it.drop_reason for it in items] == ["no_detection", "no_detection"]
    assert all(it.detections == [] for it in items)


def test_grounding_dino_chunks_fit_token_limit(presets):
    det = GroundingDinoDetector(cpu(presets["grounding-dino"]))
    det.setup()
    chunks = det.make_chunks(64)
    assert [i for c in chunks for i in c["ids"]] == list(range(365))
    for c in chunks:
        n_tokens = len(det.processor.tokenizer(c["text"])["input_ids"])
        assert n_tokens <= 64
        assert c["positive"].shape == (len(c["ids"]), n_tokens)
        np.testing.assert_allclose(c["positive"].sum(dim=1).numpy(), 1.0, rtol=1e-6)  # every name has tokens


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Owlv2Detector(cpu(tmp_path / "nope")).setup()
