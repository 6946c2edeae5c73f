"""Shard viewer and stats summary: pages, escaping, stats numbers, incomplete and broken shards."""

from __future__ import annotations

import html
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mlcid.schema import BACKGROUND_PROMPT, LayerInfo, MLCIDSample
from mlcid.stats import ShardStats, format_summary, load_shard_stats, stats_url_for, summarize, summarize_dicts
from mlcid.view import ViewConfig, build_view
from cli.main import mlcid_main
from mlcid.writer import ShardWriter, shard_name, stats_name
from tests.builders import make_sample, write_outcomes, write_shard

XSS = "<script>document.title='pwned'</script> a \"red\" <b>cat</b> & 'dog'"
SIZE = 48


def card_count(page: str) -> int:
    return len(re.findall(r'<article class="card ', page))


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """Two complete shards (5 + 3 samples, the second with an XSS prompt) and one without stats."""
    d = tmp_path / "shards"
    write_shard(d, [make_sample(f"a{i:03d}", n_fg=1 + i % 3, seed=i) for i in range(5)], 0, {"no_foreground": 4})
    samples = [make_sample(f"b{i:03d}", n_fg=2, seed=10 + i) for i in range(3)]
    samples[1] = make_sample("b001", n_fg=1, prompt=XSS)
    samples[1].layers[1].prompt = XSS
    write_shard(d, samples, 1, {"no_foreground": 1, "mask_area": 2})
    write_shard(d, [make_sample(f"c{i:03d}", n_fg=3, seed=20 + i) for i in range(2)], 2)
    (d / stats_name(2)).unlink()  # shard 2 looks unfinished
    return d


def test_pages_and_cards(shards: Path, tmp_path: Path) -> None:
    result = build_view(str(shards), tmp_path / "view", ViewConfig(per_page=3))
    assert result.cards == 10 and result.status_counts == {"ok": 10}
    assert [p.name for p in result.pages] == ["page-0001.html", "page-0002.html", "page-0003.html", "page-0004.html"]
    pages = [p.read_text() for p in result.pages]
    assert [card_count(p) for p in pages] == [3, 3, 3, 1]
    # prev/next links: none before the first page, none after the last
    assert 'rel="prev"' not in pages[0] and 'href="page-0002.html" rel="next"' in pages[0]
    assert 'href="page-0003.html" rel="prev"' in pages[3] and 'rel="next"' not in pages[3]
    # images are files next to the HTML, never data URIs; every referenced file exists
    srcs = re.findall(r'<img src="([^"]+)"', "".join(pages))
    assert srcs and not any(s.startswith("data:") for s in srcs)
    assert all((tmp_path / "view" / s).is_file() for s in srcs)
    # one sample with 3 foregrounds: composite + 4 layers + 3 masks
    assert len(re.findall(r'<img src="img/p0004/000010-', pages[3])) == 8
    # foregrounds keep their alpha (RGBA PNG), thumbnails respect --thumb-size
    from PIL import Image

    fg = Image.open(tmp_path / "view" / "img/p0001/000001-layer01.png")
    assert fg.mode == "RGBA" and fg.size == (SIZE, SIZE)
    small = build_view(str(shards), tmp_path / "small", ViewConfig(thumb_size=16, max_samples=1))
    assert Image.open(small.out_dir / "img/p0001/000001-composite.jpg").size == (16, 16)


def test_prompt_is_escaped(shards: Path, tmp_path: Path) -> None:
    result = build_view(str(shards), tmp_path / "view", ViewConfig(per_page=50))
    page = result.pages[0].read_text()
    assert "<script>" not in page and "<b>cat</b>" not in page
    escaped = html.escape(XSS, quote=True)
    assert page.count(escaped) >= 2  # global prompt and layer prompt
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    # the metadata JSON is escaped too
    assert "&quot;global_prompt&quot;" in page


