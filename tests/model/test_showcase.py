"""model.sampling.showcase / `layerdiff showcase`: prompts in the model's vocabulary and caption style, every
application run and exported, one HTML page with every text escaped and every image present."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from model.sampling.showcase import Scene, Vocabulary, random_scenes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prompts_use_the_vocabulary_and_the_caption_templates():
    voc = Vocabulary(holdout_pairs=(("red", "circle"),))
    scenes = random_scenes(voc, 6, seed=0)
    assert [len(s.objects) for s in scenes] == [1, 2] * 3
    for s in scenes:
        assert all(p in voc.pairs() for p in s.objects) and ("red", "circle") not in s.objects
        assert s.background not in {c for c, _ in s.objects}
    s = Scene((("blue", "square"), ("red", "circle")), "cyan", "stripes", template=0)
    assert s.layer_prompts == ["the background", "a blue square", "a red circle"]
    assert s.global_prompt == "a red circle and a blue square on a striped cyan background"


def test_showcase_page_shows_every_application(tmp_path, monkeypatch):
    from cli.main import layerdiff_main
    from model.sampling import showcase as S
    from tests.builders import make_run

    run = make_run(tmp_path / "m", max_layers=4)
    monkeypatch.setattr(S.Scene, "global_prompt", property(lambda self: "<b>a red circle</b> & co"))
    out = tmp_path / "show"
    assert layerdiff_main(["showcase", "--model", str(run), "--out", str(out), "--examples", "2", "--steps", "2"]) == 0
    page = (out / "index.html").read_text()
    assert "<b>" not in page and "&lt;b&gt;a red circle&lt;/b&gt; &amp; co" in page  # escaped
    for i in range(2):
        for app in ("sample", "inpaint", "style", "iterative"):
            folder = out / f"example{i:02d}" / app
            assert (folder / "layers.psd").is_file() and (folder / "layers.ora").is_file()
            assert f'src="example{i:02d}/{app}/composite.png"' in page
    for src in re.findall(r'src="([^"]+)"', page):
        assert (out / src).is_file(), src
    assert page.count("<h3>") == 6 and "strength 0.8" in page
    from model.sampling.export import load_layers

    assert load_layers(out / "example00" / "iterative").num_layers == load_layers(out / "example00" / "sample").num_layers + 1


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    from cli.main import layerdiff_main

    assert layerdiff_main(["showcase", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no model at" in capsys.readouterr().err
