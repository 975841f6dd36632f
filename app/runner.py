"""Runs as subprocesses: the app writes a run's config into its folder, starts `moetune train` on it
(in its own session, so closing the browser or the app does not stop it), and follows its
`events.jsonl`. Everything it knows about a run is on disk, so a reopened page shows it again:

    RUN/launch.yaml     the config the app started (paths made absolute)
    RUN/app.json        pid, command and start time of the latest process the app started
    RUN/train.log       the process's stdout and stderr (the tail of it is shown on errors)
    RUN/...             what `moetune train` writes: config.yaml, events.jsonl, .lock, checkpoints/, ...

One run at a time per folder: the app refuses to start a folder whose process is alive, and
`moetune train` refuses a folder holding a live `.lock`. Stop sends SIGTERM: the trainer saves a
checkpoint, writes a `stopped` event and exits; Resume starts `moetune train --resume` on the folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.runs import read_events_counted, skipped_warning
from engine.io import atomic_write_json
from engine.runs import child_env, moetune_command, pid_alive

from .paths import ROOT, child_folder, is_folder_name, runs_dir

LAUNCH_FILE, APP_FILE, LOG_FILE, EVENTS_FILE = "launch.yaml", "app.json", "train.log", "events.jsonl"
TERMINAL = ("done", "stopped", "error")


def read_app_meta(path: Path) -> dict:
    """What the app recorded of the process it started on a folder (APP_FILE: pid, command, ...), or {}."""
    try:
        return json.loads((path / APP_FILE).read_text())
    except (OSError, ValueError):
        return {}


def spawn_logged(path: Path, cmd: list[str], log_name: str) -> subprocess.Popen:
    """Start `cmd` in its own session (closing the app does not stop it), its output appended to
    path/log_name, and record it in path/APP_FILE."""
    with open(path / log_name, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=child_env(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    atomic_write_json(path / APP_FILE, {"pid": proc.pid, "command": cmd, "started": time.time()})
    return proc


@dataclass
class RunState:
    """What the app shows about a run, folded from its events and its process."""

    name: str
    path: Path
    status: str = "empty"  # empty | starting | running | stopping | stopped | done | error | crashed
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    memory_gb: float | None = None
    expert_usage: list | None = None
    history: dict[int, tuple[float, float]] = field(default_factory=dict)  # step -> (loss, lr)
    eval_loss: dict[int, float] = field(default_factory=dict)  # step -> held-out loss (data.eval)
    accuracy: dict[str, float | str] = field(default_factory=dict)  # benchmark -> accuracy (or why it failed)
    offload: dict | None = None  # the latest step's expert-cache traffic, when experts are offloaded
    started: float | None = None  # time of the latest `start` event
    first_started: float | None = None  # time of the first `start` event (the run's date)
    elapsed_before: float = 0.0  # seconds the run trained before its latest start (earlier segments, Resume)
    last_time: float | None = None  # time of the latest event
    first_step: tuple[int, float] | None = None  # (step, time) of the first step after the latest start
    last_step: tuple[int, float] | None = None
    final_loss: float | None = None
    error: str = ""
    log_tail: str = ""
    parameters: dict | None = None
    examples: int | None = None
    dropped: int = 0  # training rows the cut-off left out (data.max_len)
    device: str = ""
    world_size: int = 1  # ranks of the job (the start event), e.g. `--gpus 2`
    bad_lines: int = 0  # lines of events.jsonl that are not a readable event (skipped)

    @property
    def warning(self) -> str:
        """What the view should warn about the run's files ('' when nothing)."""
        return skipped_warning(self.path / EVENTS_FILE, self.bad_lines)

    @property
    def running(self) -> bool:
        """The process is alive."""
        return self.status in ("starting", "running", "stopping")

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate since the latest start."""
        if not self.first_step or not self.last_step or self.last_step[0] <= self.first_step[0]:
            return None
        rate = (self.last_step[1] - self.first_step[1]) / (self.last_step[0] - self.first_step[0])
        return max(0.0, rate * (self.total_steps - self.step))

    @property
    def elapsed_s(self) -> float | None:
        """Seconds the run has trained over all its segments (each start to its last event; now while running)."""
        if self.started is None:
            return None
        end = time.time() if self.running else (self.last_time or self.started)
        return self.elapsed_before + max(0.0, end - self.started)


class _Follower:
    """Incremental reader of one run's events (byte offset kept between reads)."""

    def __init__(self, name: str, path: Path):
        self.offset = 0
        self.state = RunState(name, path)
        self.last_type: str | None = None

    def read(self) -> None:
        got = read_events_counted(self.state.path / EVENTS_FILE, self.offset)
        self.offset, self.state.bad_lines = got.offset, self.state.bad_lines + got.bad_lines
        for e in got.events:
            try:
                self.apply(e)
            except (KeyError, TypeError, ValueError):  # an object, but not an event of its type (hand-edited?)
                self.state.bad_lines += 1

    def apply(self, e: dict) -> None:
        s, kind = self.state, e.get("type")
        self.last_type = kind
        if kind == "start" and s.started is not None and s.last_time is not None:  # a resumed run: keep its time
            s.elapsed_before += max(0.0, s.last_time - s.started)
        if isinstance(e.get("time"), (int, float)):
            s.last_time = float(e["time"])
        if kind == "start":
            s.first_started = s.first_started if s.first_started is not None else e.get("time")
            s.total_steps = int(e.get("total_steps") or 0)
            s.step = int(e.get("step") or 0)
            s.started, s.first_step, s.last_step = e.get("time"), None, None
            s.parameters, s.examples, s.device = e.get("parameters"), e.get("examples"), e.get("device", "")
            s.dropped = int(e.get("dropped") or 0)
            s.world_size = int(e.get("world_size") or 1)
            s.error = ""
        elif kind == "step":
            s.step, s.total_steps = int(e["step"]), int(e.get("total_steps") or s.total_steps)
            s.epoch, s.loss, s.lr = e.get("epoch", 0), e.get("loss"), e.get("lr")
            s.tokens_per_s, s.memory_gb = e.get("tokens_per_s"), e.get("memory_gb")
            if e.get("expert_usage") is not None:
                s.expert_usage = e["expert_usage"]
            s.history[s.step] = (e.get("loss"), e.get("lr"))
            s.offload = e.get("offload", s.offload)
            s.last_step = (s.step, e.get("time", time.time()))
            if s.first_step is None:
                s.first_step = s.last_step
        elif kind == "eval" and e.get("eval_loss") is not None:
            s.eval_loss[int(e["step"])] = float(e["eval_loss"])
        elif kind == "eval" and e.get("benchmark"):  # eval.benchmarks, scored after training
            s.accuracy[str(e["benchmark"])] = float(e["accuracy"]) if "accuracy" in e else str(e.get("error"))
        elif kind == "done":
            s.final_loss = e.get("final_loss")
        elif kind == "error":
            s.error = str(e.get("message") or "the run failed")


