"""One-click presets: the YAML files in `presets/`, each a valid config with a title and description.

The demo preset comes first; the others follow by file name. Paths inside a preset are relative to
the project root (see `app.paths`); they are kept as written here and resolved when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from engine import config as C

from .paths import PRESETS_DIR

DEMO = "demo"


@dataclass
class Preset:
    """A preset file: its name (the file stem), title, description and where it is."""

    name: str
    title: str
    description: str
    path: Path

    @property
    def label(self) -> str:
        """What the preset picker shows."""
        return self.title or self.name


def list_presets(folder: Path = PRESETS_DIR) -> list[Preset]:
    """The presets in `folder`, the demo first; a file that is not valid YAML is skipped here (the
    preset test and `load_preset` report it)."""
    out = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(raw, dict):
            out.append(Preset(path.stem, str(raw.get("title") or path.stem), str(raw.get("description") or ""), path))
    return sorted(out, key=lambda p: (p.name != DEMO, p.name))


def preset_path(name: str, folder: Path = PRESETS_DIR) -> Path:
    """The file of a preset name, or a ConfigError listing the presets there are."""
    path = folder / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(p.name for p in list_presets(folder)) or "none"
        raise C.ConfigError(f"preset {name!r} does not exist in {folder}; presets: {names}.")
    return path


def load_preset(name: str, folder: Path = PRESETS_DIR) -> C.Config:
    """A preset as a validated Config (paths as written in the file)."""
    return C.load(preset_path(name, folder))
