"""The console commands: every command is listed, own-parser commands get their options, help never loads torch."""

from __future__ import annotations

import json
import subprocess
import sys

from cli.main import LAYERDIFF_COMMANDS, MLCID_COMMANDS, build_parser, mlcid_main
from tests.builders import make_sample, write_shard


def test_a_command_with_its_own_parser_gets_every_option(tmp_path, capsys):
    shard = write_shard(tmp_path, [make_sample("a")])
    assert mlcid_main(["stats", "--json", str(shard)]) == 0  # a leading option goes through to mlcid.stats
    assert json.loads(capsys.readouterr().out)["written"] == 1


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys; from cli.main import *; "
            "[build_parser(p, '', c).format_help() for p, c in (('mlcid', MLCID_COMMANDS), ('layerdiff', LAYERDIFF_COMMANDS))]; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    text = build_parser("mlcid", "", MLCID_COMMANDS).format_help()
    assert all(name in text for name in MLCID_COMMANDS)
    assert all(name in build_parser("layerdiff", "", LAYERDIFF_COMMANDS).format_help() for name in LAYERDIFF_COMMANDS)
