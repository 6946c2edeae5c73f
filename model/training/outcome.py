"""How a training command ends: exit codes, and one clear log line per failure instead of a traceback."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from typing import Any

from model.training.checkpoint import CheckpointError
from model.training.data_check import DataCheckError
from model.training.interrupt import EXIT_INTERRUPTED, TrainingInterrupted
from model.training.run_folder import RunFolder

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
__all__ = ["EXIT_BAD_INPUT", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "TrainingDiverged", "run_with_exit_codes"]


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) stopped being finite."""


def resume_command(prog: str, argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with `--resume` (once)."""
    kept = [a for a in argv if a != "--resume"]
    return shlex.join([*prog.split(), *kept, "--resume"])


def run_with_exit_codes(train: Callable[[], Any], out: str, prog: str, argv: list[str]) -> int:
    """Run `train()` and turn the trainer's failures into one clear log line and an exit code (no traceback)."""
    try:
        train()
    except TrainingDiverged as e:
        log.error("%s", e)
        return EXIT_DIVERGED
    except TrainingInterrupted as e:
        log.warning("stopped at step %d; checkpoint %s. Resume with:\n  %s", e.step, e.checkpoint,
                    resume_command(prog, argv))
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        run = RunFolder.open(out)
        last = run.latest()
        run.close()
        how = f"; resume from {last} with:\n  {resume_command(prog, argv)}" if last else "; no checkpoint to resume from"
        log.warning("stopped by Ctrl-C before a checkpoint could be written%s", how)
        return EXIT_INTERRUPTED
    except DataCheckError as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    except (CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        log.error("%s: %s", type(e).__name__, e)
        log.debug("traceback", exc_info=True)
        return EXIT_BAD_INPUT
    return 0
