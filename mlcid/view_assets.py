"""HTML for the shard viewer: card/page/index templates and inline CSS. Every piece of text goes through `esc`."""

from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mlcid.stats import ShardStats, StatsSummary

# No network, no scripts: images from the page's own folder only, CSS inline. Defence in depth on top of escaping.
CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'none'; base-uri 'none'"

CSS = """
:root { --fg:#1d2330; --muted:#5f6b7a; --line:#d9dee5; --card:#fff; --bg:#f3f5f8; --ok:#1f7a3d; --bad:#b3261e;
        --warn:#9a6700; --thumb:116px; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header.top, footer.nav { padding: 10px 20px; background: #fff; border-bottom: 1px solid var(--line); }
footer.nav { border-top: 1px solid var(--line); border-bottom: 0; }
header.top h1 { font-size: 18px; margin: 0 0 4px; }
nav a, nav span { margin-right: 14px; }
nav .here { font-weight: 600; }
nav .off { color: var(--muted); }
a { color: #0b57d0; }
main { padding: 16px 20px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card.invalid { border-color: var(--warn); }
.card.error { border-color: var(--bad); }
.card > header { display: flex; flex-wrap: wrap; gap: 8px; align-items: baseline; margin-bottom: 6px; }
.card .num { color: var(--muted); font-variant-numeric: tabular-nums; }
.card .key { font-weight: 600; overflow-wrap: anywhere; }
.card .where { color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.badge { font-size: 11px; padding: 1px 7px; border-radius: 9px; color: #fff; text-transform: uppercase; }
.badge.ok { background: var(--ok); }
.badge.invalid { background: var(--warn); }
.badge.error { background: var(--bad); }
.errmsg { margin: 4px 0 8px; color: var(--bad); font-family: ui-monospace, monospace; font-size: 12px;
          overflow-wrap: anywhere; white-space: pre-wrap; }
.global { margin: 2px 0 8px; }
.label { display: inline-block; min-width: 46px; color: var(--muted); font-size: 12px; }
.prompt { overflow-wrap: anywhere; }
.layers { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: calc(var(--thumb) + 2px); }
.imgbox { width: var(--thumb); height: var(--thumb); display: flex; align-items: center; justify-content: center;
          border: 1px solid var(--line); border-radius: 4px; overflow: hidden; background: #eef1f4;
          box-sizing: content-box; }
.imgbox + .imgbox { margin-top: 4px; }
.imgbox img { width: 100%; height: 100%; object-fit: contain; display: block; }
.checker { background-color: #fff;
           background-image: conic-gradient(#cfd5dc 25%, #fff 0 50%, #cfd5dc 0 75%, #fff 0);
           background-size: 16px 16px; }
.imgbox.mask { background: #000; }
.imgbox img.px { image-rendering: pixelated; }
.legend { color: var(--muted); font-size: 12px; }
figcaption { font-size: 12px; margin-top: 3px; }
figcaption .idx { display: inline-block; min-width: 18px; font-weight: 600; }
figcaption .facts { display: block; color: var(--muted); font-size: 11px; }
details { margin-top: 8px; }
summary { cursor: pointer; color: var(--muted); font-size: 12px; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 4px; padding: 8px; font-size: 11px;
      max-height: 320px; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
table { border-collapse: collapse; background: #fff; margin: 6px 0 18px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.barcell { width: 240px; }
.bar { display: block; height: 10px; background: #5b8def; border-radius: 2px; min-width: 1px; }
tr.incomplete td, tr.bad-stats td { background: #fff4e5; }
.status.incomplete, .status.bad-stats { color: var(--warn); font-weight: 600; }
.status.complete { color: var(--ok); }
.warn { color: var(--warn); }
.empty { color: var(--muted); font-style: italic; }
h2 { font-size: 16px; margin: 18px 0 4px; }
"""


def esc(value: Any) -> str:
    """Escape any value for HTML text and attribute values (quotes too)."""
    return html.escape(str(value), quote=True)


@dataclass
class LayerView:
    """One layer as shown: image (and mask for foregrounds) file paths relative to the page, and its facts."""

    index: int
    prompt: str
    image: str
    mask: str | None = None
    box: tuple[int, int, int, int] | None = None
    score: float | None = None
    area_frac: float | None = None
    size: tuple[int, int] | None = None  # (width, height) of the full-size layer: the box takes its aspect


