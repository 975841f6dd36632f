"""The published releases MoETune knows: the flagship `config.json` values in engine/model/arch/published/, read
as plain JSON (no torch, no transformers), so the app's model picker can list them at start-up and a preset can
be planned before its model is downloaded. A release is expected at ~/models/<name> (where the presets look)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PUBLISHED_DIR = Path(__file__).resolve().parent / "model" / "arch" / "published"
#: where the presets (and the model picker) expect a release's checkpoint folder
MODELS_DIR = "~/models"


@dataclass(frozen=True)
class Release:
    """One published release: its name (the hub repository's, and its folder's), model_type and config file."""

    name: str
    model_type: str
    config: Path

    @property
    def folder(self) -> str:
        """Where the presets expect its checkpoint: ~/models/<name>."""
        return f"{MODELS_DIR}/{self.name}"

    def downloaded(self) -> bool:
        """Whether a checkpoint (its config.json) is in its folder."""
        return (Path(self.folder).expanduser() / "config.json").is_file()


def published_releases() -> list[Release]:
    """Every release of published/, by name."""
    return [Release(f.stem, json.loads(f.read_text(encoding="utf-8")).get("model_type", ""), f)
            for f in sorted(PUBLISHED_DIR.glob("*.json"), key=lambda f: f.stem.lower())]


def release_named(name: str) -> Release | None:
    """The release a folder name stands for (e.g. a preset's ~/models/Mixtral-8x7B-v0.1), or None."""
    return next((r for r in published_releases() if r.name == name), None)
