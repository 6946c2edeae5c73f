"""Static HTML gallery of MLCID shards: `mlcid view SHARDS... --out DIR` (index + paged sample cards)."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mlcid.errors import SampleError
from mlcid.reader import iter_shard_samples
from mlcid.schema import MLCIDSample
from mlcid.shards import expand_urls
from mlcid.stats import StatsSummary, load_shard_stats, outcomes_url_for, summarize
from mlcid.validate import ValidationConfig, validate_sample
from mlcid.view_assets import (
    CardView,
    DroppedView,
    LayerView,
    PageLink,
    ShardRow,
    card_html,
    gallery_page,
    index_page,
    page_name,
)

log = logging.getLogger(__name__)

MARKER = ".mlcid-view"  # written into the output folder; only such folders are cleaned before a rebuild
MAX_ERROR_CHARS = 600
MAX_DROPPED_LISTED = 500  # dropped samples listed per shard on the index (the total is always shown)


@dataclass(frozen=True)
class ViewConfig:
    """What the gallery shows. `thumb_size` is the longest side (px) of the image files written."""

    per_page: int = 50
    max_samples: int | None = None  # stop after this many cards (valid, invalid and unreadable alike)
    thumb_size: int = 256
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    title: str = "MLCID shards"

    def __post_init__(self) -> None:
        if self.per_page < 1:
            raise ValueError(f"per_page must be ≥ 1, got {self.per_page}")
        if self.max_samples is not None and self.max_samples < 0:
            raise ValueError(f"max_samples must be ≥ 0 or None, got {self.max_samples}")
        if self.thumb_size < 8:
            raise ValueError(f"thumb_size must be ≥ 8 px, got {self.thumb_size}")


@dataclass
class ViewResult:
    """What `build_view` wrote."""

    out_dir: Path
    index: Path
    pages: list[Path]
    cards: int
    status_counts: dict[str, int]  # 'ok' / 'invalid' / 'error' → cards
    reasons: dict[str, int]  # reason → invalid or unreadable cards
    summary: StatsSummary = field(repr=False)


# -- images ---------------------------------------------------------------------------------------------------


def _save_image(arr: np.ndarray, path: Path, thumb_size: int, nearest: bool = False) -> None:
    """Write (H, W), (H, W, 3) or (H, W, 4) uint8 as a thumbnail: JPEG for RGB, PNG otherwise."""
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    im.thumbnail((thumb_size, thumb_size), Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS)
    if path.suffix == ".jpg":
        im.convert("RGB").save(path, format="JPEG", quality=90)
    else:
        im.save(path, format="PNG", compress_level=3)


def _error_text(e: SampleError) -> str:
    """'reason: detail' from the current fields (the reader prefixes `detail` with 'url:key:' after creation)."""
    return (f"{e.reason}: {e.detail}" if e.detail else e.reason)[:MAX_ERROR_CHARS]


def _sample_card(
    sample: MLCIDSample, number: int, shard: str, page_dir: Path, rel: str, config: ViewConfig
) -> CardView:
    """Write a sample's images into `page_dir` and describe its card (status from the validator)."""
    try:
        validate_sample(sample, config.validation)
        status, reason, error = "ok", None, None
    except SampleError as e:
        status, reason, error = "invalid", e.reason, _error_text(e)
    stem = f"{number:06d}"
    _save_image(sample.composite, page_dir / f"{stem}-composite.jpg", config.thumb_size)
    _save_image(sample.background, page_dir / f"{stem}-layer00.jpg", config.thumb_size)
    size = (sample.width, sample.height)
    layers = [LayerView(0, sample.layers[0].prompt, f"{rel}/{stem}-layer00.jpg", size=size)]
    for i, (fg, m) in enumerate(zip(sample.foregrounds, sample.masks), start=1):
        _save_image(fg, page_dir / f"{stem}-layer{i:02d}.png", config.thumb_size)
        _save_image(m, page_dir / f"{stem}-mask{i:02d}.png", config.thumb_size, nearest=True)
        info = sample.layers[i]
        layers.append(
            LayerView(
                i,
                info.prompt,
                f"{rel}/{stem}-layer{i:02d}.png",
                f"{rel}/{stem}-mask{i:02d}.png",
                box=info.box,
                score=info.score,
                area_frac=info.area_frac,
                size=size,
            )
        )
    return CardView(
        number=number,
        shard=shard,
        status=status,
        key=sample.key,
        reason=reason,
        error=error,
        global_prompt=str(sample.global_prompt),
        size=(sample.width, sample.height),
        composite=f"{rel}/{stem}-composite.jpg",
        layers=layers,
        metadata=sample.metadata(),
    )


# -- pages ----------------------------------------------------------------------------------------------------


class _Pager:
    """Collect card HTML and write `page-NNNN.html` files; a full page waits for one more card to know `next`."""

    def __init__(self, out_dir: Path, per_page: int, title: str) -> None:
        self.out_dir, self.per_page, self.title = out_dir, per_page, title
        self.pending: list[str] = []
        self.first = 1
        self.links: list[PageLink] = []

    @property
    def page(self) -> int:
        """Number of the page the next card lands on."""
        return len(self.links) + 1 + (len(self.pending) == self.per_page)

    def add(self, html: str) -> None:
        if len(self.pending) == self.per_page:
            self._flush(has_next=True)
        self.pending.append(html)

    def finish(self) -> None:
        if self.pending:
            self._flush(has_next=False)

    def _flush(self, has_next: bool) -> None:
        page = len(self.links) + 1
        name = page_name(page)
        (self.out_dir / name).write_text(
            gallery_page(self.title, page, has_next, self.pending, self.first), encoding="utf-8"
        )
        self.links.append(PageLink(name, self.first, self.first + len(self.pending) - 1))
        self.first += len(self.pending)
        self.pending = []


