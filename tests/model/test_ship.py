"""model.ship / `layerdiff ship-model`: a learn-bench work folder → a small pipeline folder with float16 weights that
loads as float32, a card with checksums, byte-identical on a re-export, refused over the size limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from model.ship import MAX_BYTES, read_card, ship_learn_bench, verify_checksums

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A learn-bench-shaped work folder: a tiny trained-looking run, its records, a few synthetic shards."""
    from mlcid.synthetic import SceneConfig, write_dataset
    from tests.builders import make_run

    root = tmp_path_factory.mktemp("bench")
    run = make_run(root, max_layers=3)
    cfg = SceneConfig(size=32, min_foregrounds=1, max_foregrounds=2, colours=("red", "blue"),
                      shapes=("circle", "square"), holdout_pairs=(("blue", "square"),))
    summary = write_dataset(root / "data" / "raw", root / "data" / "mlcid", 4, seed=7, shards=1, config=cfg,
                            progress=False)
    (root / "data.done.json").write_text(json.dumps({"samples": summary["written"]}))
    (root / "train.done.json").write_text(json.dumps({
        "steps": 12, "loss_first": 1.0, "loss_last": 0.5,
        "command": f"-m model.training.trainer --data {root}/data/mlcid --out {root}/run --pretrained {root}/sd"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"pretrained": str(root / "sd"), "batch_size": 4, "seed": 0,
                                                     "data": {"resolution": 32, "max_layers": 3}}))
    return root


def test_export_loads_as_float32_with_the_fp16_values(bench, tmp_path):
    from model.sampling.pipeline import LayerDiffPipeline

    out = ship_learn_bench(bench, tmp_path / "shipped")
    assert verify_checksums(out) == []
    shipped, original = LayerDiffPipeline.from_pretrained(out), LayerDiffPipeline.from_pretrained(bench / "run")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(shipped, name).state_dict(), getattr(original, name).state_dict()
        assert a.keys() == b.keys()
        assert all(a[k].dtype == torch.float32 for k in a), name  # float32 modules on CPU by default
        assert all(torch.equal(a[k], b[k].half().float()) for k in a), name  # exactly the fp16-rounded weights
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.layerdiff.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    full = sum(p.stat().st_size for p in (bench / "run").rglob("*.safetensors") if "checkpoint" not in str(p))
    assert size < 0.51 * full  # halved weights (+ the safetensors headers)


def test_card_says_how_it_was_trained_and_what_it_draws(bench, tmp_path):
    out = ship_learn_bench(bench, tmp_path / "shipped", command=f"layerdiff learn-bench --ship --out {bench}")
    front, table = read_card(out)
    assert front["library_name"] == "diffusers" and "learn-bench" in front["tags"]
    assert front["training_steps"] == 12 and front["training_resolution"] == 32 and front["weights_dtype"] == "float16"
    assert front["vocabulary"]["colours"] == ["red", "blue"] and front["vocabulary"]["holdout_pairs"] == [["blue", "square"]]
    assert "seed 7" in front["training_data"][0]  # from the shards' own records (no results.json here)
    text = (out / "README.md").read_text()
    assert "layerdiff learn-bench --ship --out OUT" in text and "--data OUT/data/mlcid" in text
    assert str(bench) not in text  # no machine paths
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(table) == [f for f in files if f != "README.md"]
    assert not [f for f in files if str(bench).encode() in (out / f).read_bytes()]  # configs lose `_name_or_path`


def test_export_is_byte_identical_and_checksums_catch_a_changed_file(bench, tmp_path):
    a = ship_learn_bench(bench, tmp_path / "a")
    b = ship_learn_bench(bench, tmp_path / "b")
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    weights = a / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (a / "extra.txt").write_text("x")
    problems = verify_checksums(a)
    assert any(p.startswith("vae/diffusion_pytorch_model.safetensors: sha256") for p in problems)
    assert any(p.startswith("extra.txt: not in the card") for p in problems)


def test_refuses_over_the_size_limit_before_writing(bench, tmp_path):
    assert MAX_BYTES == 10_000_000
    with pytest.raises(ValueError, match=r"would be .* MB, over the 0\.10 MB limit"):
        ship_learn_bench(bench, tmp_path / "big", max_bytes=100_000)
    assert not (tmp_path / "big").exists() and list(tmp_path.iterdir()) == []
    ship_learn_bench(bench, tmp_path / "ok")
    with pytest.raises(FileExistsError, match="overwrite"):
        ship_learn_bench(bench, tmp_path / "ok")


def test_cli_refuses_a_folder_without_a_trained_run(tmp_path, capsys):
    from cli.main import layerdiff_main

    assert layerdiff_main(["ship-model", "--bench", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "train.done.json is missing" in capsys.readouterr().err
