"""Run events: one JSON object a line in `events.jsonl` (what the app draws), plus a progress bar.

Every event has `type` (`start`, `step`, `eval`, `checkpoint`, `stopped`, `done`, `error`) and `time`;
a `step` event also has `step`, `loss`, `lr`, `tokens_per_s`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator


class EventLog:
    """Appends events to a JSONL file (flushed per line, so a follower sees them at once)."""

    def __init__(self, path: str | Path, echo: bool = True, total_steps: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_line(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._bar = None
        if echo and total_steps:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def emit(self, type: str, **fields: Any) -> dict:
        """Write one event and return it."""
        event = {"type": type, "time": round(time.time(), 3), **fields}
        self._f.write(json.dumps(event) + "\n")
        self._f.flush()
        if self._bar is not None and type == "step":
            self._bar.n = fields["step"]
            self._bar.set_postfix(loss=f"{fields['loss']:.4f}", lr=f"{fields['lr']:.2e}",
                                  tok_s=f"{fields['tokens_per_s']:.0f}", refresh=False)
            self._bar.refresh()
        elif self._bar is not None and type in ("checkpoint", "eval", "stopped", "done", "error"):
            self._bar.write(f"[{type}] " + ", ".join(f"{k}={v}" for k, v in fields.items() if k != "expert_usage"))
        return event

    def set_position(self, step: int) -> None:
        """Move the progress bar (after a resume)."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        """Close the file and the progress bar."""
        if self._bar is not None:
            self._bar.close()
        self._f.close()


def _drop_torn_line(path: Path) -> None:
    """Cut a last line a killed process left half-written, so the events appended after it stay readable."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        f.seek(max(0, size - 65536))
        tail = f.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        f.truncate(size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size))


def read_events(path: str | Path, start: int = 0) -> tuple[list[dict], int]:
    """Events from byte offset `start` of an events file; returns them and the offset to read on from.
    A last line still being written is left for the next read."""
    path = Path(path)
    if not path.is_file():
        return [], start
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, start + end


def iter_events(path: str | Path) -> Iterator[dict]:
    """All complete events of a file."""
    yield from read_events(path)[0]
