"""The showcase's one self-contained HTML page: per example the composite, each layer inside its mask, and every
edit before → after with what it did. Images are the output folders' PNGs next to the page (relative links); every
text is escaped (`html.escape`)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from model.sampling.export import COMPOSITE_FILE, ORA_FILE, PSD_FILE, load_output, layer_file, mask_file

PAGE = "index.html"
STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:72em}
figure{display:inline-block;margin:0 .6em .6em 0;vertical-align:top;text-align:center}
figcaption{font-size:.8em;max-width:10em;overflow-wrap:anywhere}
img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc}
.layer{background:repeating-conic-gradient(#ddd 0 25%,#fff 0 50%) 0 0/16px 16px}
.edit{border-top:1px solid #eee;padding-top:.5em;margin-top:.5em}
.arrow{display:inline-block;font-size:2em;vertical-align:top;margin:1.4em .3em 0 0}
.note{color:#555;font-size:.9em}"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(src: Path, page_dir: Path, caption: str, css: str = "") -> str:
    rel = src.relative_to(page_dir).as_posix()
    cls = f' class="{_e(css)}"' if css else ""
    return (f'<figure><img{cls} src="{_e(rel)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption>'
            "</figure>")


def _layers(folder: Path, page_dir: Path) -> str:
    """Each layer as RGBA (its mask as alpha, over a checkerboard) and its mask."""
    doc = load_output(folder).document
    parts = []
    for entry in doc["layers"]:
        i = entry["index"]
        parts.append(_img(folder / layer_file(i), page_dir, f"layer {i}: {entry['prompt']}", "layer"))
        parts.append(_img(folder / mask_file(i), page_dir, f"mask {i} ({entry['area_frac']:.0%} of the image)"))
    return "".join(parts)


def _downloads(folder: Path, page_dir: Path) -> str:
    links = [f'<a href="{_e((folder / name).relative_to(page_dir).as_posix())}">{_e(name)}</a>'
             for name in (PSD_FILE, ORA_FILE, "layers.json") if (folder / name).exists()]
    return f'<p class="note">layered files: {" · ".join(links)}</p>'


def write_page(out: Path, examples: list, title: str, settings: str) -> Path:
    """OUT/index.html over the examples (`showcase.Example`: scene, sample folder, edits); returns its path."""
    out = Path(out)
    body = [f"<h1>{_e(title)}</h1>", f'<p class="note">{_e(settings)}</p>']
    for n, ex in enumerate(examples):
        doc = load_output(ex.folder).document
        body.append(f"<section><h2>Example {n + 1}: {_e(doc['global_prompt'])}</h2>")
        body.append(f'<p class="note">layer prompts (back to front): '
                    f'{_e(" | ".join(e["prompt"] for e in doc["layers"]))}</p>')
        body.append(_img(ex.folder / COMPOSITE_FILE, out, "composite") + _layers(ex.folder, out))
        body.append(_downloads(ex.folder, out))
        for edit in ex.edits:
            body.append(f'<div class="edit"><h3>{_e(edit.name)}</h3><p>{_e(edit.caption)}</p>')
            body.append(_img(ex.folder / COMPOSITE_FILE, out, "before") + '<span class="arrow">→</span>'
                        + _img(edit.folder / COMPOSITE_FILE, out, "after") + _layers(edit.folder, out))
            body.append(_downloads(edit.folder, out) + "</div>")
        body.append("</section>")
    page = out / PAGE
    page.write_text(f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
                    f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n",
                    encoding="utf-8")
    return page