@dataclass
class CardView:
    """One sample card. `status`: 'ok' (valid), 'invalid' (decoded, breaks an invariant), 'error' (undecodable)."""

    number: int  # 1-based position in the whole gallery
    shard: str
    status: str
    key: str | None = None
    reason: str | None = None  # the SampleError reason of an 'invalid' or 'error' card
    error: str | None = None
    global_prompt: str | None = None
    size: tuple[int, int] | None = None  # (width, height) of the full-size sample
    composite: str | None = None
    layers: list[LayerView] = field(default_factory=list)
    metadata: dict[str, Any] | None = None


_BADGE = {"ok": "valid", "invalid": "invalid", "error": "unreadable"}
THUMB_PX = 116  # the CSS --thumb: longest side of an image box on the page


def box_size(size: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) in CSS px of the box showing an image of `size` = (W, H): its aspect, longest side THUMB_PX."""
    if size is None or min(size) <= 0:
        return THUMB_PX, THUMB_PX
    w, h = size
    scale = THUMB_PX / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _box(classes: str, inner: str, size: tuple[int, int] | None) -> str:
    """An image box exactly the image's aspect (so a checkerboard behind it marks only transparent pixels)."""
    bw, bh = box_size(size)
    return f'<div class="imgbox{classes}" style="width:{bw}px;height:{bh}px">{inner}</div>'


def _img(src: str, alt: str, size: tuple[int, int] | None = None, pixelated: bool = False) -> str:
    cls = ' class="px"' if pixelated else ""
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return f'<img src="{esc(src)}" alt="{esc(alt)}"{dims}{cls} loading="lazy" decoding="async">'


def _layer_html(layer: LayerView) -> str:
    facts = []
    if layer.score is not None:
        facts.append(f"score {layer.score:.2f}")
    if layer.area_frac is not None:
        facts.append(f"area {layer.area_frac:.1%}")
    if layer.box is not None:
        facts.append("box " + ",".join(str(int(v)) for v in layer.box))
    image = _img(layer.image, f"layer {layer.index}", layer.size)
    boxes = _box(" checker" if layer.index else "", image, layer.size)
    if layer.mask is not None:
        boxes += _box(" mask", _img(layer.mask, f"mask {layer.index}", layer.size, pixelated=True), layer.size)
    facts_html = f'<span class="facts">{esc(" · ".join(facts))}</span>' if facts else ""
    kind = "fg" if layer.index else "bg"
    return (
        f'<figure class="layer {kind}">{boxes}<figcaption><span class="idx">{layer.index}</span>'
        f'<span class="prompt layer-prompt">{esc(layer.prompt)}</span>{facts_html}</figcaption></figure>'
    )


def card_html(card: CardView) -> str:
    """One `<article class="card …">` for the gallery."""
    head = [f'<span class="num">#{card.number}</span>']
    if card.key is not None:
        head.append(f'<code class="key">{esc(card.key)}</code>')
    head.append(f'<span class="badge {esc(card.status)}">{esc(_BADGE.get(card.status, card.status))}</span>')
    where = [card.shard]
    if card.size is not None:
        where.append(f"{card.size[0]}×{card.size[1]}")
    if card.layers:
        where.append(f"{len(card.layers)} layers")
    head.append(f'<span class="where">{esc(" · ".join(where))}</span>')
    parts = [f"<header>{''.join(head)}</header>"]
    if card.error:
        parts.append(f'<p class="errmsg">{esc(card.error)}</p>')
    if card.global_prompt is not None:
        parts.append(
            f'<p class="global"><span class="label">global</span>'
            f'<span class="prompt global-prompt">{esc(card.global_prompt)}</span></p>'
        )
    figures = []
    if card.composite is not None:
        figures.append(
            f'<figure class="composite">{_box("", _img(card.composite, "composite", card.size), card.size)}'
            f"<figcaption>composite</figcaption></figure>"
        )
    figures += [_layer_html(layer) for layer in card.layers]
    if figures:
        parts.append(f'<div class="layers">{"".join(figures)}</div>')
    if card.metadata is not None:
        meta = json.dumps(card.metadata, indent=2, ensure_ascii=False, sort_keys=True)
        parts.append(f"<details><summary>metadata</summary><pre>{esc(meta)}</pre></details>")
    status = esc(card.status)
    return f'<article class="card {status}" id="s{card.number:06d}" data-status="{status}">{"".join(parts)}</article>'


