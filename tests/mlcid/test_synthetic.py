"""Synthetic layered scenes: determinism, exact Eq. 4, occlusions, vocabulary control, shard layouts, CLI."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from mlcid.composite import composite
from mlcid.reader import iter_shard_samples
from mlcid.schema import BACKGROUND_PROMPT
from cli.main import mlcid_main
from mlcid.synthetic import (
    BACKGROUND_PATTERNS,
    COLOURS,
    SHAPES,
    SceneConfig,
    default_mlcid_out,
    make_scene,
    shard_ranges,
    write_dataset,
)
from mlcid.synthetic_shapes import PlacedShape, dilate, paint_layers, visible_masks
from mlcid.shard_check import validate_shard
from mlcid.validate import ValidationConfig, validate_sample
from mlcid.writer import read_stats

SMALL = SceneConfig(size=64)


def _arrays(sample) -> list[np.ndarray]:
    return [sample.composite, sample.background, *sample.foregrounds, *sample.masks]


def test_vocabulary_is_large_and_colours_are_distinct():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 6 and len(BACKGROUND_PATTERNS) >= 4
    rgb = np.array(list(COLOURS.values()), float)
    dists = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert dists.min() > 60, "object colours too close for a dominant-colour classifier"


def test_same_seed_same_arrays_other_seed_differs():
    for index in range(5):
        a, b = make_scene(SMALL, 7, index), make_scene(SMALL, 7, index)
        assert all(x.tobytes() == y.tobytes() for x, y in zip(_arrays(a), _arrays(b), strict=True))
        assert a.metadata() == b.metadata()
    assert make_scene(SMALL, 7, 0).composite.tobytes() != make_scene(SMALL, 8, 0).composite.tobytes()
    assert make_scene(SMALL, 7, 0).composite.tobytes() != make_scene(SMALL, 7, 1).composite.tobytes()


def test_a_scene_regenerates_from_its_own_metadata():
    cfg = SceneConfig(size=64, holdout_pairs=[["red", "circle"]], count_weights=[1, 2, 3])
    s = make_scene(cfg, 11, 42)
    again = SceneConfig.from_json(json.loads(json.dumps(s.pipeline["config"])))
    assert again == cfg and hash(again) == hash(cfg)
    t = make_scene(again, s.source["seed"], s.source["index"])
    assert all(x.tobytes() == y.tobytes() for x, y in zip(_arrays(s), _arrays(t), strict=True))
    with pytest.raises(ValueError, match="unknown SceneConfig keys"):
        SceneConfig.from_json({"size": 64, "colour": "red"})


def test_scenes_are_valid_and_eq4_is_exact():
    counts = set()
    for index in range(60):
        s = make_scene(SMALL, 1, index)
        validate_sample(s)
        counts.add(len(s.foregrounds))
        assert np.array_equal(composite(s.background, s.foregrounds, s.masks), s.composite)
        for i, (fg, m) in enumerate(zip(s.foregrounds, s.masks), start=1):
            vis = m == 255
            # alpha = the 5×5-dilated visible mask (cross-checked with PIL's max filter), fill outside it
            pil_dilated = np.asarray(Image.fromarray(m).filter(ImageFilter.MaxFilter(5))) == 255
            assert np.array_equal(fg[..., 3] == 255, pil_dilated)
            assert set(np.unique(fg[..., 3])) <= {0, 255}
            assert (fg[..., :3][fg[..., 3] == 0] == 0).all()
            # metadata describes the visible mask
            ys, xs = np.nonzero(vis)
            assert s.layers[i].box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert s.layers[i].area_frac == pytest.approx(vis.mean())
    assert counts == {1, 2, 3}


def test_layer_counts_follow_the_weights():
    cfg = SceneConfig(size=64, count_weights=(1.0, 1.0, 2.0))
    counts = np.bincount([len(make_scene(cfg, 6, i).foregrounds) for i in range(200)], minlength=4)[1:]
    assert abs(counts[2] / 200 - 0.5) < 0.1 and abs(counts[0] / 200 - 0.25) < 0.08, counts
    two = SceneConfig(size=64, min_foregrounds=2, max_foregrounds=2)
    assert {len(make_scene(two, 6, i).masks) for i in range(10)} == {2}


def test_occlusions_really_happen():
    occluded = 0
    for index in range(40):
        s = make_scene(SMALL, 2, index)
        for obj in s.source["objects"]:
            if obj["occluded_by"]:
                assert obj["full_area_frac"] >= obj["area_frac"]
                occluded += obj["full_area_frac"] > obj["area_frac"] + 1e-9
    assert occluded >= 10, f"only {occluded} partly hidden objects in 40 scenes"


def test_hidden_part_of_a_layer_holds_the_objects_own_colour():
    size = 64
    back = PlacedShape("red", "square", (26.0, 32.0), 16.0, 0.0, 0.0)
    front = PlacedShape("blue", "circle", (42.0, 32.0), 14.0, 0.0, 0.0)
    shapes = [back.mask(size), front.mask(size)]
    visible = visible_masks(shapes)
    bg = np.full((size, size, 3), 250, np.uint8)
    image, fgs, masks = paint_layers(bg, [back, front], shapes, visible, shade=0.0, dilation=5, fill=(0, 0, 0))
    hidden = shapes[0] & ~visible[0]
    assert hidden.any() and not (visible[0] & visible[1]).any()
    in_alpha_hidden = hidden & (fgs[0][..., 3] == 255)  # the ring of the back layer that reaches under the circle
    assert in_alpha_hidden.any()
    assert (fgs[0][in_alpha_hidden][:, :3] == COLOURS["red"]).all()  # its own red, not the blue on top
    assert (image[in_alpha_hidden] == COLOURS["blue"]).all()
    ring_outside = (fgs[0][..., 3] == 255) & ~shapes[0]  # dilated ring beyond the square: the composite's pixels
    assert ring_outside.any() and (fgs[0][ring_outside][:, :3] == image[ring_outside]).all()
    assert np.array_equal(composite(bg, fgs, masks), image)


def test_object_colour_is_recoverable_from_the_composite():
    names, table = list(COLOURS), np.array(list(COLOURS.values()), float)
    for index in range(30):
        s = make_scene(SMALL, 3, index)
        for obj, m in zip(s.source["objects"], s.masks):
            mean = s.composite[m == 255].astype(float).mean(axis=0)
            assert names[int(np.linalg.norm(table - mean, axis=1).argmin())] == obj["colour"]


def test_prompts_follow_the_templates():
    for index in range(40):
        s = make_scene(SMALL, 4, index)
        assert s.layers[0].prompt == BACKGROUND_PROMPT
        objs, bg = s.source["objects"], s.source["background"]
        expected = [("an " if o["colour"][0] in "aeiou" else "a ") + f"{o['colour']} {o['shape']}" for o in objs]
        assert [layer.prompt for layer in s.layers[1:]] == expected
        for layer in s.layers[1:]:
            assert layer.prompt in s.global_prompt
        assert not re.search(r"\ba [aeiou]", s.global_prompt), s.global_prompt  # "an orange", not "a orange"
        assert f"{BACKGROUND_PATTERNS[bg['pattern']]} {bg['colour']} background" in s.global_prompt
        if len(objs) == 2 and objs[0]["occluded_by"] == [2]:
            assert f"{s.layers[2].prompt} in front of {s.layers[1].prompt}" in s.global_prompt


def test_holdout_and_allowed_pairs():
    holdout = (("red", "circle"), ("blue", "square"), ("green", "star"))
    cfg = SceneConfig(size=64, holdout_pairs=holdout)
    seen = {(o["colour"], o["shape"]) for i in range(150) for o in make_scene(cfg, 5, i).source["objects"]}
    assert not seen & set(holdout)
    assert len(seen) > 20
    allowed = (("red", "circle"), ("blue", "square"), ("green", "star"), ("yellow", "cross"))
    cfg = SceneConfig(size=64, allowed_pairs=allowed, holdout_pairs=(("yellow", "cross"),))
    seen = {(o["colour"], o["shape"]) for i in range(40) for o in make_scene(cfg, 5, i).source["objects"]}
    assert seen == set(allowed[:3])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"colours": ("red", "mauve")}, "mauve"),
        ({"holdout_pairs": (("red", "blob"),)}, "blob"),
        ({"allowed_pairs": (("red", "circle"),), "holdout_pairs": (("red", "circle"),)}, "no (colour, shape)"),
        ({"allowed_pairs": (("red", "circle"), ("red", "star"))}, "distinct_colours"),
        ({"max_foregrounds": 4}, "max_layers"),
        ({"count_weights": (1.0, 2.0)}, "count_weights"),
        ({"dilation": 4}, "dilation"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        SceneConfig(**kwargs)


def test_impossible_layout_fails_loudly():
    cfg = SceneConfig(size=64, max_radius=0.13, validation=ValidationConfig(min_area_frac=0.5), max_attempts=5)
    with pytest.raises(RuntimeError, match="no valid layout"):
        make_scene(cfg, 0, 0)


def test_a_failed_shard_leaves_nothing_visible(tmp_path):
    cfg = SceneConfig(size=64, max_radius=0.13, validation=ValidationConfig(min_area_frac=0.5), max_attempts=3)
    with pytest.raises(RuntimeError, match="no valid layout"):
        write_dataset(tmp_path / "raw", tmp_path / "gt", 3, 0, 1, cfg, progress=False)
    assert [p.name for p in (tmp_path / "raw").iterdir()] == []
    assert [p.name for p in (tmp_path / "gt").iterdir()] == []


def test_dilate_matches_pil_max_filter():
    rng = np.random.default_rng(0)
    for _ in range(10):
        m = rng.random((40, 33)) > 0.97
        m[0, 5] = m[39, 32] = True  # touch the borders
        pil = np.asarray(Image.fromarray(np.where(m, 255, 0).astype(np.uint8)).filter(ImageFilter.MaxFilter(5))) > 0
        assert np.array_equal(dilate(m, 5), pil)
    assert not dilate(np.zeros((8, 8), bool)).any()


def test_shard_ranges():
    assert shard_ranges(10, 3) == [range(0, 4), range(4, 8), range(8, 10)]
    assert shard_ranges(5, 1) == [range(0, 5)]
    with pytest.raises(ValueError):
        shard_ranges(2, 3)
    with pytest.raises(ValueError, match="samples per shard"):
        shard_ranges(20_001, 2)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / max(((a.astype(float) - b) ** 2).mean(), 1e-12)))


def _raw_members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for info in tar:
            key, suffix = info.name.split(".", 1)
            out[key][suffix] = tar.extractfile(info).read()
    return out


def test_write_dataset_layouts(tmp_path):
    raw, gt = tmp_path / "raw", tmp_path / "gt"
    summary = write_dataset(raw, gt, samples=10, seed=3, shards=3, config=SMALL, progress=False)
    assert summary["samples"] == summary["written"] == 10 and summary["shard_ids"] == [0, 1, 2]
    sizes = [4, 4, 2]
    for shard, n in enumerate(sizes):
        # (a) raw img2dataset layout
        members = _raw_members(raw / f"{shard:05d}.tar")
        assert list(members) == [f"{shard:05d}{i:04d}" for i in range(n)]
        table = pq.read_table(raw / f"{shard:05d}.parquet").to_pylist()
        assert [row["key"] for row in table] == list(members)
        stats = json.loads((raw / f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == n and stats["status_dict"] == {"success": n}
        for key, m in members.items():
            assert set(m) == {"jpg", "txt", "json"}
            meta = json.loads(m["json"])
            assert meta["key"] == key and meta["status"] == "success" and meta["caption"] == m["txt"].decode()
            assert meta["url"].startswith("synthetic://3/") and (meta["width"], meta["height"]) == (64, 64)
            assert Image.open(io.BytesIO(m["jpg"])).size == (64, 64)
        # (b) ground-truth MLCID shards: all valid, same keys, Eq. 4 within JPEG error
        valid, bad = validate_shard(str(gt / f"mlcid-{shard:06d}.tar"))
        assert (valid, bad) == (n, {})
        gt_stats = read_stats(gt, shard)
        assert gt_stats["read"] == gt_stats["written"] == n and gt_stats["dropped"] == {}
        samples = list(iter_shard_samples(str(gt / f"mlcid-{shard:06d}.tar")))
        assert [s.key for s in samples] == list(members)
        for s in samples:
            assert s.global_prompt == members[s.key]["txt"].decode()
            assert s.source["shard"] == f"{shard:05d}.tar" and s.source["key"] == s.key
            # the PNG layers are exact; the JPEGs (raw 4:4:4, MLCID composite 4:2:0) stay close to Eq. 4
            exact = composite(s.background, s.foregrounds, s.masks).astype(float)
            raw_jpg = np.asarray(Image.open(io.BytesIO(members[s.key]["jpg"])).convert("RGB"))
            assert _psnr(exact, raw_jpg) > 33.0 and _psnr(exact, s.composite) > 22.0


def test_content_does_not_depend_on_shard_count_and_one_shard_regenerates_alone(tmp_path):
    write_dataset(tmp_path / "a", tmp_path / "a-gt", samples=7, seed=9, shards=1, config=SMALL, progress=False)
    write_dataset(tmp_path / "b", tmp_path / "b-gt", samples=7, seed=9, shards=3, config=SMALL, progress=False)

    def by_index(folder: Path) -> dict[int, list[bytes]]:
        out = {}
        for path in sorted(folder.glob("*.tar")):
            for s in iter_shard_samples(str(path)):
                out[s.source["index"]] = [x.tobytes() for x in [s.background, *s.foregrounds, *s.masks]]
        return out

    assert by_index(tmp_path / "a-gt") == by_index(tmp_path / "b-gt")
    assert len(by_index(tmp_path / "a-gt")) == 7
    summary = write_dataset(tmp_path / "c", tmp_path / "c-gt", 7, 9, 3, SMALL, shard_ids=[1], progress=False)
    assert summary["samples"] == 3 and sorted(p.name for p in (tmp_path / "c").glob("*.tar")) == ["00001.tar"]
    assert (tmp_path / "c" / "00001.tar").read_bytes() == (tmp_path / "b" / "00001.tar").read_bytes()


def test_worker_processes_write_the_same_shards(tmp_path):
    write_dataset(tmp_path / "one", tmp_path / "one-gt", 6, 4, 2, SMALL, processes=1, progress=False)
    summary = write_dataset(tmp_path / "two", tmp_path / "two-gt", 6, 4, 2, SMALL, processes=2, progress=False)
    assert summary["written"] == 6
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def _synthetic_cli(argv: list[str]) -> int:
    """Exit code of `mlcid synthetic ARGV` (argparse exits, the command returns)."""
    try:
        return mlcid_main(["synthetic", *argv])
    except SystemExit as exc:
        return exc.code


def test_cli_help(capsys):
    assert _synthetic_cli(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--samples", "--seed", "--mlcid-out", "--shards", "--size", "--holdout"):
        assert flag in text


def test_cli_small_run(tmp_path, capsys):
    raw = tmp_path / "scenes"
    code = _synthetic_cli(["--out", str(raw), "--samples", "5", "--seed", "1", "--shards", "2", "--size", "64",
                 "--holdout", "red:circle,blue:star", "--quiet"])
    assert code == 0
    gt = default_mlcid_out(raw)
    assert gt == tmp_path / "scenes-mlcid"
    assert sorted(p.name for p in raw.glob("*.tar")) == ["00000.tar", "00001.tar"]
    for shard in (0, 1):
        assert validate_shard(str(gt / f"mlcid-{shard:06d}.tar"))[1] == {}
    sample = next(iter_shard_samples(str(gt / "mlcid-000000.tar")))
    assert sample.pipeline["config"]["holdout_pairs"] == [["red", "circle"], ["blue", "star"]]
    assert "wrote 5 scenes" in capsys.readouterr().out
    for bad in (["--holdout", "redcircle"], ["--colours", "red,mauve"], ["--shards", "3"], ["--seed", "-1"]):
        assert _synthetic_cli(["--out", str(tmp_path / "bad"), "--samples", "2", *bad]) == 2
    assert not (tmp_path / "bad").exists()
    assert "mauve" in capsys.readouterr().err
