"""One training per run folder at a time: `DIR/.lock`, created exclusively, holds the trainer's PID. A live owner
(even one stopped with SIGSTOP) makes a second trainer refuse with that PID; a lock whose process is gone is taken
over."""

from __future__ import annotations

import os
from pathlib import Path

from .process import pid_alive

LOCK_FILE = ".lock"


class RunError(ValueError):
    """A run that cannot start: its folder is busy or holds another run."""


def take_lock(out: Path) -> Path:
    """Take the run folder's lock (created exclusively, holding our PID); a live owner refuses with its PID,
    a stale lock (its PID gone) is taken over."""
    lock = out / LOCK_FILE
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0  # unreadable or garbled: no live owner to protect
            if pid > 0 and pid != os.getpid() and pid_alive(pid):
                raise RunError(f"{out} is in use by a running training (pid {pid}); wait for it, stop it, "
                               "or choose another --out.") from None
            lock.unlink(missing_ok=True)  # stale lock of a process that is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    raise RunError(f"could not take the lock {lock}: another process keeps taking it; choose another --out.")
