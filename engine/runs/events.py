"""Run events: one JSON object a line in `events.jsonl` (what the app draws), plus a progress bar.

Every event has `type` (`start`, `step`, `eval`, `checkpoint`, `stopped`, `done`, `error`) and `time`;
a `step` event also has `step`, `loss`, `lr`, `tokens_per_s`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


@dataclass
class EventsRead:
    """What one read of an events file gave: the events, the offset to read on from, and how many complete
    lines were skipped because they are not a JSON object (a garbled or hand-edited line)."""

    events: list[dict]
    offset: int
    bad_lines: int = 0


def read_events_counted(path: str | Path, start: int = 0) -> EventsRead:
    """Events from byte offset `start` of an events file, skipping and counting lines that are not JSON
    objects; a last line still being written is left for the next read. The one reader of events files."""
    path = Path(path)
    if not path.is_file():
        return EventsRead([], start)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1
    out = EventsRead([], start + end)
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            event = None
        if isinstance(event, dict):
            out.events.append(event)
        else:
            out.bad_lines += 1
    return out


def skipped_warning(path: str | Path, bad_lines: int) -> str:
    """The one-line warning for `bad_lines` unreadable lines skipped in events file `path` ('' for none)."""
    if not bad_lines:
        return ""
    lines = "1 line is" if bad_lines == 1 else f"{bad_lines} lines are"
    return f"{path}: {lines} not a readable event and skipped; the run is shown without them."


def read_events(path: str | Path, start: int = 0) -> tuple[list[dict], int]:
    """Events from byte offset `start` of an events file (unreadable lines skipped, see `read_events_counted`);
    returns them and the offset to read on from."""
    got = read_events_counted(path, start)
    return got.events, got.offset
