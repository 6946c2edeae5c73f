"""`ShardProcessor`: one img2dataset shard in → one MLCID shard + per-sample outcomes out (plain Python, no Ray).

`setup()` builds and sets up every configured stage once; `process(input_url, out_dir)` then:
  1. skips the shard if its stats file exists (resume) — returns the stored stats with `skipped: True`;
  2. streams the input tar, decoding chunks of `chunk_size` on a thread pool (the next chunk decodes while
     the stages run on the current one);
  3. runs the stages in DESIGN.md order on each chunk; a stage raising on a whole chunk is retried item by
     item and the items that still fail are dropped with reason `stage_error:<kind>`;
  4. hands finished items to a single writer thread (`ShardWriter`: validation, PNG/JPEG encoding, `.tmp`);
  5. writes `{prefix}-{id:06d}.parquet` (per-sample outcomes) atomically, then closes the shard: tar renamed
     into place, stats file LAST. Any exception leaves no visible shard and no stats.
Every input key is counted exactly once (written or dropped with its reason): `read == written + sum(dropped)`.
The processor holds no global state, so a Ray actor can own one and call `process` repeatedly.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlcid.errors import SampleError
from mlcid.schema import BACKGROUND_PROMPT, LayerInfo, MLCIDSample
from mlcid.writer import ShardWriter, is_complete, read_stats
from pipelines.base import Item, Stage, alive, prompt_source_keys, prompt_sources
from pipelines.config import STAGE_ORDER, PipelineConfig, make_stage
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

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.stages: list[tuple[str, Stage]] = []
        self.pipeline_meta: dict[str, Any] = {}

    # -- setup ----------------------------------------------------------------------------------------------
    def setup(self) -> "ShardProcessor":
        """Build every configured stage (DESIGN.md order) and load its models once."""
        import_backends()
        stages = []
        for kind in STAGE_ORDER:
            backend = self.config.backends.get(kind)
            if backend is None:
                continue
            stages.append((kind, make_stage(kind, self.config)))  # unknown backends: KeyError listing the known
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
                "max_layers": cfg.max_layers, "dilate_kernel": cfg.dilate_kernel,
                "stage_options": {k: dataclasses.asdict(o) for k, o in cfg.stage_options.items()},
            },
            "max_side": cfg.max_side,
        }
        return self

    # -- one chunk ------------------------------------------------------------------------------------------
    @staticmethod
    def run_stage(kind: str, stage: Stage, items: list[Item]) -> None:
        """Run `stage` on `items`; if it raises, retry one by one and drop the failures as `stage_error:<kind>`."""
        try:
            stage(items)
            return
        except Exception as e:  # noqa: BLE001 — one bad batch must not stop the shard
            log.warning("stage %s failed on a batch of %d (%s: %s); retrying one by one",
                        kind, len(items), type(e).__name__, e)
        for it in items:  # undo drops made by the failed batch call, then retry alone
            it.drop_reason, it.drop_detail = None, ""
            try:
                stage([it])
            except Exception as e:  # noqa: BLE001
                it.drop_reason, it.drop_detail = None, ""
                it.drop(f"stage_error:{kind}", f"{type(e).__name__}: {e}"[:500])
                log.warning("stage %s dropped %s: %s: %s", kind, it.key, type(e).__name__, e)

    def run_stages(self, items: list[Item], seconds: Counter[str]) -> None:
        """All stages in order on the alive items; per-stage seconds summed in `seconds` and split per item."""
        for kind, stage in self.stages:
            live = alive(items)
            if not live:
                break
            t0 = time.perf_counter()
            self.run_stage(kind, stage, live)
            dt = time.perf_counter() - t0
            seconds[kind] += dt
            for it in live:
                it.timings[kind] = it.timings.get(kind, 0.0) + dt / len(live)

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
            row: dict[str, Any] = {"key": res.key, "kept": False, "reason": None, "detail": "", "num_layers": 0}
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
    def process(self, input_url: str, out_dir: str, on_progress: Callable[[int], None] | None = None
                ) -> dict[str, Any]:
        """Turn one input shard into `{prefix}-{id:06d}.tar` (+ .parquet, + _stats.json last); return the stats."""
        if not self.stages:
            raise RuntimeError("ShardProcessor.setup() must be called before process()")
        cfg = self.config
        shard_id = input_shard_id(input_url)
        if is_complete(out_dir, shard_id, cfg.prefix):
            log.info("shard %06d already complete in %s; skipping", shard_id, out_dir)
            return read_stats(out_dir, shard_id, cfg.prefix) | {"skipped": True}
        opts = DecodeOptions(cfg.max_side, cfg.min_side, cfg.max_pixels, input_url, shard_id)
        self.prompt_counts: Counter[str] = Counter()  # written samples by prompt source (caption fallbacks)
        read = ReadStats()
        rows: list[dict[str, Any]] = []
        seconds: Counter[str] = Counter()  # main thread: stages, decode_wait
        io_seconds: Counter[str] = Counter()  # writer thread: write, decode (summed over decode threads)

        def decode(rec: RawRecord | Drop) -> Item | Drop:
            if isinstance(rec, Drop):
                return rec
            t0 = time.perf_counter()
            out = decode_record(rec, opts)
            if isinstance(out, Item):
                out.timings["decode"] = time.perf_counter() - t0
            return out

        writer = ShardWriter(out_dir, shard_id, cfg.prefix, cfg.validation())
        writer.__enter__()
        try:
            with ThreadPoolExecutor(max(1, cfg.decode_threads), thread_name_prefix="decode") as pool, \
                    ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool:
                chunks = _chunks(iter_raw_records(input_url, stats=read), cfg.chunk_size)

                def submit(chunk: list[RawRecord | Drop] | None) -> list[Future] | None:
                    return None if chunk is None else [pool.submit(decode, r) for r in chunk]

                upcoming = submit(next(chunks, None))
                last_write: Future | None = None
                while upcoming is not None:
                    # 1. Collect this chunk's decodes; start decoding the next chunk meanwhile.
                    t0 = time.perf_counter()
                    results = [f.result() for f in upcoming]
                    seconds["decode_wait"] += time.perf_counter() - t0
                    upcoming = submit(next(chunks, None))
                    # 2. Stages on the decoded items.
                    self.run_stages([r for r in results if isinstance(r, Item)], seconds)
                    # 3. Hand the chunk to the writer thread (at most one chunk in flight).
                    if last_write is not None:
                        last_write.result()
                    last_write = write_pool.submit(self._emit, writer, results, rows, io_seconds)
                    if on_progress is not None:
                        on_progress(len(results))
                if last_write is not None:
                    last_write.result()
            if writer.written + sum(writer.dropped.values()) != len(rows):
                raise RuntimeError(f"bookkeeping bug: {len(rows)} outcomes but writer counted "
                                   f"{writer.written} written + {sum(writer.dropped.values())} dropped")
            # 4. Per-sample outcomes (atomic), then the shard and its stats file (last).
            self._write_outcomes(Path(out_dir) / outcomes_name(shard_id, cfg.prefix), rows)
            for name, secs in (seconds + io_seconds).items():
                writer.add_timing(name, secs)
            stats = writer.close({
                "input_url": input_url, "preset": cfg.preset, "outcomes": outcomes_name(shard_id, cfg.prefix),
                "late_members": read.late_members, "input_truncated": read.truncated, "skipped": False,
                "prompt_sources": dict(self.prompt_counts),
            })
        except BaseException:
            writer.abort()
            raise
        log.info("shard %06d: read %d, written %d, dropped %s", shard_id, stats["read"], stats["written"],
                 stats["dropped"])
        return stats

    def _write_outcomes(self, path: Path, rows: list[dict[str, Any]]) -> None:
        """One parquet row per input key: key, kept, reason, detail, num_layers, seconds_<stage>…"""
        cols = ["decode", *[k for k, _ in self.stages], "write"]
        table = pa.table({
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "kept": pa.array([r["kept"] for r in rows], pa.bool_()),
            "reason": pa.array([r["reason"] for r in rows], pa.string()),
            "detail": pa.array([r["detail"] for r in rows], pa.string()),
            "num_layers": pa.array([r["num_layers"] for r in rows], pa.int8()),
            **{f"seconds_{c}": pa.array([r.get(f"seconds_{c}") for r in rows], pa.float32()) for c in cols},
        })
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