def test_page_count_with_max_samples(shards: Path, tmp_path: Path) -> None:
    result = build_view(str(shards), tmp_path / "view", ViewConfig(per_page=4, max_samples=6))
    assert result.cards == 6 and len(result.pages) == 2
    index = result.index.read_text()
    assert "--max-samples 6" in index and "not read (--max-samples)" in index  # shard 2 never reached
    exact = build_view(str(shards), tmp_path / "exact", ViewConfig(per_page=5))
    assert [card_count(p.read_text()) for p in exact.pages] == [5, 5]


def test_stats_summary_numbers(shards: Path) -> None:
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    summary = summarize(load_shard_stats(u) for u in urls)
    assert summary.shards == 3 and summary.complete == 2
    assert summary.incomplete == [urls[2]] and summary.bad_stats == [] and summary.inconsistent == []
    assert (summary.read, summary.written, summary.dropped_total) == (15, 8, 7)
    assert summary.dropped == {"no_foreground": 5, "mask_area": 2}  # most frequent first
    assert summary.layer_counts == {2: 3, 3: 4, 4: 1}  # shard 0: fg 1,2,3,1,2; shard 1: 2,1,2 foregrounds
    assert summary.keep_rate == pytest.approx(8 / 15)
    text = format_summary(summary)
    assert "read 15, written 8" in text and "no_foreground=5" in text and "incomplete (no stats file)" in text


def test_index_shows_stats_and_incomplete(shards: Path, tmp_path: Path) -> None:
    result = build_view(str(shards / "mlcid-{000000..000002}.tar"), tmp_path / "view")
    index = result.index.read_text()
    totals = dict(re.findall(r"<tr><th>([^<]+)</th><td class=n>([^<]+)</td></tr>", index))
    assert totals["read"] == "15" and totals["dropped"] == "7" and totals["incomplete (no stats file)"] == "1"
    assert totals["written (kept)"].startswith("8 ")
    rows = re.findall(r'<tr class="([a-z-]+)"><td title="[^"]*">([^<]+)</td>', index)
    assert rows == [("complete", shard_name(0)), ("complete", shard_name(1)), ("incomplete", shard_name(2))]
    assert "incomplete (no stats file)" in index
    assert "no_foreground" in index and "4 layers" in index
    assert card_count(index) == 0 and 'href="page-0001.html"' in index


def test_bad_stats_and_inconsistent() -> None:
    good = {"read": 5, "written": 3, "dropped": {"x": 2}, "layer_counts": {"2": 3}}
    off = {"read": 9, "written": 3, "dropped": {"x": 2}}
    summary = summarize([ShardStats("a.tar", good), ShardStats("b.tar", off), ShardStats("c.tar", error="bad json")])
    assert summary.bad_stats == ["c.tar"] and summary.inconsistent == ["b.tar"] and summary.without_layer_counts == 1
    assert summarize_dicts([good, good]).layer_counts == {2: 6}
    with pytest.raises(ValueError, match="dropped"):
        summarize_dicts([{"read": 1, "written": 1, "dropped": [1]}])
    with pytest.raises(ValueError, match=r"\.tar"):
        stats_url_for("data/shard.zip")


def test_prompt_sources_add_up_across_shards() -> None:
    a = {"read": 2, "written": 2, "dropped": {}, "prompt_sources": {"global_caption": 2, "layer_label": 3}}
    b = {"read": 1, "written": 1, "dropped": {}, "prompt_sources": {"global_alt_text": 1, "layer_label": 1}}
    summary = summarize_dicts([a, b, {"read": 0, "written": 0, "dropped": {}}])  # older stats have none
    assert summary.prompt_sources == {"layer_label": 4, "global_caption": 2, "global_alt_text": 1}
    assert summary.to_json()["prompt_sources"] == summary.prompt_sources
    assert "prompt sources: layer_label=4, global_caption=2, global_alt_text=1" in format_summary(summary)


