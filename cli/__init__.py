"""Console commands `mlcid …` and `layerdiff …`: argument parsing only; the work is done by library functions.

Each command module defines `HELP`, `add_arguments(parser)` and `run(args) -> exit code`, and imports nothing
heavy at module level, so `--help` answers without loading torch. `cli.main` finds the commands in a dict.
"""
