"""The run folder: what a training writes and how the other commands (and the app) read it.

- `events`: `events.jsonl`, one JSON object a line (`EventLog` writes it, `read_events` reads it, torn lines
  skipped and counted).
- `lock`: one trainer per folder (`take_lock`, `RunError`).
- `process`: child `moetune` processes of the app and the sweep, and stopping them (`StopFlag`).
- `finished`: a finished run loaded for eval, chat and export (`load_run`): its config, base model with the
  experts placed by the planner, and its adapter checked against its SHA-256. It imports torch and the model,
  so it is not imported here: the app reads run folders through this package without loading torch.

Atomic writes and checked reads live one level up, in `engine.io`: every package writes files.
"""

from .events import EventLog, read_events, read_events_counted, skipped_warning
from .lock import LOCK_FILE, RunError, take_lock
from .process import StopFlag, child_env, moetune_command, pid_alive

__all__ = ["LOCK_FILE", "EventLog", "RunError", "StopFlag", "child_env", "moetune_command", "pid_alive",
           "read_events", "read_events_counted", "skipped_warning", "take_lock"]