def _prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir`, or clean a previous gallery there; refuse a non-empty folder the viewer did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).exists():
            raise ValueError(f"--out {out_dir} is not empty and holds no earlier gallery ({MARKER}); pick a new folder")
        shutil.rmtree(out_dir / "img", ignore_errors=True)
        for old in [*out_dir.glob("page-*.html"), out_dir / "index.html"]:
            old.unlink(missing_ok=True)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("written by mlcid view\n")


def display_names(urls: list[str]) -> list[str]:
    """Shortest trailing path of each URL that tells it apart: 'a/mlcid-000000.tar' vs 'b/mlcid-000000.tar'."""
    parts = [url.rstrip("/").split("/") for url in urls]
    depth = [1] * len(urls)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        seen = Counter(names)
        clashing = [i for i, n in enumerate(names) if seen[n] > 1 and depth[i] < len(parts[i])]
        if not clashing:
            return [urls[i] if seen[n] > 1 else n for i, n in enumerate(names)]
        for i in clashing:
            depth[i] += 1


def load_dropped(url: str, limit: int = MAX_DROPPED_LISTED) -> tuple[list[DroppedView], int] | None:
    """The dropped rows (key, reason, detail) of the outcomes parquet beside a shard, at most `limit`, and their
    total; None when the shard has no outcomes file. An unreadable file is reported as one row."""
    import fsspec
    import pyarrow.parquet as pq

    try:
        with fsspec.open(outcomes_url_for(url), "rb") as f:
            table = pq.read_table(f, columns=["key", "kept", "reason", "detail"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on a bad file
        return [DroppedView("", "unreadable_outcomes", f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS])], 1
    rows = [r for r in table.to_pylist() if not r["kept"]]
    listed = [DroppedView(str(r["key"]), str(r["reason"] or ""), str(r["detail"] or "")[:MAX_ERROR_CHARS])
              for r in rows[:limit]]
    return listed, len(rows)


def _items(urls: list[str]) -> Iterator[tuple[int, MLCIDSample | SampleError]]:
    """(shard index, decoded sample or its error) over all shards, without validation (done per card)."""
    for i, url in enumerate(urls):
        for item in iter_shard_samples(url, config=None):
            yield i, item


def build_view(
    shards: str | Iterable[str], out_dir: str | os.PathLike, config: ViewConfig = ViewConfig()
) -> ViewResult:
    """Write `index.html` (stats summary, page list, shard table) and `page-NNNN.html` sample cards into `out_dir`."""
    # 1. Resolve shards and read the stats file next to each (missing → incomplete).
    urls = expand_urls(shards)
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"shard file(s) not found: {', '.join(missing[:5])}{more}")
    shard_stats = [load_shard_stats(url) for url in urls]
    summary = summarize(shard_stats)
    rows = [ShardRow(st, name, dropped=load_dropped(st.url)) for st, name in zip(shard_stats, display_names(urls))]
    out = Path(out_dir)
    _prepare_out_dir(out)

    # 2. Stream samples into cards, writing thumbnails under img/pNNNN/ and pages as they fill.
    pager = _Pager(out, config.per_page, config.title)
    status_counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    limit = config.max_samples
    expected = summary.written if summary.complete == summary.shards else None  # the tars hold written samples
    bounds = [x for x in (expected, limit) if x is not None]
    number, reached = 0, -1
    with tqdm(total=min(bounds) if bounds else None, unit="sample", desc="view", disable=None) as bar:
        items = _items(urls) if limit != 0 else iter(())
        for shard_idx, item in items:
            row, reached = rows[shard_idx], shard_idx
            number += 1
            page_rel = f"img/p{pager.page:04d}"
            page_dir = out / page_rel
            page_dir.mkdir(exist_ok=True)
            if isinstance(item, SampleError):
                card = CardView(number, row.name, "error", reason=item.reason, error=_error_text(item))
            else:
                card = _sample_card(item, number, row.name, page_dir, page_rel, config)
            if card.reason is not None:
                reasons[card.reason] += 1
                row.reasons[card.reason] = row.reasons.get(card.reason, 0) + 1
            status_counts[card.status] += 1
            row.viewed[card.status] = row.viewed.get(card.status, 0) + 1
            pager.add(card_html(card))
            bar.update()
            if limit is not None and number >= limit:
                break
    pager.finish()
    stopped = limit is not None and number >= limit
    for i, row in enumerate(rows):  # without a stop every shard was read to its end, empty ones included
        row.read_by_viewer = not stopped or i <= reached

    # 3. The index: totals and histograms from the stats files, then pages and per-shard rows.
    note = f"showing the first {number} samples (--max-samples {limit})" if stopped else ""
    index = out / "index.html"
    index.write_text(index_page(config.title, summary, rows, pager.links, note), encoding="utf-8")
    log.info("wrote %d cards on %d pages: %s", number, len(pager.links), index)
    return ViewResult(
        out, index, [out / p.name for p in pager.links], number, dict(status_counts), dict(reasons), summary
    )