def document(title: str, body: str) -> str:
    """A complete standalone HTML page (inline CSS, CSP forbidding scripts and network)."""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(title)}</title><link rel="icon" href="data:,"><style>{CSS}</style></head>\n'
        f"<body>\n{body}\n</body></html>\n"
    )


def page_name(page: int) -> str:
    """1-based gallery page number → file name."""
    return f"page-{page:04d}.html"


def _nav(page: int, has_next: bool) -> str:
    prev = '<span class="off">← prev</span>'
    nxt = '<span class="off">next →</span>'
    if page > 1:
        prev = f'<a href="{page_name(page - 1)}" rel="prev">← prev</a>'
    if has_next:
        nxt = f'<a href="{page_name(page + 1)}" rel="next">next →</a>'
    return f'<nav><a href="index.html">index</a>{prev}<span class="here">page {page}</span>{nxt}</nav>'


def gallery_page(title: str, page: int, has_next: bool, cards_html: list[str], first: int) -> str:
    """One gallery page holding `cards_html` (already rendered); `first` is the number of its first card."""
    last = first + len(cards_html) - 1
    legend = (
        f"samples {first}–{last} · foreground layers over a checkerboard (checker = transparent), their masks "
        "below (white = object) · layer 0 is the inpainted background"
    )
    nav = _nav(page, has_next)
    top = f'<header class="top"><h1>{esc(title)}</h1>{nav}<div class="legend">{esc(legend)}</div></header>'
    body = f'{top}<main><div class="grid">{"".join(cards_html)}</div></main><footer class="nav">{nav}</footer>'
    return document(f"{title} — page {page}", body)


def _bars(rows: list[tuple[str, int]], total: int, head: tuple[str, str]) -> str:
    if not rows:
        return '<p class="empty">none</p>'
    out = [f"<table><tr><th>{esc(head[0])}</th><th>{esc(head[1])}</th><th>share</th><th></th></tr>"]
    for label, count in rows:
        frac = count / total if total else 0.0
        out.append(
            f"<tr><td>{esc(label)}</td><td class=n>{count}</td><td class=n>{frac:.1%}</td>"
            f'<td class="barcell"><span class="bar" style="width:{100 * frac:.1f}%"></span></td></tr>'
        )
    return "".join(out) + "</table>"


@dataclass
class DroppedView:
    """One input sample the pipeline dropped, from the outcomes parquet beside the shard."""

    key: str
    reason: str
    detail: str


@dataclass
class ShardRow:
    """One row of the index's shard table: the stats file's view and what the viewer itself read."""

    shard: ShardStats
    name: str  # unique among the shards shown (a parent folder is added when two share a file name)
    viewed: dict[str, int] = field(default_factory=dict)  # status ('ok'/'invalid'/'error') → cards shown
    reasons: dict[str, int] = field(default_factory=dict)  # reason → count among invalid/error cards
    read_by_viewer: bool = False
    dropped: tuple[list[DroppedView], int] | None = None  # (listed rows, total) from the outcomes file; None: none


def _dropped_section(rows: list[ShardRow]) -> str:
    """Per shard: the dropped input samples with their reasons (a collapsed table each)."""
    out = ["<h2>Dropped samples (from the outcomes files beside the shards)</h2>"]
    with_file = [(i, r) for i, r in enumerate(rows) if r.dropped is not None]
    if not with_file:
        return out[0] + '<p class="empty">no outcomes files (mlcid-NNNNNN.parquet) beside these shards</p>'
    for i, row in with_file:
        listed, total = row.dropped
        reasons = Counter(d.reason for d in listed)
        head = f"{esc(row.name)}: {total} dropped" + (
            " (" + ", ".join(f"{esc(k)}={v}" for k, v in sorted(reasons.items())) + ")" if reasons else "")
        if total > len(listed):
            head += f" — first {len(listed)} listed"
        body = "".join(f"<tr><td><code>{esc(d.key)}</code></td><td>{esc(d.reason)}</td><td>{esc(d.detail)}</td></tr>"
                       for d in listed)
        table = f"<table><tr><th>key</th><th>reason</th><th>detail</th></tr>{body}</table>" if listed else ""
        out.append(f'<details class="dropped" id="dropped-{i}"><summary>{head}</summary>{table}</details>')
    return "".join(out)


