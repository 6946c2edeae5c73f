"""Appendix B mask rules on planted masks: each rule alone, their order, and the `mask_rules` stage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.base import Detection, Item, build_stage
from pipelines.filters import (
    AREA_OUT_OF_RANGE,
    NO_MASK,
    NO_SALIENT_MASK,
    MaskRulesOptions,
    apply_rules,
    containment,
    drop_contained,
    keep_area,
    keep_salient,
    mask_box,
    paint_order,
    resolve_overlaps,
    saliency_overlap,
    select_foregrounds,
)

H = W = 100  # 10,000 pixels: 1% = 100 px, 80% = 8,000 px


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_saliency_overlap_is_fraction_of_mask():
    m = rect(0, 0, 10, 10)  # 100 px
    s = rect(0, 0, 10, 3)  # 30 px of it salient
    assert saliency_overlap(m, s) == pytest.approx(0.30)
    assert saliency_overlap(np.zeros((H, W), bool), s) == 0.0
    # The measure is relative to the MASK, not the salient region: a huge salient map does not dilute it.
    assert saliency_overlap(m, np.ones((H, W), bool)) == 1.0


def test_saliency_rule_keeps_strictly_above_threshold():
    s = rect(0, 0, 100, 50)  # top half salient
    m_in = rect(10, 10, 30, 30)  # fully salient
    m_out = rect(10, 60, 30, 80)  # not salient
    m_edge = rect(0, 49, 100, 59)  # exactly 10% salient (1 row of 10) → not "exceeding"
    m_above = rect(0, 48, 100, 58)  # 20% salient
    assert saliency_overlap(m_edge, s) == pytest.approx(0.10)
    assert keep_salient([m_in, m_out, m_edge, m_above], s, 0.10) == [0, 3]


def test_area_rule_inclusive_range():
    tiny = rect(0, 0, 9, 10)  # 0.9%
    one = rect(0, 0, 10, 10)  # exactly 1%
    big = rect(0, 0, 100, 80)  # exactly 80%
    huge = rect(0, 0, 100, 81)  # 81%
    assert keep_area([tiny, one, big, huge], 0.01, 0.80) == [1, 2]


def test_containment_drops_smaller_inside_larger():
    large = rect(0, 0, 50, 50)
    inside = rect(10, 10, 20, 20)
    mostly = rect(45, 10, 55, 20)  # half inside
    nine_tenths = rect(41, 30, 51, 40)  # 9 of 10 columns inside → 0.9
    assert containment(inside, large) == 1.0
    assert containment(nine_tenths, large) == pytest.approx(0.9)
    kept = drop_contained([inside, large, mostly, nine_tenths], [0.9, 0.5, 0.5, 0.5], ratio=0.9)
    assert kept == [1, 2]  # `inside` and `nine_tenths` removed, the larger one and the half-overlapping kept


def test_containment_near_duplicates_keep_higher_score():
    a = rect(10, 10, 30, 30)
    b = rect(10, 10, 30, 30)
    assert drop_contained([a, b], [0.3, 0.8], ratio=0.9) == [1]


def test_paint_order_and_front_wins():
    big = rect(0, 0, 60, 60)
    small = rect(40, 40, 80, 80)
    order = paint_order([small, big])
    assert order == [1, 0]  # the larger one behind
    back, front = resolve_overlaps([big, small])
    assert front.sum() == small.sum()  # the front mask is untouched
    assert not (back & front).any()  # disjoint
    assert (back | front).sum() == (big | small).sum()  # nothing lost from the union


def test_selection_rechecks_area_after_resolving():
    # A mask that is in range alone but drops below 1% once a front object takes its pixels is not kept.
    ring = rect(20, 20, 31, 31)  # 121 px
    front = rect(21, 21, 31, 31)  # 100 px covering all but 21 px of `ring`; smaller → in front
    chosen = select_foregrounds([ring, front], [0.9, 0.8], 3, 0.01, 0.80)
    # `ring` (higher score) is taken first; adding `front` would leave it 21 px < 100 → `front` rejected.
    assert [i for i, _ in chosen] == [0]
    assert chosen[0][1].sum() == 121


def test_selection_caps_count_by_score():
    masks = [rect(10 * i, 0, 10 * i + 10, 20) for i in range(5)]
    scores = [0.1, 0.9, 0.5, 0.7, 0.2]
    chosen = select_foregrounds(masks, scores, 3, 0.01, 0.80)
    assert sorted(i for i, _ in chosen) == [1, 2, 3]


def test_apply_rules_reasons():
    s = rect(0, 0, 50, 50)
    assert apply_rules([], [], s).reason == NO_MASK
    assert apply_rules([rect(60, 60, 90, 90)], [0.9], s).reason == NO_SALIENT_MASK
    assert apply_rules([rect(0, 0, 5, 5)], [0.9], s).reason == AREA_OUT_OF_RANGE  # salient but 0.25%


def test_apply_rules_huge_mask_does_not_swallow_objects():
    # A > 80% mask ("room") containing the objects is removed by the area rule BEFORE containment runs.
    room = rect(0, 0, 100, 95)
    obj = rect(20, 20, 40, 40)
    res = apply_rules([room, obj], [0.9, 0.5], np.ones((H, W), bool))
    assert res.reason is None
    assert [i for i, _ in res.layers] == [1]


def test_apply_rules_full_chain_disjoint_back_to_front():
    s = rect(0, 0, 100, 60)
    masks = [
        rect(0, 0, 70, 50),  # 0: large, salient → back
        rect(50, 20, 80, 45),  # 1: overlaps 0, smaller → front of it
        rect(5, 5, 15, 15),  # 2: inside 0 → removed by containment
        rect(0, 70, 30, 100),  # 3: not salient
        rect(90, 0, 92, 2),  # 4: too small
        rect(80, 0, 100, 20),  # 5: salient, disjoint, lowest score → still within the cap of 3
    ]
    scores = [0.8, 0.7, 0.95, 0.9, 0.9, 0.2]
    res = apply_rules(masks, scores, s, max_foregrounds=3)
    idx = [i for i, _ in res.layers]
    assert set(idx) == {0, 1, 5}
    assert idx.index(0) < idx.index(1)  # larger behind
    layers = [m for _, m in res.layers]
    for a in range(len(layers)):
        for b in range(a + 1, len(layers)):
            assert not (layers[a] & layers[b]).any()
    assert all(0.01 <= m.mean() <= 0.8 for m in layers)


def test_apply_rules_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        apply_rules([rect(0, 0, 10, 10), np.zeros((5, 5), bool)], [1, 1], None, min_saliency_overlap=0)
    with pytest.raises(ValueError, match="saliency"):
        apply_rules([rect(0, 0, 10, 10)], [1.0], None)


def test_stage_fills_objects_in_paint_order_and_drops_with_reason():
    stage = build_stage("mask_rules", "appendix_b", MaskRulesOptions(max_foregrounds=2))
    stage.setup()
    img = np.zeros((H, W, 3), np.uint8)
    good = Item("a", img, saliency=rect(0, 0, 100, 100))
    good.detections = [Detection((0, 0, 60, 60), 0.5, "table"), Detection((40, 40, 80, 80), 0.9, "cup")]
    good.masks = [rect(0, 0, 60, 60), rect(40, 40, 80, 80)]
    bad = Item("b", img, saliency=rect(0, 0, 10, 10))
    bad.detections = [Detection((50, 50, 90, 90), 0.5, "dog")]
    bad.masks = [rect(50, 50, 90, 90)]
    stage([good, bad])
    assert bad.drop_reason == NO_SALIENT_MASK
    assert [o.label for o in good.objects] == ["table", "cup"]
    assert good.objects[1].box == (40, 40, 80, 80)
    assert good.objects[0].box == mask_box(good.objects[0].mask)
    assert not (good.objects[0].mask & good.objects[1].mask).any()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 90), st.integers(0, 90), st.integers(1, 60), st.integers(1, 60),
                          st.floats(0, 1)), min_size=1, max_size=8),
       st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(10, 100), st.integers(10, 100)))
def test_apply_rules_invariants(boxes, sal_box):
    masks = [rect(x, y, min(100, x + w), min(100, y + h)) for x, y, w, h, _ in boxes]
    scores = [s for *_, s in boxes]
    sx, sy, sw, sh = sal_box
    sal = rect(sx, sy, min(100, sx + sw), min(100, sy + sh))
    res = apply_rules(masks, scores, sal, max_foregrounds=3)
    if res.reason is not None:
        assert not res.layers
        return
    assert 1 <= len(res.layers) <= 3
    union = np.zeros((H, W), bool)
    for i, m in res.layers:
        assert not (union & m).any()  # disjoint
        union |= m
        assert 0.01 <= m.mean() <= 0.80  # area re-checked after resolving
        assert not (m & ~masks[i]).any()  # a layer only loses pixels
        assert saliency_overlap(masks[i], sal) > 0.10
    areas = [masks[i].sum() for i, _ in res.layers]
    assert areas == sorted(areas, reverse=True)  # larger behind
