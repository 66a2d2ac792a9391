"""Restart a training process whose steps stall, resuming it from its newest checkpoint.

MindSpore 2.9's CPU runtime occasionally never finishes a step (a kernel of the gradient graph keeps
running; seen every few hundred steps in the demo runs, with 1 or 2 threads). A training run resumes
exactly (:meth:`pangu_draw_ms.training.trainer.Trainer.resume`), so a stalled process can be killed and
started again with ``--resume`` at no cost but the steps since the last checkpoint. ``tools/train.py
--restart-on-stall SECONDS`` does that for single-process runs.
"""
from __future__ import annotations

import os
import subprocess
import time
from typing import Callable, Optional, Sequence


def run_with_restarts(command: Sequence[str], progress_file: str, stall_seconds: float,
                      restart_command: Optional[Sequence[str]] = None, max_restarts: int = 100,
                      poll_seconds: float = 2.0, log: Optional[Callable[[str], None]] = None) -> int:
    """Run ``command`` until it exits; while it runs, a ``progress_file`` (written every step) that this
    process has written but then leaves untouched for ``stall_seconds`` means a stalled step: the process is
    killed and ``restart_command`` (default ``command``; it must resume from the newest checkpoint) runs.
    Returns the final exit code; gives up (returns 1) after ``max_restarts`` restarts."""
    log = log or print
    restarts = 0
    while True:
        started = time.time()
        process = subprocess.Popen(list(command if restarts == 0 else (restart_command or command)))
        stalled = False
        while process.poll() is None:
            time.sleep(poll_seconds)
            try:
                last = os.path.getmtime(progress_file)
            except OSError:
                continue  # no step yet (data preparation, compilation)
            if last > started and time.time() - last > stall_seconds:
                stalled = True
                process.kill()
                process.wait()
        if not stalled:
            return process.returncode
        restarts += 1
        if restarts > max_restarts:
            log(f"gave up after {max_restarts} restarts: {progress_file} stalled every time")
            return 1
        log(f"no step for {stall_seconds:.0f} s (stalled process killed); resuming from the newest checkpoint "
            f"(restart {restarts})")