@dataclass
class PageLink:
    name: str
    first: int
    last: int


def index_page(title: str, summary: StatsSummary, rows: list[ShardRow], pages: list[PageLink], note: str = "") -> str:
    """The summary page: totals, dropped by reason, layer-count histogram, gallery pages, per-shard table."""
    rate = f"{summary.keep_rate:.1%}" if summary.keep_rate is not None else "n/a"
    totals = [
        ("shards", summary.shards),
        ("complete (stats file present)", summary.complete),
        ("incomplete (no stats file)", len(summary.incomplete)),
        ("unreadable stats file", len(summary.bad_stats)),
        ("read", summary.read),
        ("written (kept)", f"{summary.written} ({rate})"),
        ("dropped", summary.dropped_total),
    ]
    parts = [
        f'<header class="top"><h1>{esc(title)}</h1>'
        f'<nav><span class="here">index</span>'
        + (f'<a href="{esc(pages[0].name)}">gallery →</a>' if pages else "")
        + "</nav></header><main>"
    ]
    if note:
        parts.append(f'<p class="warn">{esc(note)}</p>')
    parts.append("<h2>Totals (from the shards' stats files)</h2><table id=totals>")
    parts += [f"<tr><th>{esc(k)}</th><td class=n>{esc(v)}</td></tr>" for k, v in totals]
    parts.append("</table>")
    if summary.inconsistent:
        parts.append(f'<p class="warn">{len(summary.inconsistent)} shard(s) with read ≠ written + dropped</p>')
    parts.append("<h2>Dropped by reason</h2>")
    parts.append(_bars(list(summary.dropped.items()), summary.read, ("reason", "count")))
    parts.append("<h2>Layers per written sample</h2>")
    lc_total = sum(summary.layer_counts.values())
    parts.append(_bars([(f"{k} layers", v) for k, v in summary.layer_counts.items()], lc_total, ("layers", "samples")))
    if summary.without_layer_counts:
        parts.append(f'<p class="warn">{summary.without_layer_counts} shard(s) record no layer counts</p>')
    parts.append("<h2>Gallery pages</h2>")
    if pages:
        items = [f'<li><a href="{esc(p.name)}">{esc(p.name)}</a> — samples {p.first}–{p.last}</li>' for p in pages]
        parts.append(f"<ol class=pages>{''.join(items)}</ol>")
    else:
        parts.append('<p class="empty">no samples shown</p>')
    parts.append(
        "<h2>Shards</h2><table id=shards><tr><th>shard</th><th>status</th><th>read</th><th>written</th>"
        "<th>dropped</th><th>shown: valid / invalid / unreadable</th><th>problems seen by the viewer</th></tr>"
    )
    for i, row in enumerate(rows):
        st, s = row.shard, row.shard.stats
        status = {"complete": "complete", "incomplete": "incomplete (no stats file)"}.get(st.status, "bad stats file")
        if st.error:
            status += f": {st.error}"
        nums = [s["read"], s["written"], sum(s["dropped"].values())] if s else ["–", "–", "–"]
        shown = (
            " / ".join(str(row.viewed.get(k, 0)) for k in ("ok", "invalid", "error"))
            if row.read_by_viewer
            else "not read (--max-samples)"
        )
        problems = ", ".join(f"{k}={v}" for k, v in sorted(row.reasons.items()))
        parts.append(
            f'<tr class="{esc(st.status)}"><td title="{esc(st.url)}">{esc(row.name)}</td>'
            f'<td class="status {esc(st.status)}">{esc(status)}</td>'
            + "".join(f"<td class=n>{esc(n)}</td>" for n in nums[:2])
            + (f'<td class=n><a href="#dropped-{i}">{esc(nums[2])}</a></td>' if row.dropped else
               f"<td class=n>{esc(nums[2])}</td>")
            + f"<td class=n>{esc(shown)}</td><td>{esc(problems)}</td></tr>"
        )
    parts.append("</table>")
    parts.append(_dropped_section(rows))
    parts.append("</main>")
    return document(f"{title} — summary", "".join(parts))
