"""Reading dataset rows from files and checking them against a format.

Files: JSON (a list of objects, or JSON lines in a .json file), JSONL, CSV (with a header), Parquet,
a saved HF dataset folder (`save_to_disk`), or a folder of such files (a hub snapshot).
Formats: `alpaca` (instruction / input / output), `llm-adapters` (Alpaca plus `answer`, the
commonsense_170k / math_10k layout) and `chat` (`messages` of {role, content}; ShareGPT's
`conversations` of {from, value} is read as chat too).
"""

from __future__ import annotations

import csv
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError

FORMATS = ("alpaca", "llm-adapters", "chat")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
#: ShareGPT speaker names -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
#: fields each format accepts; `id` is accepted everywhere and ignored
FIELDS = {
    "alpaca": ("instruction", "input", "output", "answer", "id"),
    "llm-adapters": ("instruction", "input", "output", "answer", "id"),
    "chat": ("messages", "system", "id"),
    "sharegpt": ("conversations", "system", "id"),
}
_FIX_COLUMNS = ('rename the field in the file, or add a dataset registry entry that maps it with '
                '"columns" (e.g. {"output": "response"}) or drops it with "ignore_columns"')


@dataclass
class Row:
    """One raw row of a dataset file, with where it came from (for error messages)."""

    file: Path
    number: int  # 1-based: the item of a JSON list, the line of a JSONL file, the data row of a CSV
    data: Any
    unit: str = "row"

    @property
    def where(self) -> str:
        """'FILE, row N' (or 'line N' for JSON lines), for error messages."""
        return f"{self.file}, {self.unit} {self.number}"


@dataclass
class Record:
    """One checked row in the shape templates read: Alpaca fields, or chat `messages`."""

    where: str
    number: int
    instruction: str = ""
    input: str = ""
    output: str = ""
    answer: str | None = None
    messages: list[dict] | None = None

    @property
    def is_chat(self) -> bool:
        """Whether the record is a chat conversation."""
        return self.messages is not None


# ---- reading files ---------------------------------------------------------------------------

