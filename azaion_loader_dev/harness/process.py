"""The harness's child processes: a stop with a deadline, and the end of a log for a message."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any


def stop_process(
    process: subprocess.Popen[Any],
    sig: int = signal.SIGTERM,
    timeout: float = 10.0,
    *,
    group: bool = False,
) -> bool:
    """Send ``sig`` and wait up to ``timeout`` s for it to end; past that, SIGKILL it (its whole
    process group with ``group``). True if it ended in time, or had ended already."""
    if process.poll() is not None:
        return True
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.wait()
        return False
    return True


def log_tail(path: Path, lines: int = 30, missing: str = "(no log)") -> str:
    """The last ``lines`` lines of a log, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return missing
    return "\n".join(text.splitlines()[-lines:])