def test_malformed_stats_file(tmp_path: Path) -> None:
    url = write_shard(tmp_path, [make_sample("k0")], 0)
    Path(stats_url_for(str(url))).write_text("{not json")
    st = load_shard_stats(str(url))
    assert st.status == "bad-stats" and "stats.json" in st.error
    result = build_view(str(url), tmp_path / "view")
    assert "bad stats file" in result.index.read_text() and result.cards == 1


def test_invalid_and_broken_samples_are_shown(tmp_path: Path) -> None:
    """An invariant-breaking sample gets an 'invalid' card; undecodable members an 'error' card; no crash."""
    good = make_sample("good")
    members = {}
    from mlcid.codec import encode_sample

    bad = make_sample("overlap", n_fg=2)
    bad.masks[1][:, :] = 0
    bad.masks[1][6:26, 4:16] = 255  # same place as mask 1 → overlap
    for s in (good, bad):
        members.update({f"{s.key}.{k}": v for k, v in encode_sample(s).items()})
    members["junk.json"] = b'{"schema": "mlcid/1", "layers": [{"prompt": "the background"}]}'
    members["junk.composite.jpg"] = b"not a jpeg"
    members["junk.layer00.png"] = b"not a png"
    tar_path = tmp_path / "mixed-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = build_view(str(tar_path), tmp_path / "view")
    assert result.status_counts == {"ok": 1, "invalid": 1, "error": 1}
    assert result.reasons == {"mask_overlap": 1, "undecodable_image": 1}
    page = result.pages[0].read_text()
    assert page.count('data-status="invalid"') == 1 and page.count('data-status="error"') == 1
    assert "mask_overlap" in page and "undecodable_image: " + str(tar_path) + ":junk: " in page
    index = result.index.read_text()
    assert "incomplete" in index and "mask_overlap=1" in index


