"""The viewer's pages in real headless Chromium: no console errors, right card counts, no script from prompts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tests.builders import make_sample, write_outcomes, write_shard

from mlcid.view import ViewConfig, build_view

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EVIL = "<script>document.title='pwned';window.pwned=1</script><img src=x onerror=\"window.pwned=2\"> a cat"
TITLE = "browser check"


def _chromium() -> str | None:
    for path in (os.environ.get("CHROMIUM_BIN"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set CHROMIUM_BIN)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=60_000)
        yield b
        b.close()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """One complete shard of 5 samples (one with a hostile prompt) and one shard without stats (2 samples)."""
    root = tmp_path_factory.mktemp("browser")
    samples = [make_sample(f"k{i:03d}", n_fg=1 + i % 3, seed=i) for i in range(5)]
    samples[1] = make_sample("k001", n_fg=2, prompt=EVIL)
    samples[1].layers[2].prompt = EVIL
    write_shard(root / "shards", samples, 0, {"no_foreground": 2})
    write_shard(root / "shards", [make_sample(f"m{i:03d}", seed=9 + i) for i in range(2)], 1)
    (root / "shards" / "mlcid-000001_stats.json").unlink()
    build_view(str(root / "shards"), root / "view", ViewConfig(per_page=3, title=TITLE))
    return root / "view"


def _open(browser, path: Path):
    """Load a page; return it with the console errors, page errors and request URLs seen while loading."""
    page = browser.new_page(viewport={"width": 1400, "height": 5000})
    seen = {"console": [], "pageerror": [], "requests": []}
    page.on("console", lambda m: seen["console"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["pageerror"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    return page, seen


def _check_clean(page, seen) -> None:
    assert seen["console"] == [] and seen["pageerror"] == []
    assert all(u.startswith(("file://", "data:")) for u in seen["requests"]), seen["requests"]
    assert page.evaluate("() => window.pwned === undefined")
    assert "pwned" not in page.title()


def test_index_page(browser, gallery: Path) -> None:
    page, seen = _open(browser, gallery / "index.html")
    _check_clean(page, seen)
    assert page.title() == f"{TITLE} — summary"
    assert page.locator("article.card").count() == 0
    assert page.locator("#shards tr.incomplete").count() == 1 and page.locator("#shards tr.complete").count() == 1
    assert page.locator("ol.pages li").count() == 3  # 7 samples, 3 per page
    page.close()


def test_gallery_pages(browser, gallery: Path) -> None:
    page, seen = _open(browser, gallery / "page-0001.html")
    _check_clean(page, seen)
    assert page.title() == f"{TITLE} — page 1"
    assert page.locator("article.card").count() == 3
    # the hostile prompt is shown as text (global and layer), and none of its markup became elements
    assert page.locator(".global-prompt").nth(1).text_content() == EVIL
    assert EVIL in page.locator(".layer-prompt").all_text_contents()
    assert page.locator("article.card script, article.card img[src='x']").count() == 0
    # every image file loaded; foregrounds sit on a checkerboard
    assert page.evaluate("() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    # composite + background + (foreground + mask) per foreground, for samples with 1, 2 and 3 foregrounds
    assert page.locator("img").count() == sum(2 + 2 * n for n in (1, 2, 3))
    bg = page.locator(".imgbox.checker").first.evaluate("e => getComputedStyle(e).backgroundImage")
    assert "conic-gradient" in bg
    # next → page 2 (3 cards), next → page 3 (the last: 1 card, no next link)
    page.get_by_role("link", name="next →").first.click()
    page.wait_for_load_state("load")
    assert page.url.endswith("page-0002.html") and page.locator("article.card").count() == 3
    page.close()
    last, seen = _open(browser, gallery / "page-0003.html")
    _check_clean(last, seen)
    assert last.locator("article.card").count() == 1
    assert last.get_by_role("link", name="next →").count() == 0
    last.close()


@pytest.fixture(scope="module")
def wide_gallery(tmp_path_factory) -> Path:
    """A 48 × 32 sample in a shard whose outcomes file lists a dropped input with a hostile detail."""
    root = tmp_path_factory.mktemp("wide")
    shard = write_shard(root / "shards", [make_sample("w0", size=32, width=48, n_fg=2)], 0, {"mask_area": 1})
    write_outcomes(shard, [("w0", True, None, None), ("gone", False, "mask_area", EVIL)])
    build_view(str(shard), root / "view", ViewConfig(title=TITLE))
    return root / "view"


def test_non_square_and_dropped_list(browser, wide_gallery: Path) -> None:
    page, seen = _open(browser, wide_gallery / "page-0001.html")
    _check_clean(page, seen)
    # every box and every image in it is drawn at the sample's 3:2 aspect (the checker marks only transparency)
    for kind in ("img", ".imgbox"):
        sizes = page.locator(f"article.card {kind}").evaluate_all(
            "els => els.map(e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height])")
        assert len(sizes) == 6 and all(abs(w / h - 1.5) < 0.03 for w, h in sizes), sizes
    page.close()
    index, seen = _open(browser, wide_gallery / "index.html")
    _check_clean(index, seen)
    index.locator("details.dropped summary").first.click()
    assert index.locator("details.dropped tr td").nth(2).text_content() == EVIL  # shown as text, not markup
    assert index.locator("details.dropped img[src='x'], details.dropped script").count() == 0
    index.close()
