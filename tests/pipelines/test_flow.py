"""The runner's stage flow: caption after the mask rules, batches bucketed across chunks, same samples out."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlcid.reader import iter_shard_samples
from mlcid.schema import MLCIDSample
from mlcid.writer import shard_name
from pipelines.base import Item, ObjectLayer
from pipelines.config import STAGE_ORDER, PipelineConfig
from pipelines.flow import BucketQueue, StageFlow
from pipelines.runner import ShardProcessor, outcomes_name


def item(key: str, h: int = 8, w: int = 8, objects: int = 0) -> Item:
    it = Item(key, np.zeros((h, w, 3), np.uint8))
    it.objects = [ObjectLayer(np.zeros((h, w), bool), (0, 0, 1, 1), 1.0, "x") for _ in range(objects)]
    return it


# -- BucketQueue / StageFlow on plain items ---------------------------------------------------------------------
def test_queue_forms_full_batches_per_key_across_adds():
    q = BucketQueue(3, key=lambda it: it.image.shape[:2], load=lambda it: 1, max_pending=100)
    assert q.add([item("a"), item("b", 16)]) == []
    ready = q.add([item("c"), item("d", 16), item("e")])  # the third 8×8 arrives in the second chunk
    assert [[it.key for it in b] for b in ready] == [["a", "c", "e"]]
    assert q.pending == 2
    assert [[it.key for it in b] for b in q.drain()] == [["b", "d"]] and q.pending == 0


def test_queue_counts_load_and_bounds_pending():
    q = BucketQueue(4, key=lambda it: None, load=lambda it: len(it.objects), max_pending=100)
    ready = q.add([item("a", objects=3), item("b", objects=2), item("c", objects=1)])
    assert [[it.key for it in b] for b in ready] == [["a"]]  # a + b would be 5 objects > 4
    assert [[it.key for it in b] for b in q.drain()] == [["b", "c"]]
    small = BucketQueue(8, key=lambda it: it.key, load=lambda it: 1, max_pending=2)
    ready = small.add([item("x"), item("y"), item("z")])  # three buckets of one: over the bound, one runs early
    assert len(ready) == 1 and small.pending == 2


class Recording:
    """A real-enough stage for flow tests: records batch keys, drops keys listed in `drop`."""

    def __init__(self, batch_size: int, drop: tuple[str, ...] = ()) -> None:
        self.batch_size, self.drop, self.calls = batch_size, drop, []

    def __call__(self, batch):
        self.calls.append([it.key for it in batch])
        for it in batch:
            if it.key in self.drop:
                it.drop("test")
        return batch

    def bucket_key(self, it):
        return it.image.shape[:2]


def test_flow_accounts_every_item_once_and_buckets_only_configured_kinds():
    first, last = Recording(2, drop=("k1",)), Recording(3)
    flow = StageFlow([("a", first), ("b", last)], lambda kind, stage, items: stage(items), bucketed=("b",))
    out = []
    for c in range(0, 8, 2):  # four chunks of two
        out += flow.push([item(f"k{c}"), item(f"k{c + 1}", 8 if c < 4 else 16)])
    out += flow.drain()
    assert sorted(it.key for it in out) == [f"k{i}" for i in range(8)]  # each once: written or dropped
    assert [len(c) for c in first.calls] == [2, 2, 2, 2]  # not bucketed: per chunk
    assert last.calls[0] == ["k0", "k2", "k3"]  # 8×8 items from two chunks in one batch; k1 was dropped
    assert all(len(set(it.image.shape for it in out if it.key in c)) == 1 for c in last.calls)  # one size each
    assert sum(len(c) for c in last.calls) == 7


# -- the runner on the tiny models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory, tiny_models):
    from mlcid.synthetic import SceneConfig, write_shard

    root = tmp_path_factory.mktemp("flow")
    write_shard(root / "raw", root / "gt", 0, range(10), seed=3, config=SceneConfig(size=128))
    return str(root / "raw" / "00000.tar"), root


def build(url: str, out, **overrides):
    """Run the tiny preset with SD inpainting (1 step); returns (stats, samples by key, SD batch sizes)."""
    config = PipelineConfig.from_preset(
        "tiny", chunk_size=2, backends={"inpaint": "sd"},
        stage_options={"inpaint": {"num_inference_steps": 1, "resolution": 64}}, **overrides)
    proc = ShardProcessor(config).setup()
    stages = dict(proc.stages)
    sd_batches, captioned = [], []
    pipe, generate = stages["inpaint"].pipe, stages["caption"].captioner.generate

    def counted_pipe(**kwargs):
        sd_batches.append(len(kwargs["prompt"]))
        return pipe(**kwargs)

    def counted_generate(images, instruction):
        captioned.append(len(images))
        return generate(images, instruction)

    stages["inpaint"].pipe, stages["caption"].captioner.generate = counted_pipe, counted_generate
    stats = proc.process(url, str(out))
    samples = {s.key: s for s in iter_shard_samples(str(out / shard_name(0))) if isinstance(s, MLCIDSample)}
    rows = pq.read_table(out / outcomes_name(0, config.prefix)).to_pylist()
    assert len(rows) == stats["read"] == stats["written"] + sum(stats["dropped"].values())
    assert sorted(r["key"] for r in rows) == sorted(set(r["key"] for r in rows))  # every key once
    return stats, samples, sd_batches, captioned


@pytest.fixture(scope="module")
def before_and_now(scenes, one_thread):
    url, root = scenes
    before = build(url, root / "before", caption_order="first", bucketed_stages=())
    now = build(url, root / "now")
    return before, now


def test_default_order_captions_after_the_rules():
    assert PipelineConfig.from_preset("tiny").stage_order() == (
        "detect", "segment", "saliency", "mask_rules", "caption", "object_caption", "cutout", "inpaint")
    assert PipelineConfig.from_preset("tiny", caption_order="first").stage_order() == STAGE_ORDER
    narrowed = PipelineConfig.from_preset("tiny", stage_options={"detect": {"narrow_by_caption": True}})
    assert narrowed.stage_order()[0] == "caption"  # "auto": the detector needs the caption first
    with pytest.raises(ValueError, match="narrow_by_caption"):
        PipelineConfig.from_preset("tiny", caption_order="after_rules",
                                   stage_options={"detect": {"narrow_by_caption": True}})
    with pytest.raises(ValueError, match="caption_order"):
        PipelineConfig.from_preset("tiny", caption_order="last")
    with pytest.raises(ValueError, match="bucketed_stages"):
        PipelineConfig.from_preset("tiny", bucketed_stages=("painting",))


def test_same_samples_fewer_captions_fuller_batches(before_and_now):
    (s0, before, sd0, cap0), (s1, now, sd1, cap1) = before_and_now
    assert s0["read"] == s1["read"] == 10 and s0["dropped"] == s1["dropped"]
    assert sorted(before) == sorted(now) and len(now) >= 2, s1["dropped"]
    for key, a in before.items():
        b = now[key]
        assert a.global_prompt == b.global_prompt and a.layers == b.layers
        # Batched SD with per-item seeds: the same pixels up to float rounding in batched convolutions (±1).
        diff = np.abs(a.background.astype(int) - b.background.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (key, diff.max(), (diff > 0).mean())
        for fa, fb in zip(a.foregrounds, b.foregrounds):
            np.testing.assert_array_equal(fa, fb)
    # The caption runs only on images that survive the mask rules.
    assert sum(cap0) == s0["read"] and sum(cap1) == len(now) < sum(cap0)
    # SD batches: per chunk of 2 they hold ≤ 2; bucketed across chunks they are full (batch 4) but for the rest.
    assert sum(sd0) == sum(sd1) == len(now)
    assert max(sd0) <= 2 and sd1[:-1] == [4] * (len(sd1) - 1) and len(sd1) < len(sd0)


# -- CPU preprocessing on the decode threads --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["detect", "segment"])
def test_prepared_inputs_give_the_same_results(kind, tiny_models, one_thread):
    from mlcid.synthetic import SceneConfig, make_scene
    from pipelines.config import make_stage
    from pipelines.runner import import_backends

    import_backends()
    config = PipelineConfig.from_preset("tiny")
    stage = make_stage(kind, config)
    stage.setup()
    image = make_scene(SceneConfig(size=96, min_foregrounds=2), 0, 0).composite
    a, b = Item("a", image.copy()), Item("b", image.copy())
    for it in (a, b):
        it.detections = make_stage("detect", config)(  # boxes for SAM; OWLv2 overwrites its own
            [Item("d", image.copy())])[0].detections if kind == "segment" else []
    stage.prepare(a)
    assert kind in a.prepared and not b.prepared
    stage([a])
    stage([b])
    assert not a.prepared  # used and released
    if kind == "detect":
        assert [(d.box, d.score, d.label) for d in a.detections] == [(d.box, d.score, d.label) for d in b.detections]
    else:
        assert len(a.masks) == len(b.masks) > 0 and all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


class Preparing:
    """Wraps a real stage: records on which thread `prepare` ran and whether items arrive prepared."""

    def __init__(self, stage) -> None:
        self.stage, self.kind, self.threads, self.arrived = stage, stage.kind, [], []

    def __getattr__(self, name):
        if name == "stage":
            raise AttributeError(name)
        return getattr(self.stage, name)

    def prepare(self, item):
        import threading

        self.threads.append(threading.current_thread().name)
        self.stage.prepare(item)

    def __call__(self, batch):
        self.arrived += [self.kind in it.prepared for it in batch]
        return self.stage(batch)


def test_runner_prepares_on_the_decode_threads(scenes, tmp_path, one_thread):
    url, _ = scenes
    proc = ShardProcessor(PipelineConfig.from_preset("tiny", chunk_size=4)).setup()
    i = next(i for i, (k, _) in enumerate(proc.stages) if k == "detect")
    probe = Preparing(proc.stages[i][1])
    proc.stages[i] = ("detect", probe)
    stats = proc.process(url, str(tmp_path / "out"))
    assert len(probe.threads) == stats["read"] and all(t.startswith("decode") for t in probe.threads)
    assert probe.arrived and all(probe.arrived)
