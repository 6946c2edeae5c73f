"""The `mlcid` and `layerdiff` console commands: a table of subcommands, each a module of `cli`."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name → module of `cli` defining HELP (a string, or a dict by command), add_arguments(parser, command) and
# run(args) -> exit code. Modules import nothing heavy at module level or in add_arguments: `--help` loads no torch.
MLCID_COMMANDS = {
    "synthetic": "cli.synthetic",
    "photos": "cli.photos",
    "laion": "cli.laion",
    "build": "cli.build",
    "build-local": "cli.build_local",
    "validate": "cli.validate",
    "stats": "cli.stats",
    "view": "cli.view",
    "takedown": "cli.takedown",
    "wids-index": "cli.wids_index",
}
LAYERDIFF_COMMANDS = {
    "tiny-models": "cli.tiny_models",
    "train": "cli.train",
    "train-vae": "cli.train_vae",
    "sample": "cli.sample",
    "inpaint": "cli.applications",
    "style": "cli.applications",
    "iterative": "cli.applications",
    "eval": "cli.evaluate",
    "learn-bench": "cli.learn_bench",
    "ship-model": "cli.ship_model",
    "showcase": "cli.showcase",
}


def build_parser(prog: str, description: str, commands: dict[str, str], only: str | None = None
                 ) -> argparse.ArgumentParser:
    """One parser with a subparser per command; each module fills in its own arguments (with `only`, just that
    command's module does: the others are listed by their HELP, so `PROG CMD …` loads one command's defaults)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in commands.items():
        module = importlib.import_module(module_name)
        help_text = module.HELP[name] if isinstance(module.HELP, dict) else module.HELP
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            module.add_arguments(p, name)
        p.set_defaults(run=module.run, prog=f"{prog} {name}")
    return parser


def fail(args: argparse.Namespace, message: object) -> int:
    """Print `PROG: error: message` to stderr and return exit code 2 (bad input), like argparse does."""
    print(f"{args.prog}: error: {message}", file=sys.stderr)
    return 2


def _dispatch(prog: str, description: str, commands: dict[str, str], argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in commands else None
    args = build_parser(prog, description, commands, only).parse_args(argv)
    args.argv = argv[1:]  # the command's own arguments, e.g. for the command line that resumes a run
    return int(args.run(args) or 0)


def mlcid_main(argv: list[str] | None = None) -> int:
    """`mlcid COMMAND …`: build, check and browse MLCID shards."""
    return _dispatch("mlcid", "Build, check and browse MLCID (multi-layer composable image) shards.",
                     MLCID_COMMANDS, argv)


def layerdiff_main(argv: list[str] | None = None) -> int:
    """`layerdiff COMMAND …`: train, sample, edit and evaluate LayerDiff."""
    return _dispatch("layerdiff", "Train, sample, edit and evaluate LayerDiff layered-image models.",
                     LAYERDIFF_COMMANDS, argv)

