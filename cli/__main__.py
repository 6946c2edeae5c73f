"""`python -m cli mlcid …` / `python -m cli layerdiff …`: the console commands without their installed scripts."""

import sys

from cli.main import layerdiff_main, mlcid_main

if __name__ == "__main__":
    commands = {"mlcid": mlcid_main, "layerdiff": layerdiff_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m cli {mlcid|layerdiff} COMMAND …")
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
