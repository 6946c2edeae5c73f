"""`ShardProcessor`: one img2dataset shard in → one MLCID shard + per-sample outcomes out (plain Python, no Ray).

`setup()` builds and sets up every configured stage once; `process(input_url, out)` then:
  1. skips the shard if its stats file exists (resume) — returns the stored stats with `skipped: True`;
  2. streams the input tar, decoding chunks of `chunk_size` on a thread pool (the next chunk decodes while
     the stages run on the current one);
  3. pushes each chunk through the stages in `PipelineConfig.stage_order()` (`pipelines.flow.StageFlow`: bucketed
     stages form full micro-batches across chunks; what waits is drained at the shard's end; CPU-only stages run
     on a `cpu-stage` thread of their own when `cpu_stage_thread` is set), classifying failures
     (`pipelines.faults`): a device fault, an out-of-memory on a single item, a stage failing every item of a
     batch, or a stage-error share over the `FaultPolicy` budget FAILS the shard (it raises; nothing is
     published); an out-of-memory halves the batch and retries; other errors are retried item by item and those items dropped as `stage_error:<kind>`;
  4. hands the items that left the flow to a single writer thread (`ShardWriter`: validation, PNG/JPEG encoding, `.tmp`);
  5. closes the shard: tar and `{prefix}-{id:06d}.parquet` (per-sample outcomes and provenance) renamed into
     place, stats file LAST; for an fsspec `out` (s3://…) this happens in a local staging folder and the three
     files are then uploaded in that order. Any exception leaves no visible shard and no stats.
Every input key is counted exactly once (written or dropped with its reason): `read == written + sum(dropped)`.
The processor holds no global state, so a Ray actor can own one and call `process` repeatedly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from importlib import metadata
from typing import Any

import numpy as np
from mlcid.errors import SampleError
from mlcid.schema import BACKGROUND_PROMPT, LayerInfo, MLCIDSample
from mlcid.storage import ShardStore
from mlcid.writer import ShardWriter, read_stats, stats_name
from pipelines.base import Item, Stage, prompt_source_keys, prompt_sources
from pipelines.config import PipelineConfig, make_stage
from pipelines.faults import (STAGE_ERROR_PREFIX, DeviceFault, FaultPolicy, ShardFault, StageFault, describe,
                              free_device_memory, is_device_fault, is_oom)
from pipelines.flow import StageFlow
from pipelines.outcomes import outcome_row, outcomes_parquet
from pipelines.inputs import DecodeOptions, Drop, RawRecord, ReadStats, decode_record, input_shard_id, iter_raw_records

log = logging.getLogger(__name__)

# Modules whose import registers stage backends. Missing ones are skipped (their backends are then unknown).
BACKEND_MODULES = (
    "pipelines.caption", "pipelines.detect", "pipelines.segment", "pipelines.saliency",
    "pipelines.filters", "pipelines.cutout", "pipelines.inpaint",
)
VERSIONED_PACKAGES = ("layerdiff", "torch", "transformers", "diffusers", "segment-anything", "opencv-python-headless")
NO_CAPTION = "no_caption"
MISSING_BACKGROUND = "missing_background"


def outcomes_name(shard_id: int, prefix: str) -> str:
    return f"{prefix}-{shard_id:06d}.parquet"


def import_backends() -> None:
    """Import every backend module that exists so its `@register_stage` classes are known."""
    for name in BACKEND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but one of ITS imports is missing: a real error
                raise
            log.debug("backend module %s not present", name)


def _chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _versions() -> dict[str, str]:
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class ShardProcessor:
    """Build the configured stages once, then turn input shards into MLCID shards with `process`."""

    def __init__(self, config: PipelineConfig, faults: FaultPolicy | None = None) -> None:
        self.config = config
        self.faults = faults or FaultPolicy()
        self.batch_caps: dict[str, int] = {}  # kind → largest batch that fit after an out-of-memory
        self.stages: list[tuple[str, Stage]] = []
        self.pipeline_meta: dict[str, Any] = {}

    # -- setup ----------------------------------------------------------------------------------------------
    def setup(self) -> "ShardProcessor":
        """Build every configured stage (in `config.stage_order()`) and load its models once."""
        import_backends()
        stages = [(kind, make_stage(kind, self.config))  # unknown backends: KeyError listing the known
                  for kind in self.config.stage_order()]
        for kind, stage in stages:
            t0 = time.perf_counter()
            stage.setup()
            log.info("stage %s/%s ready in %.1fs", kind, self.config.backends[kind], time.perf_counter() - t0)
        self.stages = stages
        cfg = self.config
        self.pipeline_meta = {
            "preset": cfg.preset,
            "backends": {k: b for k, b in cfg.backends.items() if b is not None},
            "models": {k: str(getattr(s, "model_id", None) or type(s).__name__) for k, s in stages},
            "versions": _versions(),
            "thresholds": {
                "min_saliency_overlap": cfg.min_saliency_overlap, "containment": cfg.containment,
                "min_area_frac": cfg.min_area_frac, "max_area_frac": cfg.max_area_frac,
                "max_layers": cfg.max_layers, "dilate_kernel": cfg.dilate_kernel, "stage_order": [k for k, _ in stages],
                "stage_options": {k: dataclasses.asdict(o) for k, o in cfg.stage_options.items()},
            },
            "max_side": cfg.max_side,
        }
        return self

    # -- one chunk ------------------------------------------------------------------------------------------
    def _call(self, kind: str, stage: Stage, items: list[Item]) -> None:
        """`stage(items)` in slices of at most the kind's batch cap; an OOM halves the cap and retries the slice.

        Raises `StageFault` when one item alone runs out of memory; other exceptions propagate unchanged.
        """
        cap = self.batch_caps.get(kind) or len(items)
        start = 0
        while start < len(items):
            part = items[start:start + cap]
            try:
                stage(part)
            except Exception as e:  # noqa: BLE001 — classified below
                if not (self.faults.halve_on_oom and is_oom(e)):
                    raise
                for it in part:  # undo drops the failed call made
                    it.drop_reason, it.drop_detail = None, ""
                free_device_memory()
                if len(part) == 1:
                    raise StageFault(f"stage {kind} ran out of memory on a single item ({describe(e)})") from e
                cap = max(1, len(part) // 2)
                self.batch_caps[kind] = cap
                log.warning("stage %s ran out of memory on a batch of %d; retrying in batches of %d",
                            kind, len(part), cap)
                continue
            start += len(part)

    def run_stage(self, kind: str, stage: Stage, items: list[Item]) -> None:
        """Run `stage` on `items`, classifying failures (see `pipelines.faults`).

        Device faults and whole-batch failures raise (the shard fails); other errors are retried item by item and
        the items that still fail are dropped as `stage_error:<kind>`.
        """
        try:
            self._call(kind, stage, items)
            return
        except ShardFault:
            raise
        except Exception as e:  # noqa: BLE001 — classified: a device fault fails the shard, the rest is retried
            if is_device_fault(e):
                raise DeviceFault(f"stage {kind} hit a device fault: {describe(e)}") from e
            log.warning("stage %s failed on a batch of %d (%s); retrying one by one", kind, len(items), describe(e))
        first_error: BaseException | None = None
        for it in items:  # undo drops made by the failed batch call, then retry alone
            it.drop_reason, it.drop_detail = None, ""
            try:
                self._call(kind, stage, [it])
            except ShardFault:
                raise
            except Exception as e:  # noqa: BLE001
                if is_device_fault(e):
                    raise DeviceFault(f"stage {kind} hit a device fault: {describe(e)}") from e
                first_error = first_error or e
                it.drop_reason, it.drop_detail = None, ""
                it.drop(f"{STAGE_ERROR_PREFIX}{kind}", describe(e))
                log.warning("stage %s dropped %s: %s", kind, it.key, describe(e))
        if len(items) > 1 and all(it.drop_reason == f"{STAGE_ERROR_PREFIX}{kind}" for it in items):
            raise StageFault(f"stage {kind} failed on every item of a batch of {len(items)}, one by one too: "
                             f"{describe(first_error)}") from first_error

    def timed_stage(self, seconds: Counter[str]) -> Callable[[str, Stage, list[Item]], None]:
        """`run_stage` for the flow: per-stage seconds summed in `seconds` and split over the batch's items."""

        def run(kind: str, stage: Stage, items: list[Item]) -> None:
            t0 = time.perf_counter()
            self.run_stage(kind, stage, items)
            dt = time.perf_counter() - t0
            seconds[kind] += dt
            for it in items:
                it.timings[kind] = it.timings.get(kind, 0.0) + dt / len(items)

        return run

    def flow(self, seconds: Counter[str], cpu_pool: Executor | None = None) -> StageFlow:
        """A fresh `StageFlow` over the set-up stages (one per shard: nothing waits across shards); CPU-only
        stages run on `cpu_pool` when given."""
        return StageFlow(self.stages, self.timed_stage(seconds), self.config.bucketed_stages,
                         self.config.max_pending, self.batch_caps, cpu_pool)

    def to_sample(self, item: Item) -> MLCIDSample:
        """A finished item → `MLCIDSample` (global prompt falls back to the source caption, layer prompt to label)."""
        prompt = item.global_prompt or item.source.get("caption")
        if not prompt:
            raise SampleError(NO_CAPTION, "no generated caption and no source caption")
        if item.background is None:
            raise SampleError(MISSING_BACKGROUND, "the inpaint stage set no background")
        h, w = item.image.shape[:2]
        layers = [LayerInfo(BACKGROUND_PROMPT)]
        for obj in item.objects:
            if obj.rgba is None:
                raise SampleError("missing_cutout", f"object {obj.label!r} has no RGBA cut-out")
            layers.append(LayerInfo(obj.prompt or obj.label, tuple(int(v) for v in obj.box), float(obj.score),
                                    float(obj.mask.sum()) / (h * w)))
        return MLCIDSample(
            key=item.key,
            global_prompt=prompt,
            composite=item.image,
            background=np.asarray(item.background, dtype=np.uint8),
            foregrounds=[obj.rgba for obj in item.objects],
            masks=[obj.mask.astype(np.uint8) * 255 for obj in item.objects],  # (H, W) 0/255
            layers=layers,
            source=dict(item.source),
            pipeline={**self.pipeline_meta, "prompt_sources": prompt_sources(item)},
        )

    # -- writer thread --------------------------------------------------------------------------------------
    def _emit(self, writer: ShardWriter, results: list[Item | Drop], rows: list[dict[str, Any]],
              seconds: Counter[str]) -> None:
        """Write or count every result of one chunk; append one outcome row each (runs on the writer thread).

        `seconds` is this thread's own counter (write and summed per-item decode seconds).
        """
        for res in results:
            row = outcome_row(res)
            if isinstance(res, Drop):
                writer.drop(res.reason)
                row.update(reason=res.reason, detail=res.detail)
            elif not res.alive:
                writer.drop(res.drop_reason)
                row.update(reason=res.drop_reason, detail=res.drop_detail)
            else:
                t0 = time.perf_counter()
                try:
                    sample = self.to_sample(res)
                    before = Counter(writer.dropped)
                    if writer.write(sample):
                        row.update(kept=True, num_layers=sample.num_layers)
                        self.prompt_counts.update(prompt_source_keys(sample.pipeline["prompt_sources"]))
                    else:
                        reason = next(iter(Counter(writer.dropped) - before), "invalid_sample")
                        row.update(reason=reason, detail="rejected by the mlcid/1 validator")
                except SampleError as e:
                    writer.drop(e.reason)
                    row.update(reason=e.reason, detail=e.detail)
                dt = time.perf_counter() - t0
                seconds["write"] += dt
                res.timings["write"] = dt
            if isinstance(res, Item):
                seconds["decode"] += res.timings.get("decode", 0.0)
                row.update({f"seconds_{k}": v for k, v in res.timings.items()})
            rows.append(row)

    # -- one shard ------------------------------------------------------------------------------------------
    def process(self, input_url: str, out_dir: str, on_progress: Callable[[int], None] | None = None,
                before_publish: Callable[[], None] | None = None) -> dict[str, Any]:
        """Turn one input shard into `{prefix}-{id:06d}.tar` (+ .parquet, + _stats.json last); return the stats.

        `out_dir` is a local folder or an fsspec URL: a remote shard is built in a local staging folder and then
        uploaded (tar, outcomes, stats last). `before_publish()` runs just before anything becomes visible and
        may raise to stop it (the Ray actor checks that it still holds the shard's lease).
        """
        if not self.stages:
            raise RuntimeError("ShardProcessor.setup() must be called before process()")
        cfg = self.config
        shard_id = input_shard_id(input_url)
        store = ShardStore(out_dir)
        if store.exists(stats_name(shard_id, cfg.prefix)):
            log.info("shard %06d already complete in %s; skipping", shard_id, out_dir)
            return read_stats(out_dir, shard_id, cfg.prefix) | {"skipped": True}
        if store.local:
            return self._build(input_url, shard_id, store.local_dir(), on_progress, before_publish)
        with tempfile.TemporaryDirectory(prefix=f"mlcid-{shard_id:06d}-") as staging:  # $TMPDIR
            names: list[str] = []
            stats = self._build(input_url, shard_id, staging, on_progress, None, names)
            if before_publish is not None:
                before_publish()
            store.publish(staging, names)  # the tar, the outcomes, the stats file last
        log.info("shard %06d uploaded to %s", shard_id, store.uri(names[0]))
        return stats

    def _build(self, input_url: str, shard_id: int, out_dir: str, on_progress: Callable[[int], None] | None,
               before_publish: Callable[[], None] | None, published: list[str] | None = None) -> dict[str, Any]:
        """Build the shard in the local folder `out_dir`; `published` receives the file names (stats last)."""
        cfg = self.config
        opts = DecodeOptions(cfg.max_side, cfg.min_side, cfg.max_pixels, input_url, shard_id)
        self.prompt_counts: Counter[str] = Counter()  # written samples by prompt source (caption fallbacks)
        read = ReadStats()
        rows: list[dict[str, Any]] = []
        seconds: Counter[str] = Counter()  # stages (CPU-only ones on their thread), decode_wait, cpu_stage_wait
        io_seconds: Counter[str] = Counter()  # writer thread: write, decode (summed over decode threads)

        preparers = [(kind, stage) for kind, stage in self.stages if hasattr(stage, "prepare")]

        def decode(rec: RawRecord | Drop) -> Item | Drop:
            """Decode one record and run the stages' CPU preprocessing on it (decode thread; timed as decode)."""
            if isinstance(rec, Drop):
                return rec
            t0 = time.perf_counter()
            out = decode_record(rec, opts)
            if isinstance(out, Item):
                for kind, stage in preparers:
                    try:
                        stage.prepare(out)
                    except Exception as e:  # noqa: BLE001 — the stage redoes it in its call and classifies the error
                        log.debug("prepare %s failed on %s (%s); the stage will do it", kind, out.key, describe(e))
                out.timings["decode"] = time.perf_counter() - t0
            return out

        writer = ShardWriter(out_dir, shard_id, cfg.prefix, cfg.validation())
        writer.__enter__()
        try:
            with ThreadPoolExecutor(max(1, cfg.decode_threads), thread_name_prefix="decode") as pool, \
                    ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool, \
                    (ThreadPoolExecutor(1, thread_name_prefix="cpu-stage") if cfg.cpu_stage_thread
                     else contextlib.nullcontext()) as cpu_pool:
                chunks = _chunks(iter_raw_records(input_url, stats=read), cfg.chunk_size)

                def submit(chunk: list[RawRecord | Drop] | None) -> list[Future] | None:
                    return None if chunk is None else [pool.submit(decode, r) for r in chunk]

                upcoming = submit(next(chunks, None))
                flow = self.flow(seconds, cpu_pool)
                last_write: Future | None = None

                def hand_over(done: list[Item | Drop]) -> Future:
                    # 3. Hand what left the flow to the writer thread (at most one batch of results in flight).
                    if last_write is not None:
                        last_write.result()
                    return write_pool.submit(self._emit, writer, done, rows, io_seconds)

                while upcoming is not None:
                    # 1. Collect this chunk's decodes; start decoding the next chunk meanwhile.
                    t0 = time.perf_counter()
                    results = [f.result() for f in upcoming]
                    seconds["decode_wait"] += time.perf_counter() - t0
                    upcoming = submit(next(chunks, None))
                    # 2. Stages on the decoded items; bucketed stages may keep some waiting for a full batch.
                    done = flow.push([r for r in results if isinstance(r, Item)])
                    last_write = hand_over([r for r in results if isinstance(r, Drop)] + done)
                    if on_progress is not None:
                        on_progress(len(results))
                last_write = hand_over(flow.drain())  # the partly filled batches, at the shard's end
                last_write.result()
                if cpu_pool is not None:
                    seconds["cpu_stage_wait"] += flow.wait_s  # this thread waiting for the CPU-stage thread
            if writer.written + sum(writer.dropped.values()) != len(rows):
                raise RuntimeError(f"bookkeeping bug: {len(rows)} outcomes but writer counted "
                                   f"{writer.written} written + {sum(writer.dropped.values())} dropped")
            self._check_error_budget(rows)
            # 4. Per-sample outcomes beside the tar; both are published when the tar is closed, stats last.
            writer.attach(outcomes_name(shard_id, cfg.prefix), outcomes_parquet(rows, self.stage_columns()))
            for name, secs in (seconds + io_seconds).items():
                writer.add_timing(name, secs)
            if before_publish is not None:
                before_publish()
            stats = writer.close({
                "input_url": input_url, "preset": cfg.preset, "outcomes": outcomes_name(shard_id, cfg.prefix),
                "late_members": read.late_members, "input_truncated": read.truncated, "skipped": False,
                "prompt_sources": dict(self.prompt_counts),
            })
        except BaseException:
            writer.abort()
            raise
        if published is not None:
            published[:] = writer.names
        log.info("shard %06d: read %d, written %d, dropped %s", shard_id, stats["read"], stats["written"],
                 stats["dropped"])
        return stats

    def _check_error_budget(self, rows: list[dict[str, Any]]) -> None:
        """Fail the shard (`StageFault`) when more of its items hit stage errors than `FaultPolicy` allows."""
        errors = Counter(r["reason"] for r in rows if (r["reason"] or "").startswith(STAGE_ERROR_PREFIX))
        total = sum(errors.values())
        if self.faults.over_budget(total, len(rows)):
            raise StageFault(f"{total} of {len(rows)} items hit stage errors ({dict(errors)}), more than the "
                             f"{self.faults.max_stage_error_frac:.0%} budget; first: "
                             f"{next(r['detail'] for r in rows if (r['reason'] or '').startswith(STAGE_ERROR_PREFIX))}")

    def stage_columns(self) -> list[str]:
        """Timing columns of the outcomes table: decode, each stage, write."""
        return ["decode", *[k for k, _ in self.stages], "write"]
