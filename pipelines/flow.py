"""`StageFlow`: items through the stages in order, bucketed stages forming full micro-batches across chunks.

A chunk of decoded items enters with `push(items)`; each stage runs on the alive items that reach it. A bucketed
stage (`PipelineConfig.bucketed_stages`) does not run on a chunk's few survivors: its items wait in a
`BucketQueue`, one bucket per `stage.bucket_key(item)` (the inpainter's working size; one bucket when the stage
has none), until a bucket holds a full batch (`stage.batch_size`, counted in `stage.batch_load(item)`: objects
for the object captioner). A queue over `max_pending` items runs its fullest bucket early (memory bound);
`drain()` runs what is left at the shard's end, stage by stage. Both return the items that left the flow:
dropped on the way or through every stage. A stage never sees which chunk an item came from, so a batched stage
that is deterministic per item gives each item the same result bucketed or not.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from pipelines.base import Item, Stage


def batch_size_of(stage: Stage) -> int:
    """The stage's micro-batch (its `batch_size`; 1 for a stage without one)."""
    return max(1, int(getattr(stage, "batch_size", 1) or 1))


class BucketQueue:
    """Items of one stage waiting for a full batch, bucketed by `key(item)`, each weighing `load(item)`."""

    def __init__(self, batch_size: int, key: Callable[[Item], Hashable], load: Callable[[Item], int],
                 max_pending: int) -> None:
        self.batch_size, self.key, self.load, self.max_pending = max(1, batch_size), key, load, max(1, max_pending)
        self.buckets: dict[Hashable, list[Item]] = {}  # insertion order: the oldest bucket first

    @property
    def pending(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    def _weight(self, items: list[Item]) -> int:
        return sum(max(1, self.load(it)) for it in items)

    def _take(self, key: Hashable) -> list[Item]:
        """Pop the longest prefix of a bucket that fits one batch (at least one item)."""
        bucket, taken, weight = self.buckets[key], [], 0
        while bucket and (not taken or weight + max(1, self.load(bucket[0])) <= self.batch_size):
            weight += max(1, self.load(bucket[0]))
            taken.append(bucket.pop(0))
        if not bucket:
            del self.buckets[key]
        return taken

    def add(self, items: list[Item]) -> list[list[Item]]:
        """Queue `items`; return the batches now ready: every full one, then the fullest while over `max_pending`."""
        ready = []
        for it in items:
            key = self.key(it)
            self.buckets.setdefault(key, []).append(it)
            if self._weight(self.buckets[key]) >= self.batch_size:
                ready.append(self._take(key))
        while self.pending > self.max_pending:
            ready.append(self._take(max(self.buckets, key=lambda k: self._weight(self.buckets[k]))))
        return ready

    def drain(self) -> list[list[Item]]:
        """Every waiting item as batches (fullest bucket first)."""
        ready = []
        while self.buckets:
            ready.append(self._take(max(self.buckets, key=lambda k: self._weight(self.buckets[k]))))
        return ready


def _no_key(_item: Item) -> None:
    return None


def _one(_item: Item) -> int:
    return 1


class StageFlow:
    """Route items through `stages`; `run(kind, stage, items)` runs one stage on one batch (with fault handling)."""

    def __init__(self, stages: list[tuple[str, Stage]], run: Callable[[str, Stage, list[Item]], Any],
                 bucketed: tuple[str, ...] = (), max_pending: int = 128,
                 batch_caps: dict[str, int] | None = None) -> None:
        self.stages, self.run, self.batch_caps = stages, run, batch_caps if batch_caps is not None else {}
        self.queues: list[BucketQueue | None] = []
        for kind, stage in stages:
            if kind in bucketed:
                self.queues.append(BucketQueue(batch_size_of(stage), getattr(stage, "bucket_key", _no_key),
                                               getattr(stage, "batch_load", _one), max_pending))
            else:
                self.queues.append(None)

    @property
    def pending(self) -> int:
        return sum(q.pending for q in self.queues if q is not None)

    def push(self, items: list[Item]) -> list[Item]:
        """Feed one chunk's items; return those that left the flow (dropped, or through every stage)."""
        out: list[Item] = []
        self._advance(0, items, out)
        return out

    def drain(self) -> list[Item]:
        """Run every waiting item through the rest of the stages (in stage order); return those that left."""
        out: list[Item] = []
        for i, queue in enumerate(self.queues):
            if queue is not None:
                for batch in queue.drain():
                    self._run(i, batch, out)
        if self.pending:
            raise RuntimeError(f"bookkeeping bug: {self.pending} items still queued after draining the flow")
        return out

    def _advance(self, i: int, items: list[Item], out: list[Item]) -> None:
        """Items that reached stage `i`: the dropped ones leave, the alive ones run (or wait in its queue)."""
        for it in items:
            if not it.alive:
                it.prepared.clear()  # preprocessing for stages it will never reach
                out.append(it)
        live = [it for it in items if it.alive]
        if i == len(self.stages):
            out.extend(live)
            return
        queue = self.queues[i]
        if queue is None:
            batches = [live] if live else []
        else:
            cap = self.batch_caps.get(self.stages[i][0])  # an out-of-memory halved this kind's batch
            if cap:
                queue.batch_size = min(queue.batch_size, cap)
            batches = queue.add(live)
        for batch in batches:
            self._run(i, batch, out)

    def _run(self, i: int, batch: list[Item], out: list[Item]) -> None:
        kind, stage = self.stages[i]
        self.run(kind, stage, batch)
        self._advance(i + 1, batch, out)
