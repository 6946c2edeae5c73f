"""The `mlcid` and `layerdiff` console commands: a table of subcommands, each a module of `cli`."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name → module of `cli` defining HELP, add_arguments(parser, command) and run(args), or
# "module:function" for a command whose parser still lives with its library module (it gets the raw arguments).
MLCID_COMMANDS = {
    "synthetic": "cli.synthetic",
    "photos": "cli.photos",
    "laion": "cli.laion",
    "build": "cluster.build_mlcid:main",
    "build-local": "pipelines.build:main",
    "validate": "cli.validate",
    "stats": "mlcid.stats:main",
    "view": "mlcid.view:main",
    "takedown": "cli.takedown",
    "wids-index": "cli.wids_index",
}
LAYERDIFF_COMMANDS = {
    "tiny-models": "cli.tiny_models",
    "train": "model.training.trainer:main",
    "sample": "model.sampling.sample:main",
    "inpaint": "cli.applications",
    "style": "cli.applications",
    "iterative": "cli.applications",
    "eval": "cli.evaluate",
    "learn-bench": "benchmarks.learn_bench:main",
    "ship-model": "cli.ship_model",
    "showcase": "cli.showcase",
}


def build_parser(prog: str, description: str, commands: dict[str, str]) -> argparse.ArgumentParser:
    """One parser with a subparser per command; each module fills in its own arguments."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in commands.items():
        if ":" in module_name:  # its own parser: pass every argument through, --help included
            p = sub.add_parser(name, help=f"(see `{prog} {name} --help`)", add_help=False)
            p.add_argument("argv", nargs=argparse.REMAINDER)
            p.set_defaults(run=_passthrough(module_name), prog=f"{prog} {name}")
            continue
        module = importlib.import_module(module_name)
        help_text = module.HELP[name] if isinstance(module.HELP, dict) else module.HELP
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p, name)
        p.set_defaults(run=module.run, prog=f"{prog} {name}")
    return parser


def fail(args: argparse.Namespace, message: object) -> int:
    """Print `PROG: error: message` to stderr and return exit code 2 (bad input), like argparse does."""
    print(f"{args.prog}: error: {message}", file=sys.stderr)
    return 2


def _passthrough(target: str):
    def run(args: argparse.Namespace) -> int:
        module_name, function = target.split(":")
        return getattr(importlib.import_module(module_name), function)(args.argv)
    return run


def _dispatch(prog: str, description: str, commands: dict[str, str], argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and ":" in commands.get(argv[0], ""):  # its own parser takes every argument (argparse's REMAINDER
        module_name, function = commands[argv[0]].split(":")  # would refuse leading options)
        return int(getattr(importlib.import_module(module_name), function)(argv[1:]) or 0)
    args = build_parser(prog, description, commands).parse_args(argv)
    return int(args.run(args) or 0)


def mlcid_main(argv: list[str] | None = None) -> int:
    """`mlcid COMMAND …`: build, check and browse MLCID shards."""
    return _dispatch("mlcid", "Build, check and browse MLCID (multi-layer composable image) shards.",
                     MLCID_COMMANDS, argv)


def layerdiff_main(argv: list[str] | None = None) -> int:
    """`layerdiff COMMAND …`: train, sample, edit and evaluate LayerDiff."""
    return _dispatch("layerdiff", "Train, sample, edit and evaluate LayerDiff layered-image models.",
                     LAYERDIFF_COMMANDS, argv)

