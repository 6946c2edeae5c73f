"""The console commands: every command is listed, options reach their command, `--help` never loads torch."""

from __future__ import annotations

import json
import subprocess
import sys

from cli.main import LAYERDIFF_COMMANDS, MLCID_COMMANDS, build_parser, layerdiff_main, mlcid_main
from tests.builders import make_sample, write_shard

HEAVY = ("torch", "diffusers", "transformers", "ray", "webdataset")


def test_a_leading_option_reaches_its_command(tmp_path, capsys):
    shard = write_shard(tmp_path, [make_sample("a")])
    assert mlcid_main(["stats", "--json", str(shard)]) == 0  # (argparse's REMAINDER once refused this)
    assert json.loads(capsys.readouterr().out)["written"] == 1


def test_the_top_level_help_lists_every_command():
    text = build_parser("mlcid", "", MLCID_COMMANDS).format_help()
    assert all(name in text for name in MLCID_COMMANDS)
    assert all(name in build_parser("layerdiff", "", LAYERDIFF_COMMANDS).format_help() for name in LAYERDIFF_COMMANDS)


def test_help_of_every_command_imports_no_torch(record_property):
    """Every `PROG CMD --help`, one after another in a fresh interpreter per PROG: the heavy packages each one
    loaded first, and how long each took (the first pays for the shared imports)."""
    code = """if True:
        import contextlib, io, json, sys, time
        from cli.main import LAYERDIFF_COMMANDS, MLCID_COMMANDS, layerdiff_main, mlcid_main
        prog = sys.argv[1]
        main, commands = {"mlcid": (mlcid_main, MLCID_COMMANDS),
                          "layerdiff": (layerdiff_main, LAYERDIFF_COMMANDS)}[prog]
        seen = {}
        for name in commands:
            start, out = time.perf_counter(), io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    main([name, "--help"])
            except SystemExit as e:
                code = e.code
            seen[name] = {"code": code, "usage": out.getvalue().startswith(f"usage: {prog} {name}"),
                          "seconds": time.perf_counter() - start,
                          "heavy": sorted(m for m in %r if m in sys.modules)}
        print(json.dumps(seen))
    """ % (HEAVY,)
    seen = {}
    for prog in ("mlcid", "layerdiff"):
        run = subprocess.run([sys.executable, "-c", code, prog], capture_output=True, text=True, check=True)
        seen |= {f"{prog} {k}": v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    record_property("help_seconds", {k: round(v["seconds"], 2) for k, v in seen.items()})  # budget: < 2 s, quiet
    assert {k: v["heavy"] for k, v in seen.items() if v["heavy"]} == {}
    assert all(v["code"] == 0 and v["usage"] for v in seen.values()), seen
    assert set(seen) == {f"mlcid {c}" for c in MLCID_COMMANDS} | {f"layerdiff {c}" for c in LAYERDIFF_COMMANDS}


def test_ray_train_options_need_workers(capsys):
    assert layerdiff_main(["train", "--data", "d", "--out", "o", "--gpu"]) == 2
    assert "layerdiff train: error: --gpu and --max-failures go with --workers" in capsys.readouterr().err


def test_learn_bench_refuses_an_unknown_smg_variant_before_any_stage(tmp_path, capsys):
    assert layerdiff_main(["learn-bench", "--out", str(tmp_path / "lb"), "--sweep-variants", "default,nope"]) == 2
    assert "unknown SMG variants ['nope']" in capsys.readouterr().err and not (tmp_path / "lb").exists()
