"""Read img2dataset output shards (`NNNNN.tar`: KEY.jpg|png|webp, KEY.txt, KEY.json) into pipeline `Item`s.

Two steps so the runner can decode on a thread pool: `iter_raw_records(url)` streams the tar and groups members
by key — also when keys are INTERLEAVED (members are buffered per key; a key is complete once
`flush_after` other keys have been seen since its last member, or at the end of the tar) — and
`decode_record(record, opts)` turns one record into an `Item` or a `Drop` with a typed reason:

- `undecodable_image`: corrupt or zero-byte image; `missing_image`: a key with no image member;
- `image_too_large`: more than `max_pixels` pixels — refused from the header, before any pixel is decoded;
- `too_small`: shorter side below `min_side`;
- `truncated_shard`: the tar ends mid-member (the key it cut is dropped; all complete keys are kept).
A missing caption is fine (the caption is optional; `source["caption"]` is then None).
Images are EXIF-transposed, converted to RGB (grayscale, CMYK, RGBA over white, 16-bit) and resized so the
shorter side is at most `max_side`, both sides rounded down to multiples of 8.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mlcid import errors
from mlcid.errors import SampleError
from mlcid.schema import license_fields, sample_uid
from mlcid.imageio import DEFAULT_MAX_PIXELS, decode_rgb, open_bounded
from mlcid.shards import READ_ERRORS, TarRead, iter_tar_members
from pipelines.base import Item

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
TOO_SMALL = "too_small"
MISSING_IMAGE = "missing_image"
_SHARD_ID = re.compile(r"(\d+)\.tar(?:\.gz)?$")


def input_shard_id(url: str) -> int:
    """'…/00012.tar' → 12 (the number img2dataset put in the shard name)."""
    m = _SHARD_ID.search(url.rstrip("/").rsplit("/", 1)[-1])
    if not m:
        raise ValueError(f"cannot read a shard id from {url!r}: expected a name like '00012.tar'")
    return int(m.group(1))


def plan_shard_ids(urls: list[str]) -> dict[int, str]:
    """{shard id: url} for a run's inputs. Raises ValueError for a name without an id or two inputs with one id
    (output shard id = input shard id, so they would overwrite each other)."""
    by_id: dict[int, str] = {}
    for url in urls:
        sid = input_shard_id(url)
        if sid in by_id:
            raise ValueError(f"inputs {by_id[sid]!r} and {url!r} both have shard id {sid}; output shard id = "
                             "input shard id, so one would overwrite the other — give each run unique shard ids")
        by_id[sid] = url
    return by_id


@dataclass
class RawRecord:
    """The members of one key: {suffix: bytes}."""

    key: str
    members: dict[str, bytes]


@dataclass
class Drop:
    """An input sample that produced no item, with its typed reason."""

    key: str
    reason: str
    detail: str = ""
    source: dict = field(default_factory=dict)  # provenance, when the record got that far (see `provenance`)


@dataclass
class DecodeOptions:
    """How to decode and size input images (the runner fills these from `PipelineConfig`)."""

    max_side: int = 512
    min_side: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_url: str = ""
    shard_id: int = -1


@dataclass
class ReadStats:
    """Counters of one tar stream that are not samples (members arriving after their key was emitted)."""

    late_members: int = 0
    keys: int = 0
    truncated: bool = False


def _safe_key(key: str) -> str:
    """MLCID keys hold no '.' or '/': 'dir/000012' → 'dir_000012'."""
    return key.replace("/", "_").replace(".", "_")


def iter_raw_records(url: str, flush_after: int = 256, stats: ReadStats | None = None
                     ) -> Iterator[RawRecord | Drop]:
    """Stream one tar; yield a `RawRecord` per key (interleaving tolerated), a `Drop` for a truncated tail.

    Raises `SampleError(UNREADABLE_SHARD)` if the tar cannot be opened or read at all (the caller decides
    whether to retry the shard). A tar that breaks later ends the stream: complete keys are still yielded,
    the key whose member was cut becomes a `Drop(truncated_shard)` and `stats.truncated` is set. A plain
    `.tar` cut exactly between members (no end-of-archive block) keeps every key and sets `stats.truncated`.
    """
    stats = stats if stats is not None else ReadStats()
    pending: OrderedDict[str, dict[str, bytes]] = OrderedDict()  # key → members, oldest first
    last_seen: dict[str, int] = {}
    emitted: set[str] = set()
    tick = 0
    read = TarRead(url)
    try:
        for key, suffix, data in iter_tar_members(url, read):
            if key in emitted:
                stats.late_members += 1
                log.warning("%s: member %s.%s arrived after its key was emitted; ignored", url, key, suffix)
                continue
            if key not in last_seen or last_seen[key] != tick:
                tick += 1
            last_seen[key] = tick
            pending.setdefault(key, {})[suffix.lower()] = data
            pending.move_to_end(key)
            while pending:  # flush keys not seen for `flush_after` key changes
                old = next(iter(pending))
                if tick - last_seen[old] < flush_after:
                    break
                emitted.add(old)
                stats.keys += 1
                yield RawRecord(old, pending.pop(old))
        if read.cut_between_members:
            # Cut exactly between members: no member is broken, so every key is kept; the shard is flagged.
            stats.truncated = True
            log.warning("%s: no end-of-archive block (cut between members); keeping every key read", url)
    except READ_ERRORS as e:
        if not read.started:
            raise SampleError(errors.UNREADABLE_SHARD, f"{url}: {type(e).__name__}: {e}") from e
        stats.truncated = True
        log.warning("%s: truncated (%s: %s); keeping the complete keys", url, type(e).__name__, e)
        reading = read.reading
        if reading is not None:  # the key whose member was cut is dropped; complete earlier keys are kept
            pending.pop(reading, None)
        for key, members in pending.items():
            stats.keys += 1
            yield RawRecord(key, members)
        if reading is not None and reading not in emitted:
            stats.keys += 1
            yield Drop(_safe_key(reading), errors.TRUNCATED_SHARD, f"{url}: {type(e).__name__}: {e}")
        return
    for key, members in pending.items():
        stats.keys += 1
        yield RawRecord(key, members)


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) with the shorter side scaled down to ≤ max_side (never up), both rounded down to × 8 (≥ 8)."""
    scale = min(1.0, max_side / min(width, height))
    w, h = max(8, int(round(width * scale)) // 8 * 8), max(8, int(round(height * scale)) // 8 * 8)
    return w, h


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    text = data.decode("utf-8", errors="replace").replace("\x00", "").strip()
    return text or None


def provenance(record: RawRecord, opts: DecodeOptions) -> dict:
    """`source` fields known before the image is decoded: uid, url, original caption, licence fields, input ids."""
    meta: dict = {}
    if "json" in record.members:
        try:
            meta = json.loads(record.members["json"].decode("utf-8"))
            meta = meta if isinstance(meta, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    caption = _text(record.members.get("txt"))
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"].strip() or None
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    return {
        "uid": sample_uid(opts.shard_id, record.key, url),
        "url": url,
        "caption": caption,
        "license": license_fields(meta),
        "input_shard": opts.shard_id,
        "input_url": opts.shard_url,
        "input_key": record.key,
    }


def decode_record(record: RawRecord, opts: DecodeOptions) -> Item | Drop:
    """One raw record → an `Item` (RGB, resized) or a `Drop` naming why not. Never raises for bad data."""
    key = _safe_key(record.key)
    source = provenance(record, opts)
    suffix = next((s for s in IMAGE_SUFFIXES if s in record.members), None)
    if suffix is None:
        return Drop(key, MISSING_IMAGE, f"members: {', '.join(sorted(record.members))[:200]}", source)
    data = record.members[suffix]
    try:
        w0, h0 = open_bounded(data, opts.max_pixels).size  # header only: refuses bombs before decoding
        if min(w0, h0) < opts.min_side:
            return Drop(key, TOO_SMALL, f"{w0}x{h0}, shorter side < {opts.min_side}", source)
        rgb = decode_rgb(data, opts.max_pixels, exif_transpose=True)  # (H, W, 3) uint8
    except SampleError as e:
        return Drop(key, e.reason, e.detail, source)
    h, w = rgb.shape[:2]
    tw, th = output_size(w, h, opts.max_side)
    if (tw, th) != (w, h):
        rgb = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.Resampling.LANCZOS), dtype=np.uint8)
    source.update(original_size=[w, h], image_format=suffix)
    rgb = rgb if rgb.flags.writeable and rgb.flags.c_contiguous else np.array(rgb, order="C")  # own the buffer
    return Item(key=key, image=rgb, source=source)


def iter_inputs(url: str, opts: DecodeOptions | None = None) -> Iterator[Item | Drop]:
    """Sequential convenience: `decode_record` over `iter_raw_records` (the runner decodes on threads)."""
    opts = opts or DecodeOptions(shard_url=url, shard_id=input_shard_id(url))
    for rec in iter_raw_records(url):
        yield rec if isinstance(rec, Drop) else decode_record(rec, opts)

