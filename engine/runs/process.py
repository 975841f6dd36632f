"""Child processes of MoETune's own commands (the app's trainings, a sweep's candidates) and stopping them
cleanly: how to call `moetune`, the environment they run in, and SIGINT/SIGTERM as a flag."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def moetune_command() -> list[str]:
    """How to call the `moetune` console script of this environment (the one beside this Python)."""
    script = Path(sys.executable).parent / "moetune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]


def child_env() -> dict[str, str]:
    """The environment of a child `moetune`: this one, unbuffered, with the project importable."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def pid_alive(pid: int | None) -> bool:
    """Whether a process runs under `pid` (a zombie, killed but not yet reaped, does not; one of another user does)."""
    if not pid or pid < 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the caller checks (between optimizer steps, between candidates)."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signals, still a flag
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
