"""Where things are: the project root, the runs folder, the dataset registry, recent models, and the
one rule for relative paths in presets and in the app's fields.

Relative paths rule: a relative `model.path`, `data.train`, `data.eval` or benchmark file in a preset
(or typed into the app) is relative to the **project root** — the folder that holds `presets/` and
`assets/` — whatever the current directory is. `~` is expanded. Registry names stay names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = ROOT / "presets"
DEMO_MODEL = "assets/demo/model"
DEMO_TRAIN = "assets/demo/train.jsonl"
DEMO_EVAL = "assets/demo/eval.json"
RUNS_ENV = "MOETUNE_RUNS"
REGISTRY_ENV = "MOETUNE_DATASETS"  # the same variable engine/data/registry.py reads
DATA_ROOT_ENV = "MOETUNE_EVAL_DATA"  # the same variable engine/evaluate/benchmarks.py reads
DEFAULT_REGISTRY = ROOT / "assets" / "datasets.json"
RECENT_FILE = ".recent_models.json"
MAX_RECENT = 10


def runs_dir() -> Path:
    """The folder runs live in: $MOETUNE_RUNS, else `runs/` in the project root (created on demand)."""
    path = Path(os.environ.get(RUNS_ENV) or ROOT / "runs").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_folder_name(name: str) -> bool:
    """Whether `name` is one folder name: not empty, no `/` or `\\`, not `.` or `..` (so never absolute)."""
    return isinstance(name, str) and name.strip() == name and name not in ("", ".", "..") \
        and not any(c in name for c in "/\\\0") and len(name.encode()) <= 255


def child_folder(parent: Path, name: str, what: str) -> Path:
    """`parent / name` for `name` one folder name (surrounding spaces dropped), so the app writes nowhere but
    inside `parent`; otherwise ValueError naming the field `what` and the fix."""
    text = name.strip() if isinstance(name, str) else ""
    if not is_folder_name(text):
        raise ValueError(f"{what}: {name!r} is not a folder name; give one name, without '/' or '..', "
                         f"for a folder inside {parent}.")
    return Path(parent) / text


def resolve_path(value: str, base: Path = ROOT) -> str:
    """An absolute path for a relative or `~` path (relative to the project root); other values unchanged."""
    if not isinstance(value, str) or not value.strip():
        return value
    p = Path(value.strip()).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_data(value: str, base: Path = ROOT) -> str:
    """`data.train` / a benchmark: a registry or benchmark name stays as it is; an existing file or
    folder (relative to the project root, or `~`) becomes absolute."""
    if not isinstance(value, str) or not value.strip():
        return value
    if value.startswith("~") or Path(value).is_absolute():
        return str(Path(value).expanduser())
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def resolve_config_paths(data: dict, base: Path = ROOT) -> dict:
    """A config dict with its paths made absolute by the relative-paths rule (a new dict)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    model, dat, ev = out.get("model") or {}, out.get("data") or {}, out.get("eval") or {}
    if model.get("path"):
        model["path"] = resolve_path(model["path"], base)
    for key in ("train", "eval"):
        if dat.get(key):
            dat[key] = resolve_data(dat[key], base)
    if isinstance(ev.get("benchmarks"), list):
        ev["benchmarks"] = [resolve_data(b, base) if isinstance(b, str) else b for b in ev["benchmarks"]]
    return out


def display_path(value: str) -> str:
    """A path shown relative to the project root when it lies inside it."""
    try:
        return str(Path(value).resolve().relative_to(ROOT))
    except (ValueError, OSError):
        return value


def registry_datasets() -> dict[str, dict]:
    """The dataset registry's entries (name -> entry), read as JSON without importing the engine's
    data package (which imports torch); {} when there is none or it is malformed (training reports it)."""
    path = Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, dict)} if isinstance(raw, dict) else {}


def registry_file(entry: dict) -> Path | None:
    """The file a registry entry points at (relative to the registry file, as engine/data/registry.py reads it)."""
    file = entry.get("file")
    if not isinstance(file, str) or not file:
        return None
    path = Path(file).expanduser()
    reg = Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).expanduser()
    return path if path.is_absolute() else reg.parent / path


def recent_models() -> list[str]:
    """Model folders used by recent runs, newest first (kept in the runs folder)."""
    try:
        items = json.loads((runs_dir() / RECENT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [m for m in items if isinstance(m, str)][:MAX_RECENT]


def remember_model(path: str) -> None:
    """Put a model folder at the top of the recent models."""
    from engine.io import atomic_write_json

    items = [path] + [m for m in recent_models() if m != path]
    atomic_write_json(runs_dir() / RECENT_FILE, items[:MAX_RECENT])