def test_out_dir_safety_and_rebuild(shards: Path, tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        build_view(str(shards), other)
    assert (other / "todo.txt").read_text() == "keep me"
    out = tmp_path / "view"
    build_view(str(shards), out, ViewConfig(per_page=2))
    assert (out / "page-0005.html").exists()
    build_view(str(shards), out, ViewConfig(per_page=5))  # a rebuild removes the stale pages
    assert sorted(p.name for p in out.glob("page-*.html")) == ["page-0001.html", "page-0002.html"]
    with pytest.raises(ValueError, match="per_page"):
        ViewConfig(per_page=0)


def test_cli(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert mlcid_main(["view", str(shards / "mlcid-{000000..000001}.tar"), "--out", str(out), "--per-page", "4"]) == 0
    assert "8 samples (ok=8) on 2 page(s)" in capsys.readouterr().out
    assert (out / "index.html").exists() and (out / "page-0002.html").exists()
    assert mlcid_main(["view", str(shards), "--out", str(out), "--per-page", "0"]) == 2
    assert "mlcid view: error: per_page" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not found: .*nothing-1.tar"):
        build_view(str(tmp_path / "nothing-{0..1}.tar"), out)
    assert mlcid_main(["stats", str(shards), "--json"]) == 1  # one shard is incomplete
    assert json.loads(capsys.readouterr().out)["written"] == 8


def test_fsspec_urls(shards: Path, tmp_path: Path) -> None:
    """Shards and stats read through fsspec (memory://), like s3:// or gs:// in production."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in (shard_name(0), stats_name(0), shard_name(2)):  # shard 2 has no stats file
        fs.pipe(f"/viewtest/{name}", (shards / name).read_bytes())
    try:
        urls = f"memory://viewtest/{shard_name(0)} memory://viewtest/{shard_name(2)}"
        result = build_view(urls, tmp_path / "view", ViewConfig(per_page=50))
        assert result.cards == 7 and result.summary.complete == 1 and len(result.summary.incomplete) == 1
        assert result.summary.written == 5 and result.summary.dropped == {"no_foreground": 4}
    finally:
        fs.rm("/viewtest", recursive=True)


def test_truncated_shard_is_counted_not_fatal(shards: Path, tmp_path: Path) -> None:
    data = (shards / shard_name(0)).read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(data[: len(data) // 2])
    result = build_view([str(cut), str(shards / shard_name(1))], tmp_path / "view")
    assert result.status_counts["error"] == 1  # the sample cut in half (how the reader names it depends on the cut)
    assert set(result.reasons) <= {"truncated_shard", "missing_member", "undecodable_image"}
    assert result.status_counts["ok"] >= 3  # the samples before the cut, and all of the next shard


def test_dropped_samples_listed_per_shard(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    s0 = write_shard(d, [make_sample("k0"), make_sample("k1")], 0, {"no_foreground": 2, "mask_area": 1})
    write_outcomes(s0, [("k0", True, None, None), ("r1", False, "no_foreground", "no box above 0.1"),
                        ("r2", False, "no_foreground", None), ("k1", True, None, None),
                        ("r3", False, "mask_area", XSS)])
    s1 = write_shard(d, [make_sample("k2")], 1)  # no outcomes file
    s2 = write_shard(d, [make_sample("k3")], 2)
    s2.with_suffix(".parquet").write_bytes(b"not parquet")
    index = build_view([str(s0), str(s1), str(s2)], tmp_path / "view").index.read_text()
    section = index[index.index("Dropped samples"):]
    assert "mlcid-000000.tar: 3 dropped (mask_area=1, no_foreground=2)" in section
    listed = re.findall(r"<tr><td><code>([^<]*)</code></td><td>([^<]*)</td><td>([^<]*)</td></tr>", section)
    assert listed[:3] == [("r1", "no_foreground", "no box above 0.1"), ("r2", "no_foreground", ""),
                          ("r3", "mask_area", html.escape(XSS, quote=True))]
    assert "<script>" not in index and "mlcid-000001.tar" not in section  # no file, no entry
    assert "mlcid-000002.tar: 1 dropped (unreadable_outcomes=1)" in section
    assert '<a href="#dropped-0">3</a>' in index and 'id="dropped-0"' in section  # the shard table links the list


def test_same_shard_name_in_two_folders(tmp_path: Path) -> None:
    a = write_shard(tmp_path / "run-a" / "out", [make_sample("a0")])
    b = write_shard(tmp_path / "run-b" / "out", [make_sample("b0")])
    result = build_view([str(a), str(b)], tmp_path / "view")
    index = result.index.read_text()
    rows = re.findall(r'<tr class="complete"><td title="[^"]*">([^<]+)</td>', index)
    assert rows == ["run-a/out/mlcid-000000.tar", "run-b/out/mlcid-000000.tar"]
    page = result.pages[0].read_text()
    assert "run-a/out/mlcid-000000.tar · 48×48" in page and "run-b/out/mlcid-000000.tar · 48×48" in page
    from mlcid.view import display_names

    assert display_names(["x/s.tar", "y/s.tar", "y/t.tar"]) == ["x/s.tar", "y/s.tar", "t.tar"]
    assert display_names(["s.tar", "s.tar"]) == ["s.tar", "s.tar"]  # the same URL twice stays as given


def test_non_square_images_keep_their_aspect(tmp_path: Path) -> None:
    from PIL import Image

    wide = make_sample("wide", size=32, width=48, n_fg=2)  # 48 × 32
    shard = write_shard(tmp_path / "shards", [wide])
    result = build_view(str(shard), tmp_path / "view", ViewConfig(thumb_size=24))
    page = result.pages[0].read_text()
    assert Image.open(result.out_dir / "img/p0001/000001-layer01.png").size == (24, 16)
    boxes = re.findall(r'<div class="imgbox[^"]*" style="width:(\d+)px;height:(\d+)px"><img [^>]*width="48" '
                       r'height="32"', page)
    assert len(boxes) == 1 + 1 + 2 * 2 and set(boxes) == {("116", "77")}  # composite, background, 2 × (fg, mask)
