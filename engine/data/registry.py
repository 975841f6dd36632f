"""The dataset registry: a JSON file naming datasets for the app's picker and for `data.train`
(like LLaMA-Factory's dataset_info.json). The shipped one is `assets/datasets.json`; set
`MOETUNE_DATASETS` to use another.

    {"my-set": {"file": "data/my_set.jsonl",        # relative to the registry file, or absolute
                "format": "alpaca",                  # auto | alpaca | llm-adapters | chat
                "template": "alpaca",                # the template the picker suggests
                "description": "one line for the picker",
                "columns": {"output": "response"},   # optional: our field <- the file's column
                "ignore_columns": ["category"],      # optional: columns to leave out
                "split": "train",                    # optional: split of a saved HF dataset / hub folder
                "too_long": "truncate",              # optional: truncate | drop rows over max_len
                "long_prompt": "drop",               # optional: drop (counted) | error on rows whose prompt fills max_len
                "source": "where to download it"}}
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .formats import FILE_SUFFIXES, FORMATS
from .templates import TEMPLATES

DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "assets" / "datasets.json"
REGISTRY_ENV = "MOETUNE_DATASETS"
_KEYS = ("file", "format", "template", "description", "columns", "ignore_columns", "split", "too_long",
         "long_prompt", "source")


@dataclass
class DatasetSpec:
    """Where a dataset is and how to read it: a registry entry, or a bare file with defaults."""

    name: str
    file: Path
    format: str = "auto"
    template: str | None = None
    description: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    ignore_columns: list[str] = field(default_factory=list)
    split: str | None = None
    too_long: str = "truncate"
    long_prompt: str = "drop"
    source: str = ""


def registry_path(path: str | Path | None = None) -> Path:
    """The registry file in use: `path`, else $MOETUNE_DATASETS, else the shipped assets/datasets.json."""
    return Path(path or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).expanduser()


def load_registry(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    """All entries of a registry file, checked; a bad entry is a DataError naming the entry and key."""
    reg = registry_path(path)
    if not reg.is_file():
        if path is None and reg == DEFAULT_REGISTRY:
            return {}
        raise DataError(f"dataset registry {str(reg)!r} does not exist; give an existing registry JSON file.")
    try:
        raw = json.loads(reg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"dataset registry {reg} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    if not isinstance(raw, dict):
        raise DataError(f"dataset registry {reg} must be a JSON object of name -> entry.")
    return {name: _entry(reg, name, entry) for name, entry in raw.items()}


def _entry(reg: Path, name: str, entry) -> DatasetSpec:
    where = f"dataset registry {reg}, entry {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: must be an object with at least \"file\".")
    for key in entry:
        if key not in _KEYS:
            near = difflib.get_close_matches(key, _KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise DataError(f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(_KEYS)}.")
    if not isinstance(entry.get("file"), str) or not entry["file"]:
        raise DataError(f"{where}: key 'file' is missing; give the dataset's path (relative to the registry or absolute).")
    checks = {"format": ("auto",) + FORMATS, "template": TEMPLATES, "too_long": ("truncate", "drop"),
              "long_prompt": ("error", "drop")}
    for key, allowed in checks.items():
        if key in entry and entry[key] not in allowed:
            raise DataError(f"{where}: key {key!r} is {entry[key]!r}; choose one of {', '.join(allowed)}.")
    columns = entry.get("columns", {})
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise DataError(f"{where}: key 'columns' must map our field names to the file's column names, "
                        'e.g. {"output": "response"}.')
    ignore = entry.get("ignore_columns", [])
    if not isinstance(ignore, list) or not all(isinstance(c, str) for c in ignore):
        raise DataError(f"{where}: key 'ignore_columns' must be a list of column names.")
    for key in ("description", "split", "source"):
        if key in entry and not isinstance(entry[key], str):
            raise DataError(f"{where}: key {key!r} must be text.")
    file = Path(entry["file"]).expanduser()
    return DatasetSpec(name=name, file=file if file.is_absolute() else reg.parent / file,
                       format=entry.get("format", "auto"), template=entry.get("template"),
                       description=entry.get("description", ""), columns=dict(columns), ignore_columns=list(ignore),
                       split=entry.get("split"), too_long=entry.get("too_long", "truncate"),
                       long_prompt=entry.get("long_prompt", "drop"), source=entry.get("source", ""))


def list_datasets(path: str | Path | None = None) -> list[dict]:
    """The registry's datasets for a picker: name, description, format, template, file, available."""
    return [{"name": s.name, "description": s.description, "format": s.format, "template": s.template,
             "file": str(s.file), "available": s.file.exists(), "source": s.source}
            for s in load_registry(path).values()]


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or Path(spec).suffix.lower() in FILE_SUFFIXES


def resolve_dataset(spec: str | Path | DatasetSpec, registry: str | Path | None = None) -> DatasetSpec:
    """A dataset spec from an existing file or folder, or a registry name; raises DataError saying
    which of the two is missing and what is known."""
    if isinstance(spec, DatasetSpec):
        return spec
    text = str(spec).strip()
    if not text:
        raise DataError("no dataset given; set data.train to a file or a dataset registry name.")
    path = Path(text).expanduser()
    if path.exists():
        return DatasetSpec(name=text, file=path)
    entries = load_registry(registry)
    entry = entries.get(text) or {k.lower(): v for k, v in entries.items()}.get(text.lower())
    if entry is not None:
        if not entry.file.exists():
            get = f" Get it from {entry.source}." if entry.source else ""
            raise DataError(f"dataset {entry.name!r} (registry {registry_path(registry)}) points at {entry.file}, "
                            f"which does not exist; put the file there or fix the entry's \"file\".{get}")
        return entry
    if isinstance(spec, Path) or _looks_like_path(text):
        raise DataError(f"data file {text!r} does not exist; give a JSON, JSONL, CSV or Parquet file, a saved "
                        "HF dataset folder, or a name from the dataset registry.")
    near = difflib.get_close_matches(text, list(entries), n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    known = ", ".join(entries) or "(none)"
    raise DataError(f"{text!r} is neither a file nor a dataset in the registry {registry_path(registry)}.{hint} "
                    f"Known datasets: {known}.")
