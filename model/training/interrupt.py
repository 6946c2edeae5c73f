"""Ctrl-C during training: the first SIGINT asks for a stop after the current step (with a checkpoint), a second
one stops at once. Loader worker processes ignore SIGINT (the terminal sends it to the whole process group)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C) at a step boundary; `checkpoint` is where it can resume from."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """Context manager: while active, SIGINT sets `requested` (first time) or raises KeyboardInterrupt (second).

    Only the main thread can install signal handlers; elsewhere (a Ray Train worker thread) it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again stops at once, "
                    "without one)")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


def ignore_sigint() -> None:
    """For loader worker processes: leave Ctrl-C to the trainer, which stops them itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
