"""The runner's stage flow: caption after the mask rules, batches bucketed across chunks, CPU-only stages on their
own thread, same samples out."""

from __future__ import annotations

import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

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


class Gate(Recording):
    """A model-like stage (no `cpu_only`): opens `gate` once it has seen `opens_at` batches."""

    def __init__(self, batch_size, gate, opens_at, drop=()):
        super().__init__(batch_size, drop)
        self.gate, self.opens_at = gate, opens_at

    def __call__(self, batch):
        super().__call__(batch)
        if len(self.calls) >= self.opens_at:
            self.gate.set()
        return batch


class CpuWaiting(Recording):
    """A CPU-only stage: records its thread, and on its first batch waits (up to 2 s) for `gate` to open."""

    cpu_only = True

    def __init__(self, batch_size, gate=None, drop=()):
        super().__init__(batch_size, drop)
        self.gate, self.threads, self.gate_was_open = gate, [], []

    def __call__(self, batch):
        self.threads.append(threading.current_thread().name)
        if self.gate is not None and len(self.calls) == 0:
            self.gate_was_open.append(self.gate.wait(timeout=2.0))
        return super().__call__(batch)


def run_flow(pool):
    """Five stages (GPU-like, CPU, bucketed GPU-like, CPU, CPU) over five chunks; → (out keys, calls, CPU stage)."""
    gate = threading.Event()
    a = Gate(2, gate, opens_at=2, drop=("k1",))
    b = CpuWaiting(2, gate, drop=("k4",))
    c, d, e = Recording(3, drop=("k7",)), CpuWaiting(3, drop=("k2",)), CpuWaiting(3)
    flow = StageFlow([("a", a), ("b", b), ("c", c), ("d", d), ("e", e)], lambda kind, stage, items: stage(items),
                     bucketed=("c",), cpu_pool=pool)
    out = []
    for k in range(0, 10, 2):  # five chunks of two, two sizes
        out += [it.key for it in flow.push([item(f"k{k}"), item(f"k{k + 1}", 8 if k < 6 else 16)])]
    out += [it.key for it in flow.drain()]
    return out, [s.calls for s in (a, b, c, d, e)], (b, d, e)


def test_cpu_stages_run_on_their_thread_while_the_next_chunk_runs_the_gpu_stages():
    seq_out, seq_calls, (b0, _, _) = run_flow(None)
    with ThreadPoolExecutor(1, thread_name_prefix="cpu-stage") as pool:
        out, calls, (b, d, e) = run_flow(pool)
    # The sequential flow: the first chunk's CPU stage ran before stage a saw chunk two (it waited in vain).
    assert b0.gate_was_open == [False] and set(b0.threads) == {threading.main_thread().name}
    # With the thread: stage a ran on chunk two while the CPU stage still held chunk one.
    assert b.gate_was_open == [True]
    assert all(t.startswith("cpu-stage") for s in (b, d, e) for t in s.threads) and d.threads and e.threads
    # The same stage calls in the same order, and the items leave in the same order.
    assert calls == seq_calls and out == seq_out
    assert sorted(out) == [f"k{i}" for i in range(10)]


def test_cpu_stage_errors_surface_on_the_flow_thread():
    class Broken(Recording):
        cpu_only = True

        def __call__(self, batch):
            raise RuntimeError("broken on the CPU thread")

    with ThreadPoolExecutor(1) as pool:
        flow = StageFlow([("a", Recording(2)), ("b", Broken(2))], lambda kind, stage, items: stage(items),
                         cpu_pool=pool)
        flow.push([item("x")])  # in flight: nothing comes back yet
        with pytest.raises(RuntimeError, match="broken on the CPU thread"):
            flow.push([item("y")])


# -- the runner on the tiny models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory, tiny_models):
    from mlcid.synthetic import SceneConfig, write_shard

    root = tmp_path_factory.mktemp("flow")
    write_shard(root / "raw", root / "gt", 0, range(10), seed=3, config=SceneConfig(size=128))
    return str(root / "raw" / "00000.tar"), root


class ThreadNoted:
    """Wraps a real stage: records the thread each call ran on."""

    def __init__(self, stage) -> None:
        self.stage, self.kind, self.threads = stage, stage.kind, []

    def __getattr__(self, name):
        if name == "stage":
            raise AttributeError(name)
        return getattr(self.stage, name)

    def __call__(self, batch):
        self.threads.append(threading.current_thread().name)
        return self.stage(batch)


def build(url: str, out, threads: dict | None = None, **overrides):
    """Run the tiny preset with SD inpainting (1 step); returns (stats, samples by key, SD batch sizes, caption
    batch sizes). `threads` receives, per stage kind, the threads its calls ran on."""
    config = PipelineConfig.from_preset(
        "tiny", chunk_size=2, backends={"inpaint": "sd"},
        stage_options={"inpaint": {"num_inference_steps": 1, "resolution": 64}}, **overrides)
    proc = ShardProcessor(config).setup()
    proc.stages = [(k, ThreadNoted(s)) for k, s in proc.stages]
    if threads is not None:
        threads.update({k: s.threads for k, s in proc.stages})
    stages = {k: s.stage for k, s in proc.stages}
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


def shard_members(out) -> list[tuple[str, bytes]]:
    with tarfile.open(out / shard_name(0)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def outcome_records(out) -> list[dict]:
    rows = pq.read_table(out / outcomes_name(0, "mlcid")).to_pylist()
    return [{k: v for k, v in r.items() if not k.startswith("seconds_")} for r in rows]


def test_cpu_stage_thread_gives_the_same_shard_and_outcomes(scenes, one_thread):
    url, root = scenes
    threads_on, threads_off = {}, {}
    on = build(url, root / "thread-on", threads_on)
    off = build(url, root / "thread-off", threads_off, cpu_stage_thread=False)
    main = threading.main_thread().name
    # CPU-only kinds of the tiny preset (no model) ran on the cpu-stage thread; model stages stayed on this one.
    cpu_kinds = {"saliency", "mask_rules", "cutout"}
    assert all(threads_on[k] and all(t.startswith("cpu-stage") for t in threads_on[k]) for k in cpu_kinds)
    assert all(set(t) == {main} for k, t in threads_on.items() if k not in cpu_kinds)
    assert all(set(t) == {main} for t in threads_off.values())
    # Byte-identical samples in the same order, the same outcome records, the same SD and caption batches.
    assert on[0]["written"] == off[0]["written"] >= 2 and on[0]["dropped"] == off[0]["dropped"]
    assert shard_members(root / "thread-on") == shard_members(root / "thread-off")
    assert outcome_records(root / "thread-on") == outcome_records(root / "thread-off")
    assert on[2:] == off[2:]
    assert "cpu_stage_wait" in on[0]["timings"] and "cpu_stage_wait" not in off[0]["timings"]


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