def read_rows(path: str | Path, split: str | None = None) -> list[Row]:
    """All rows of a dataset file or folder, in file order; raises DataError for a missing,
    unreadable or empty source."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; give a JSON, JSONL, CSV or Parquet file, "
                        "a saved HF dataset folder, or a name from the dataset registry.")
    if path.is_dir():
        rows = _read_folder(path, split)
    else:
        rows = _read_file(path)
    if not rows:
        raise DataError(f"{path} holds no rows; a dataset needs at least one example.")
    return rows


def _read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use one of "
                    f"{', '.join(FILE_SUFFIXES)} or a saved HF dataset folder.")


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); save it as UTF-8.") from None


def _read_json(path: Path) -> list[Row]:
    text = _text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines in a .json file (HF accepts it)
            return _parse_jsonl(path, text)
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                        "fix the file (a JSON list of objects, or one object per line).") from None
    if isinstance(data, dict):
        raise DataError(f"{path} holds one JSON object; a dataset file must be a JSON list of row objects "
                        "(or JSON lines, one object per line).")
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; a dataset file must be a JSON list of "
                        "row objects.")
    return [Row(path, i + 1, item) for i, item in enumerate(data)]


def _read_jsonl(path: Path) -> list[Row]:
    return _parse_jsonl(path, _text(path))


def _parse_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(Row(path, n, json.loads(line), unit="line"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                            "fix the line or remove it (JSON lines hold one object per line).") from None
    return rows


def _read_csv(path: Path) -> list[Row]:
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            for n, item in enumerate(reader, 1):
                if None in item:
                    raise DataError(f"{path}, row {n}: has more values than the header has columns "
                                    f"({', '.join(reader.fieldnames or [])}); quote values that hold commas.")
                rows.append(Row(path, n, {k: v for k, v in item.items()}))
        except csv.Error as e:
            raise DataError(f"{path}, row {reader.line_num}: not valid CSV ({e}).") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e}); save it as UTF-8.") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path} is not a readable Parquet file ({e}).") from None
    return [Row(path, i + 1, item) for i, item in enumerate(table.to_pylist())]


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def _read_folder(path: Path, split: str | None) -> list[Row]:
    if _is_saved_dataset(path):
        return _read_saved(path, split)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path} is a folder with no dataset files ({', '.join(FILE_SUFFIXES)}) and is not a "
                        "saved HF dataset (no dataset_dict.json or state.json).")
    chosen = _split_files(path, files, split)
    rows: list[Row] = []
    for f in chosen:
        rows.extend(_read_file(f))
    return rows


def _split_files(root: Path, files: list[Path], split: str | None) -> list[Path]:
    """The files of one split in a hub-style folder (`train-00000.parquet`, `data/train/...`)."""
    import re

    def words(p: Path) -> set[str]:
        return set(re.split(r"[-_./\\]+", str(p.relative_to(root)).lower()))

    want = (split or "train").lower()
    picked = [f for f in files if want in words(f)]
    if picked:
        return picked
    if split is None:
        return files
    raise DataError(f"{root}: no file of split {split!r} among {', '.join(str(f.relative_to(root)) for f in files)}; "
                    "choose another split or point at a file.")


def _read_saved(path: Path, split: str | None) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path} could not be read as a saved HF dataset ({e}).") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            split = "train" if "train" in ds else (names[0] if len(names) == 1 else None)
        if split not in ds:
            raise DataError(f"{path} has splits {', '.join(names)}; choose one with \"split\" in the dataset "
                            f"registry entry (asked for {split!r}).")
        ds = ds[split]
    elif split is not None and split != "train":
        raise DataError(f"{path} is a single saved split; remove \"split\": {split!r} from the registry entry.")
    return [Row(path, i + 1, item) for i, item in enumerate(ds.to_list())]


# ---- checking rows ---------------------------------------------------------------------------

def apply_columns(row: Row, columns: dict[str, str], ignore: list[str] | tuple[str, ...]) -> Row:
    """A row with its columns renamed (`{our_field: their_column}`) and ignored columns removed."""
    if not columns and not ignore:
        return row
    if not isinstance(row.data, dict):
        return row
    data = dict(row.data)
    for name in ignore:
        data.pop(name, None)
    for ours, theirs in columns.items():
        if theirs in data:
            data[ours] = data.pop(theirs)
    return Row(row.file, row.number, data, row.unit)


def _require_object(row: Row) -> dict:
    if not isinstance(row.data, dict):
        raise DataError(f"{row.where}: expected a JSON object of fields, got {type(row.data).__name__} "
                        f"{_short(row.data)}; every row must be an object like "
                        '{"instruction": ..., "output": ...} or {"messages": [...]}.')
    return row.data


def detect_format(row: Row) -> str:
    """The format a row's fields show: `chat` (messages / conversations), `llm-adapters` (Alpaca +
    answer) or `alpaca`; raises DataError naming the fields when none fits."""
    data = _require_object(row)
    if "messages" in data or "conversations" in data:
        return "chat"
    if "instruction" in data:
        return "llm-adapters" if "answer" in data else "alpaca"
    raise DataError(f"{row.where}: cannot tell the dataset format from its fields {sorted(map(str, data))}; "
                    "expected Alpaca (instruction, input, output), LLM-Adapters (instruction, input, output, "
                    "answer) or chat (messages: [{role, content}, ...]). Fix: " + _FIX_COLUMNS + ".")


def _unknown_fields(row: Row, data: dict, allowed: tuple[str, ...], fmt: str) -> None:
    for key in data:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            fields = ", ".join(a for a in allowed if a != "id")
            raise DataError(f"{row.where}: unknown field {key!r}{hint}; a {fmt} row has the fields {fields}. "
                            f"Fix: {_FIX_COLUMNS}.")


def _string(row: Row, data: dict, name: str, *, required: bool, empty_ok: bool = False) -> str:
    value = data.get(name)
    if value is None:
        if required:
            raise DataError(f"{row.where}: field {name!r} is missing; add it to every row.")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{row.where}: field {name!r} must be text, got {type(value).__name__} {_short(value)}.")
    value = value if isinstance(value, str) else str(value)
    if required and not empty_ok and not value.strip():
        raise DataError(f"{row.where}: field {name!r} is empty; give it text or remove the row.")
    return value


def to_record(row: Row, fmt: str, need_output: bool = True) -> Record:
    """Check one row against a format and return it as a Record; raises DataError naming the file,
    row and field. `need_output=False` reads test rows, whose label is `answer`."""
    data = _require_object(row)
    if fmt == "chat":
        return _chat_record(row, data)
    if fmt not in ("alpaca", "llm-adapters"):
        raise DataError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)} or 'auto'.")
    if "messages" in data or "conversations" in data:
        raise DataError(f"{row.where}: field 'messages' makes this a chat row, but the format is {fmt}; "
                        "use template 'chat' (and format 'chat' or 'auto').")
    _unknown_fields(row, data, FIELDS[fmt], fmt)
    instruction = _string(row, data, "instruction", required=True)
    inp = _string(row, data, "input", required=False)
    answer = _string(row, data, "answer", required=fmt == "llm-adapters" or not need_output) or None
    output = _string(row, data, "output", required=False)
    if need_output and not output.strip():
        if fmt == "llm-adapters" and answer:
            output = answer  # LLM-Adapters test rows (mawps) carry only the answer
        elif "output" not in data or data["output"] is None:
            raise DataError(f"{row.where}: field 'output' is missing; add the response text to every row.")
        else:
            raise DataError(f"{row.where}: field 'output' is empty; give the response text or remove the row.")
    return Record(where=row.where, number=row.number, instruction=instruction, input=inp, output=output,
                  answer=answer)


def _chat_record(row: Row, data: dict) -> Record:
    sharegpt = "conversations" in data and "messages" not in data
    key = "conversations" if sharegpt else "messages"
    _unknown_fields(row, data, FIELDS["sharegpt" if sharegpt else "chat"], "chat")
    turns = data.get(key)
    if isinstance(turns, str):  # CSV cells hold the list as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise DataError(f"{row.where}: field {key!r} is text that is not valid JSON ({e.msg}); "
                            "give a list of {role, content} objects.") from None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.where}: field {key!r} must be a non-empty list of "
                        f"{'{from, value}' if sharegpt else '{role, content}'} objects, got {_short(turns)}.")
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{row.where}: field {field!r} must be an object with {role_key!r} and {text_key!r}, "
                            f"got {_short(turn)}.")
        for k in turn:
            if k not in (role_key, text_key):
                raise DataError(f"{row.where}: unknown field '{field}.{k}'; a message has only {role_key!r} and "
                                f"{text_key!r}.")
        role = turn.get(role_key)
        role = SHAREGPT_ROLES.get(role, role) if sharegpt else role
        if role not in ROLES:
            allowed = ", ".join(SHAREGPT_ROLES) if sharegpt else ", ".join(ROLES)
            raise DataError(f"{row.where}: field '{field}.{role_key}' is {turn.get(role_key)!r}; use one of {allowed}.")
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise DataError(f"{row.where}: field '{field}.{text_key}' must be text, got {_short(content)}.")
        if role == "assistant" and not content.strip():
            raise DataError(f"{row.where}: field '{field}.{text_key}' is an empty assistant message; "
                            "give the response text or remove the row.")
        messages.append({"role": role, "content": content})
    system = data.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{row.where}: field 'system' must be text, got {_short(system)}.")
        if messages[0]["role"] == "system":
            raise DataError(f"{row.where}: field 'system' and a first message with role 'system' both give the "
                            "system prompt; keep one.")
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.where}: field {key!r} has no assistant message, so there is nothing to learn; "
                        "add the response or remove the row.")
    return Record(where=row.where, number=row.number, messages=messages)


def _short(value: Any, n: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= n else text[:n] + "…"


def read_records(path: str | Path, fmt: str = "auto", *, split: str | None = None,
                 columns: dict[str, str] | None = None, ignore_columns: list[str] | tuple[str, ...] = (),
                 need_output: bool = True, limit: int | None = None) -> tuple[list[Record], str]:
    """Read and check every row of a dataset; returns the records and the format (detected from the
    first row when `fmt` is 'auto'). A malformed row raises DataError naming file, row and field."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)} or 'auto'.")
    rows = read_rows(path, split)
    if limit is not None:
        rows = rows[:limit]
    rows = [apply_columns(r, columns or {}, ignore_columns) for r in rows]
    if fmt == "auto":
        fmt = detect_format(rows[0])
    return [to_record(r, fmt, need_output) for r in rows], fmt
