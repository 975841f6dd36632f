"""Every run under the runs folder, for the pickers of Evaluate / Chat / Export and the Runs tab: the app's own
runs, and the candidates of each sweep (ordinary run folders `SWEEP/CANDIDATE`, named `SWEEP/CANDIDATE` and listed
after their sweep's name); one row of facts a run (status, date, steps, final loss, eval score, strategy).

The run the user works with (just trained, shown on Train, or picked in any tab) is the app's *focus*: the other
tabs offer it first (`pick`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .paths import is_folder_name
from .runner import EVENTS_FILE, LAUNCH_FILE, Runner

SWEEP_FILES = ("sweep.yaml", "sweep.json")
RESULTS_FILE = Path("eval") / "app-results.json"


def is_sweep(path: Path) -> bool:
    """A sweep folder (started from the app, or `moetune sweep --out` into the runs folder)."""
    return any((path / f).is_file() for f in SWEEP_FILES)


def _is_run(path: Path) -> bool:
    return path.is_dir() and is_folder_name(path.name) and \
        any((path / f).exists() for f in (EVENTS_FILE, LAUNCH_FILE, "config.yaml"))


def candidates(runner: Runner, sweep: str) -> list[str]:
    """The run names `SWEEP/CANDIDATE` of one sweep, in folder order."""
    root = runner.root / sweep
    return [f"{sweep}/{p.name}" for p in sorted(root.iterdir()) if _is_run(p)] if root.is_dir() else []


def all_runs(runner: Runner) -> list[str]:
    """Every run, newest first; a sweep's candidates follow right after the sweep's place (its newest file)."""
    out: list[tuple[float, list[str]]] = []
    for p in runner.root.iterdir() if runner.root.is_dir() else []:
        if not p.is_dir() or not is_folder_name(p.name):
            continue
        if is_sweep(p):
            names = candidates(runner, p.name)
            if names:
                out.append((max(_mtime(runner.run_path(n)) for n in names), names))
        elif _is_run(p):
            out.append((_mtime(p), [p.name]))
    return [n for _, names in sorted(out, key=lambda t: -t[0]) for n in names]


def _mtime(path: Path) -> float:
    return max([(path / f).stat().st_mtime for f in (EVENTS_FILE, LAUNCH_FILE, "app.json", "config.yaml")
                if (path / f).exists()] or [0.0])


def finished(runner: Runner) -> list[str]:
    """Runs with an adapter to evaluate, chat with or export (sweep candidates included), newest first."""
    return [n for n in all_runs(runner) if (runner.run_path(n) / "adapter.safetensors").is_file()]


def label(name: str) -> str:
    """What a picker shows for a run: a sweep candidate as `SWEEP › CANDIDATE (sweep)`."""
    if "/" in name:
        sweep, cand = name.split("/", 1)
        return f"{sweep} › {cand} (sweep candidate)"
    return name


def choices(names: list[str]) -> list[tuple[str, str]]:
    """(label, name) pairs for a Dropdown."""
    return [(label(n), n) for n in names]


def pick(names: list[str], focus: str | None, current: str | None) -> str | None:
    """The run a tab offers: the focus run when it is among `names`, else the tab's current one, else the newest."""
    for want in (focus, current):
        if want and want in names:
            return want
    return names[0] if names else None


@dataclass
class RunRow:
    """One line of the runs table."""

    name: str
    status: str
    started: float | None
    step: int
    total_steps: int
    final_loss: float | None
    score: str  # accuracy on the run's benchmarks (or the app's last evaluation), e.g. "eval.json 93.0%"
    strategy: str
    finished: bool

    @property
    def date(self) -> str:
        """When it started, as YYYY-mm-dd HH:MM (– when never)."""
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started)) if self.started else "–"


def run_config(path: Path) -> dict:
    """The config a run trained with (config.yaml, else the app's launch.yaml), or {}."""
    for name in ("config.yaml", LAUNCH_FILE):
        try:
            data = yaml.safe_load((path / name).read_text())
            if isinstance(data, dict):
                return data
        except (OSError, yaml.YAMLError):
            continue
    return {}


def strategy_of(cfg: dict) -> str:
    """`embedded lora (inside) r8 + attention LoRA`, from a config dict."""
    a, r = cfg.get("adapter") or {}, cfg.get("routing") or {}
    if not a and not r:
        return "–"
    text = f"{r.get('strategy', '?')} {a.get('kind', 'lora')}"
    text += f" ({a['placement']})" if a.get("placement") == "inside" else ""
    text += f" r{a['rank']}" if a.get("rank") else ""
    return text + (" + attention LoRA" if r.get("attention_lora") else "")


def score_of(path: Path, accuracy: dict) -> str:
    """Accuracy per benchmark, from the run's events, else from the app's last evaluation of it."""
    parts = [f"{Path(b).name} {100 * a:.1f}%" for b, a in accuracy.items() if isinstance(a, float)]
    if not parts:
        try:
            saved = json.loads((path / RESULTS_FILE).read_text())
            parts = [f"{Path(str(r['benchmark'])).name} {100 * float(r['tuned']):.1f}%" for r in saved.get("rows", [])]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return ", ".join(parts) or "–"


def rows(runner: Runner) -> list[RunRow]:
    """The runs table: every run's facts, newest first."""
    out = []
    for name in all_runs(runner):
        s, path = runner.state(name), runner.run_path(name)
        out.append(RunRow(name, s.status, s.first_started, s.step, s.total_steps, s.final_loss,
                          score_of(path, s.accuracy), strategy_of(run_config(path)),
                          (path / "adapter.safetensors").is_file()))
    return out
