"""The benchmarks: names (and aliases) -> suite, extraction rule and generation length, and how a
name or a file becomes the rows to score.

A NAME is looked up under a data root laid out like LLM-Adapters' `dataset/` folder
(`<root>/<folder>/test.json`, e.g. `dataset/ARC-Challenge/test.json`); the root is an argument, else
$MOETUNE_EVAL_DATA, else `./dataset`. A FILE is read directly; its benchmark comes from its folder
name, else from what its labels look like.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..data import DataError, read_rows
from .extract import infer_rule, parse_label

DATA_ROOT_ENV = "MOETUNE_EVAL_DATA"
#: LLM-Adapters' commonsense targets read "the correct answer is answer3": 5+ tokens, so the paper's
#: 4 new tokens would cut the label off; 32 is LLM-Adapters' own commonsense setting.
COMMONSENSE_NEW_TOKENS = 32
MATH_NEW_TOKENS = 256


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its canonical name, display title, LLM-Adapters folder, suite and rule."""

    name: str
    title: str
    folder: str
    suite: str  # commonsense | math
    rule: str  # an extraction rule of engine.evaluate.extract
    max_new_tokens: int
    aliases: tuple[str, ...] = ()


def _cs(name, title, folder, rule, *aliases) -> Benchmark:
    return Benchmark(name, title, folder, "commonsense", rule, COMMONSENSE_NEW_TOKENS, aliases)


def _math(name, title, folder, rule="number", *aliases) -> Benchmark:
    return Benchmark(name, title, folder, "math", rule, MATH_NEW_TOKENS, aliases)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    _cs("boolq", "BoolQ", "boolq", "true-false"),
    _cs("piqa", "PIQA", "piqa", "solution"),
    _cs("siqa", "SIQA", "social_i_qa", "answer", "social_iqa", "socialiqa"),
    _cs("hellaswag", "HellaSwag", "hellaswag", "ending", "hellas"),
    _cs("winogrande", "WinoGrande", "winogrande", "option", "wino", "winog"),
    _cs("arc-e", "ARC-e", "ARC-Easy", "answer", "arc_easy", "arceasy"),
    _cs("arc-c", "ARC-c", "ARC-Challenge", "answer", "arc_challenge", "arcchallenge"),
    _cs("obqa", "OBQA", "openbookqa", "answer", "openbook_qa"),
    _math("gsm8k", "GSM8K", "gsm8k"),
    _math("addsub", "AddSub", "AddSub"),
    _math("multiarith", "MultiArith", "MultiArith", "number", "multi_arith"),
    _math("singleeq", "SingleEq", "SingleEq", "number", "single_eq"),
    _math("svamp", "SVAMP", "SVAMP"),
    _math("aqua", "AQuA", "AQuA", "letter"),
    _math("mawps", "MAWPS", "mawps"),
)}
SUITES: dict[str, tuple[str, ...]] = {
    "commonsense": ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "obqa"),
    "math": ("gsm8k", "addsub", "multiarith", "singleeq", "svamp", "aqua"),
}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


_LOOKUP = {_key(k): b for b in BENCHMARKS.values() for k in (b.name, b.title, b.folder, *b.aliases)}


@dataclass
class EvalRow:
    """One test row: where it is, the question, and its label as extraction compares it."""

    number: int
    instruction: str
    input: str
    label: str | float
    answer: str  # the label as written in the file


def find_benchmark(name: str) -> Benchmark | None:
    """The benchmark a name or alias means (case, '-' and '_' ignored), or None."""
    return _LOOKUP.get(_key(name))


def get_benchmark(name: str) -> Benchmark:
    """The benchmark a name means, or a DataError listing the known names."""
    bench = find_benchmark(name)
    if bench is None:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} "
                        f"(or a suite: {', '.join(SUITES)}, or a test.json file).")
    return bench