def _log_tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log, with progress-bar redraws (\\r) folded to their final state."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    out = [ln.rsplit("\r", 1)[-1] for ln in text.replace("\r\n", "\n").split("\n")]
    out = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", ln) for ln in out if ln.strip()]
    return "\n".join(out[-lines:])


class Runner:
    """Starts, stops, resumes and follows runs under one runs folder."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else runs_dir()
        self._procs: dict[Path, subprocess.Popen] = {}
        self._followers: dict[Path, _Follower] = {}
        self._lock = threading.Lock()

    # ---- listing ---------------------------------------------------------------------------

    def run_path(self, name: str) -> Path:
        """The folder of a run name: one folder name under the runs folder, or `SWEEP/CANDIDATE` for a sweep's
        candidate (ValueError for anything else)."""
        if isinstance(name, str) and name.count("/") == 1:
            sweep, cand = name.split("/")
            parent = child_folder(self.root, sweep, "run name")
            if is_folder_name(cand) and any((parent / f).is_file() for f in ("sweep.yaml", "sweep.json")):
                return parent / cand
        return child_folder(self.root, name, "run name")

    def list_runs(self) -> list[str]:
        """Run names, newest first (a run is a folder with events, a launch file or a config)."""
        runs = []
        for p in self.root.iterdir() if self.root.is_dir() else []:
            if p.is_dir() and is_folder_name(p.name) \
                    and any((p / f).exists() for f in (EVENTS_FILE, LAUNCH_FILE, "config.yaml")):
                runs.append((max((p / f).stat().st_mtime for f in (EVENTS_FILE, LAUNCH_FILE, APP_FILE, "config.yaml")
                                 if (p / f).exists()), p.name))
        return [name for _, name in sorted(runs, reverse=True)]

    def delete(self, name: str) -> None:
        """Remove a run folder and everything in it; refused while its training runs."""
        import shutil

        path = self.run_path(name)
        if self.is_alive(path):
            raise RuntimeError(f"run {name} is training; stop it before deleting it.")
        if not path.is_dir():
            raise RuntimeError(f"run {name} does not exist (deleted already?).")
        self._followers.pop(path, None)
        shutil.rmtree(path)

    def finished_runs(self) -> list[str]:
        """Runs that have an adapter to evaluate, chat with or export, newest first."""
        return [n for n in self.list_runs() if (self.run_path(n) / "adapter.safetensors").is_file()]

    def current_run(self) -> str | None:
        """The run to show on opening the app: a live one, else the newest."""
        runs = self.list_runs()
        for name in runs:
            if self.state(name).running:
                return name
        return runs[0] if runs else None

    def new_name(self, stem: str) -> str:
        """A fresh run name `stem-YYYYmmdd-HHMMSS` (with a suffix when taken)."""
        base = f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', stem).strip('-') or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        name, i = base, 2
        while self.run_path(name).exists():
            name, i = f"{base}-{i}", i + 1
        return name

    # ---- processes -------------------------------------------------------------------------

    def _pid(self, path: Path) -> int | None:
        try:
            return int(read_app_meta(path).get("pid") or 0) or None
        except ValueError:
            return None

    def is_alive(self, path: Path) -> bool:
        """Whether a training process is working on this folder (ours, or one a previous app started)."""
        proc = self._procs.get(path)
        if proc is not None:
            if proc.poll() is None:
                return True
            self._procs.pop(path, None)
            meta = read_app_meta(path)
            if meta.get("pid") == proc.pid and "returncode" not in meta:
                atomic_write_json(path / APP_FILE, {**meta, "returncode": proc.returncode})
            return False
        if pid_alive(self._pid(path)):
            return True
        try:  # a `moetune train` started outside the app holds the lock
            return pid_alive(int((path / ".lock").read_text().strip() or 0))
        except (OSError, ValueError):
            return False

    def _spawn(self, path: Path, args: list[str]) -> None:
        with self._lock:
            if self.is_alive(path):
                raise RuntimeError(f"run {path.name} is already running; stop it first or start another run.")
            self._procs[path] = spawn_logged(path, moetune_command() + args, LOG_FILE)
            self._followers.pop(path, None)

    def start(self, config: dict, name: str, gpus: int = 1) -> str:
        """Write `config` (a complete, path-resolved config dict) into a new run folder and start training
        (data parallel on `gpus` GPUs of this machine when more than 1: `moetune train --gpus N`)."""
        import yaml

        path = child_folder(self.root, name, "run name")  # a new run: one folder name, never inside a sweep
        if path.exists() and any(path.iterdir()):
            raise RuntimeError(f"run folder {path} already exists; choose another run name.")
        path.mkdir(parents=True, exist_ok=True)
        from engine.io import atomic_write_text

        atomic_write_text(path / LAUNCH_FILE, yaml.safe_dump(config, sort_keys=False))
        self._spawn(path, ["train", str(path / LAUNCH_FILE), "--out", str(path), *_gpus_args(gpus)])
        return path.name

    def resume(self, name: str) -> None:
        """Continue a stopped or crashed run from its last checkpoint."""
        path = self.run_path(name)
        cfg = path / "config.yaml" if (path / "config.yaml").is_file() else path / LAUNCH_FILE
        if not cfg.is_file():
            raise RuntimeError(f"run {name} has no config to resume from; start a new run.")
        if (path / "summary.json").is_file():
            raise RuntimeError(f"run {name} is finished; there is nothing to resume.")
        resume = ["--resume"] if (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir()) else []
        # the same number of ranks as the run had (a checkpoint resumes only under its world size)
        self._spawn(path, ["train", str(cfg), "--out", str(path), *resume, *_gpus_args(self.state(name).world_size)])

    def stop(self, name: str) -> bool:
        """Ask a running training to stop (SIGTERM: it saves a checkpoint first). False if none runs."""
        path = self.run_path(name)
        if not self.is_alive(path):
            return False
        proc = self._procs.get(path)
        pid = proc.pid if proc is not None else self._pid(path)
        if not pid_alive(pid):
            try:
                pid = int((path / ".lock").read_text().strip())
            except (OSError, ValueError):
                return False
        meta = read_app_meta(path)
        atomic_write_json(path / APP_FILE, {**meta, "stop_requested": time.time()})
        os.kill(pid, signal.SIGTERM)
        return True

    # ---- state -----------------------------------------------------------------------------

    def state(self, name: str) -> RunState:
        """The run's state now: its events so far (read incrementally) and whether its process lives."""
        path = self.run_path(name)
        fol = self._followers.get(path)
        if fol is None or not (path / EVENTS_FILE).exists() and fol.offset:
            fol = self._followers[path] = _Follower(name, path)
        fol.read()
        s = fol.state
        alive = self.is_alive(path)
        meta = read_app_meta(path)
        last = fol.last_type
        if alive:
            if meta.get("stop_requested") and meta.get("stop_requested", 0) > meta.get("started", 0):
                s.status = "stopping"
            else:
                s.status = "running" if last not in (None, *TERMINAL) else "starting"
        elif last in TERMINAL:
            s.status = last
        elif last is None and not meta:
            s.status = "empty"
        elif meta.get("stop_requested", 0) > meta.get("started", 0):
            s.status = "stopped"  # stopped before its first checkpoint (e.g. while loading)
        else:
            s.status = "error" if last is None else "crashed"
        # the log's tail helps when the process died without an `error` event (bad config, killed, ...)
        s.log_tail = _log_tail(path / LOG_FILE) if s.status in ("error", "crashed") and last != "error" else ""
        if s.status == "error" and not s.error:
            s.error = _last_error_line(s.log_tail) or "the training process exited before it started"
        if s.status == "crashed" and not s.error:
            s.error = "the training process ended without finishing (killed?); Resume continues from its last checkpoint"
        return s


def _gpus_args(gpus: int) -> list[str]:
    """`--gpus N` for a data-parallel run, nothing for one process."""
    return ["--gpus", str(int(gpus))] if gpus and int(gpus) > 1 else []


def _last_error_line(tail: str) -> str:
    for line in reversed(tail.splitlines()):
        if "error" in line.lower():
            return line.strip()
    return ""
