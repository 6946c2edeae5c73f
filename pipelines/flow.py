"""`StageFlow`: items through the stages in order, bucketed stages forming full micro-batches across chunks.

A chunk of decoded items enters with `push(items)`; each stage runs on the alive items that reach it. A bucketed
stage (`PipelineConfig.bucketed_stages`) does not run on a chunk's few survivors: its items wait in a
`BucketQueue`, one bucket per `stage.bucket_key(item)` (the inpainter's or the depth model's working size; one
bucket when the stage has none), until a bucket holds a full batch (`stage.batch_size`, counted in
`stage.batch_load(item)`: objects for the object captioner). A queue over `max_pending` items runs its fullest bucket early (memory bound);
`drain()` runs what is left at the shard's end, stage by stage. Both return the items that left the flow:
dropped on the way or through every stage. A stage never sees which chunk an item came from, so a batched stage
that is deterministic per item gives each item the same result bucketed or not.

CPU-only stages (`pipelines.base.runs_on_cpu`: the mask rules, the cut-outs, classical backends) run on
`cpu_pool` when one is given (the runner's single `cpu-stage` thread), off the thread that drives the GPU: a
batch reaching one is submitted there, and what follows from it (the next stages, on the flow's thread) waits
until the next `push`, after that chunk's own first stages ran. So the mask rules of chunk k run while the GPU
runs detection, SAM and depth on chunk k+1. Consecutive unbucketed CPU-only stages run in one submission. Every
stage still sees its batches in the sequential order (CPU results are taken oldest first, and a stage after a
CPU stage receives items only from it) and the items leave in the sequential order (a batch in flight holds its
place in the output): the same stage calls, the same outcome order, one or two `push`es later.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from typing import Any

from pipelines.base import Item, Stage, runs_on_cpu


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


class _InFlight:
    """A batch submitted to the CPU thread; holds its place in the output. Once `resolved`, `entries` holds what
    left the flow from it (items, and further `_InFlight` places), in the sequential order."""

    __slots__ = ("future", "entries", "resolved")

    def __init__(self, future: Future) -> None:
        self.future, self.entries, self.resolved = future, deque(), False


def _take_ready(entries: deque, out: list[Item]) -> bool:
    """Move the items of `entries` to `out` up to the first unresolved place; True when `entries` emptied."""
    while entries:
        head = entries[0]
        if isinstance(head, _InFlight):
            if not head.resolved or not _take_ready(head.entries, out):
                return False
        else:
            out.append(head)
        entries.popleft()
    return True


class StageFlow:
    """Route items through `stages`; `run(kind, stage, items)` runs one stage on one batch (with fault handling).

    With `cpu_pool`, CPU-only stages run there (see the module docstring); without, everything runs in the caller.
    """

    def __init__(self, stages: list[tuple[str, Stage]], run: Callable[[str, Stage, list[Item]], Any],
                 bucketed: tuple[str, ...] = (), max_pending: int = 128,
                 batch_caps: dict[str, int] | None = None, cpu_pool: Executor | None = None) -> None:
        self.stages, self.run, self.batch_caps = stages, run, batch_caps if batch_caps is not None else {}
        self.queues: list[BucketQueue | None] = []
        for kind, stage in stages:
            if kind in bucketed and batch_size_of(stage) > 1:  # a batch of one is full as it comes
                self.queues.append(BucketQueue(batch_size_of(stage), getattr(stage, "bucket_key", _no_key),
                                               getattr(stage, "batch_load", _one), max_pending))
            else:
                self.queues.append(None)
        self.cpu_pool = cpu_pool
        self.on_cpu_thread = [cpu_pool is not None and runs_on_cpu(stage) for _, stage in stages]
        self.in_flight: deque[_InFlight] = deque()  # on the CPU thread, oldest first
        self.entries: deque = deque()  # what left the flow and is not returned yet; `_InFlight` = a place kept
        self.wait_s = 0.0  # seconds the flow's thread waited for the CPU thread

    @property
    def pending(self) -> int:
        return sum(q.pending for q in self.queues if q is not None)

    def push(self, items: list[Item]) -> list[Item]:
        """Feed one chunk's items; return those that left the flow (dropped, or through every stage).

        With a CPU thread: the chunk's stages up to its first CPU-only one run first, then what the CPU thread
        finished for earlier chunks continues; items still in flight there come out of a later call."""
        earlier = len(self.in_flight)
        self._advance(0, items, self.entries)
        self._resolve(earlier)
        return self._ready()

    def drain(self) -> list[Item]:
        """Run every waiting item through the rest of the stages (in stage order); return those that left."""
        self._resolve()
        for i, queue in enumerate(self.queues):
            if queue is not None:
                for batch in queue.drain():
                    self._run(i, batch, self.entries)
                self._resolve()  # what the CPU thread holds reaches the later queues before they drain
        out = self._ready()
        if self.pending or self.entries or self.in_flight:
            raise RuntimeError(f"bookkeeping bug: {self.pending} items still queued, {len(self.in_flight)} "
                               f"batches in flight after draining the flow")
        return out

    def _ready(self) -> list[Item]:
        out: list[Item] = []
        _take_ready(self.entries, out)
        return out

    def _resolve(self, count: int | None = None) -> None:
        """Continue the `count` oldest CPU-thread batches (all, until none is left, when None) on this thread."""
        done = 0
        while self.in_flight and (count is None or done < count):
            place = self.in_flight.popleft()
            t0 = time.perf_counter()
            nxt, left, live = place.future.result()  # a stage's shard fault raises here, as it would inline
            self.wait_s += time.perf_counter() - t0
            place.entries.extend(left)
            self._advance(nxt, live, place.entries)
            place.resolved = True
            done += 1

    def _advance(self, i: int, items: list[Item], out: deque) -> None:
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

    def _run(self, i: int, batch: list[Item], out: deque) -> None:
        if self.on_cpu_thread[i]:
            place = _InFlight(self.cpu_pool.submit(self._cpu_run, i, batch))
            out.append(place)
            self.in_flight.append(place)
            return
        kind, stage = self.stages[i]
        self.run(kind, stage, batch)
        self._advance(i + 1, batch, out)

    def _cpu_run(self, i: int, batch: list[Item]) -> tuple[int, list[Item], list[Item]]:
        """On the CPU thread: stage `i` and the unbucketed CPU-only stages right after it, as `_advance` would
        run them. → (the next stage's index, the items that left on the way in order, the items going on)."""
        left: list[Item] = []
        while True:
            kind, stage = self.stages[i]
            self.run(kind, stage, batch)
            i += 1
            for it in batch:
                if not it.alive:
                    it.prepared.clear()
                    left.append(it)
            batch = [it for it in batch if it.alive]
            if not (batch and i < len(self.stages) and self.on_cpu_thread[i] and self.queues[i] is None):
                return i, left, batch