def expand_benchmarks(specs: list[str] | tuple[str, ...] | str) -> list[str]:
    """Benchmark specs with suite names ('commonsense', 'math') replaced by their members."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for s in specs:
        out.extend(SUITES.get(str(s).lower(), (s,)))
    return out


def data_root(root: str | Path | None = None) -> Path:
    """The folder benchmark names are looked up in: `root`, else $MOETUNE_EVAL_DATA, else ./dataset."""
    return Path(root or os.environ.get(DATA_ROOT_ENV) or "dataset").expanduser()


def resolve_benchmark(spec: str | Path, root: str | Path | None = None) -> tuple[Benchmark, Path]:
    """A benchmark NAME (found as <root>/<folder>/test.json) or FILE -> (benchmark, test file);
    raises DataError saying where the file was looked for."""
    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.is_dir() and (path / "test.json").is_file():
        path = path / "test.json"
    if path.is_file():
        return _file_benchmark(path), path
    bench = find_benchmark(text)
    if bench is None:
        if os.sep in text or "/" in text or path.suffix:
            raise DataError(f"benchmark file {text!r} does not exist; give an existing test file or a benchmark "
                            f"name ({', '.join(BENCHMARKS)}).")
        get_benchmark(text)  # raises the unknown-name error
    base = data_root(root)
    tried = []
    for folder in dict.fromkeys((bench.folder, bench.name, bench.title, *bench.aliases)):
        for candidate in (base / folder / "test.json", base / folder.lower() / "test.json"):
            if candidate.is_file():
                return bench, candidate
            tried.append(str(candidate))
    raise DataError(f"benchmark {bench.name!r}: its test file {tried[0]} does not exist. Fix: put LLM-Adapters' "
                    f"dataset/{bench.folder}/test.json there, point the data root at the folder that holds "
                    f"{bench.folder}/ (argument data_root or ${DATA_ROOT_ENV}), or give the file's path.")


def _file_benchmark(path: Path) -> Benchmark:
    for name in (path.parent.name, path.stem):
        bench = find_benchmark(name)
        if bench is not None:
            return bench
    rows = read_rows(path)
    labels = [r.data.get("answer") for r in rows if isinstance(r.data, dict)]
    rule = infer_rule([a for a in labels if a is not None]) if any(a is not None for a in labels) else None
    if rule is None:
        raise DataError(f"{path}: cannot tell which benchmark this is (its folder is not a benchmark name and its "
                        "'answer' values fit no answer rule); put it in a folder named after the benchmark, "
                        f"e.g. boolq/test.json. Known benchmarks: {', '.join(BENCHMARKS)}.")
    suite = "math" if rule in ("number", "letter") else "commonsense"
    proto = next(b for b in BENCHMARKS.values() if b.rule == rule)
    name = path.parent.name if path.stem == "test" else path.stem
    return replace(proto, name=name, title=name, folder=path.parent.name, suite=suite, aliases=())


def load_benchmark_rows(bench: Benchmark, path: str | Path, limit: int | None = None) -> list[EvalRow]:
    """The test rows of a benchmark file (LLM-Adapters format: instruction, input, output, answer);
    a row without a usable `instruction` or `answer` is a DataError naming file, row and field."""
    rows = read_rows(path)
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit {limit} must be at least 1 (or None for every row).")
        rows = rows[:limit]
    out = []
    for r in rows:
        if not isinstance(r.data, dict):
            raise DataError(f"{r.where}: expected an object with 'instruction' and 'answer', got "
                            f"{type(r.data).__name__}.")
        for key in r.data:
            if key not in ("instruction", "input", "output", "answer", "id"):
                raise DataError(f"{r.where}: unknown field {key!r}; a test row has the fields instruction, input, "
                                "output, answer.")
        instruction = r.data.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            what = "is missing" if instruction is None else "must be non-empty text"
            raise DataError(f"{r.where}: field 'instruction' {what}; every test row needs the question.")
        inp = r.data.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{r.where}: field 'input' must be text, got {type(inp).__name__}.")
        raw = r.data.get("answer")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise DataError(f"{r.where}: field 'answer' is missing; every test row needs its label.")
        try:
            label = parse_label(bench.rule, raw)
        except ValueError as e:
            raise DataError(f"{r.where}: field 'answer': {e} (benchmark {bench.name} is scored by rule "
                            f"{bench.rule!r}); fix the label or choose the right benchmark.") from None
        out.append(EvalRow(r.number, instruction, inp, label, str(raw)))
    return out
