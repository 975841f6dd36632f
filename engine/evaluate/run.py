"""Benchmark runs: batched generation (left padding, greedy or beam search) on any HF causal LM,
answer extraction, accuracy per benchmark and their average, and a predictions file of every row.

The base model (no adapter) is evaluated the same way — pass it as `model` — and `compare` puts
the two results side by side.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data import DataError, check_template, generation_prompt
from ..data.templates import require_chat_template
from ..io import atomic_path, atomic_write_json
from .benchmarks import Benchmark, EvalRow, expand_benchmarks, load_benchmark_rows, resolve_benchmark
from .extract import extract, is_correct

#: end-of-turn tokens of common chat templates; generation stops on them under the chat template
CHAT_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>")

Progress = Callable[[str, int, int], None]  # (benchmark name, rows done, rows in all)


@dataclass
class Prediction:
    """One scored row: the prompt, the model's output, what was extracted from it, and the label."""

    row: int
    prompt: str
    output: str
    extracted: str | float | None
    label: str | float
    correct: bool


@dataclass
class BenchResult:
    """The score of one benchmark run."""

    name: str
    title: str
    suite: str
    file: str
    rows: int
    correct: int
    accuracy: float
    unanswered: int  # outputs from which no answer could be extracted
    template: str
    num_beams: int
    max_new_tokens: int
    seconds: float
    predictions_file: str | None = None
    predictions: list[Prediction] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """The result without its per-row predictions (JSON ready)."""
        d = asdict(self)
        d.pop("predictions")
        return d


@dataclass
class SuiteResult:
    """Several benchmark results and their unweighted average accuracy (the papers' "Avg.")."""

    results: list[BenchResult]

    @property
    def average(self) -> float:
        """The unweighted mean of the benchmarks' accuracies."""
        return sum(r.accuracy for r in self.results) / len(self.results) if self.results else 0.0

    def accuracies(self) -> dict[str, float]:
        """Accuracy by benchmark name."""
        return {r.name: r.accuracy for r in self.results}

    def to_dict(self) -> dict:
        """Per-benchmark results and the average (JSON ready)."""
        return {"benchmarks": [r.to_dict() for r in self.results], "average": self.average}

    def table(self) -> str:
        """A plain-text table: one line per benchmark, then the average."""
        lines = [f"{'benchmark':<12} {'rows':>6} {'correct':>8} {'accuracy':>9}"]
        lines += [f"{r.title:<12} {r.rows:>6} {r.correct:>8} {100 * r.accuracy:>8.2f}%" for r in self.results]
        lines.append(f"{'average':<12} {'':>6} {'':>8} {100 * self.average:>8.2f}%")
        return "\n".join(lines)


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def stop_token_ids(model: nn.Module, tokenizer, chat: bool = False) -> list[int]:
    """Token ids that end a generation: the tokenizer's and model's EOS, plus end-of-turn tokens under chat."""
    ids: list[int] = []
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids += source if isinstance(source, (list, tuple)) else ([source] if source is not None else [])
    if chat:
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in CHAT_STOP_TOKENS if t in vocab]
    return list(dict.fromkeys(int(i) for i in ids))


def generate(model: nn.Module, tokenizer, prompts: list[str], *, add_special_tokens: bool = True,
             batch_size: int = 8, num_beams: int = 1, max_new_tokens: int = 32, stop_ids: list[int] | None = None,
             on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy (or beam) continuations of prompts, batched with left padding (longest prompts first);
    returns the decoded new text of each prompt, in the prompts' order, cut at the first stop token."""
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise ValueError("batch_size, num_beams and max_new_tokens must be at least 1.")
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids if stop_ids is not None else stop_token_ids(model, tokenizer)
    device = _device(model)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    n = len(encoded[i])
                    ids[r, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
                    mask[r, width - n:] = 1
                seq = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                     pad_token_id=pad, eos_token_id=stops or None)
                for r, i in enumerate(idx):
                    new = seq[r, width:].tolist()
                    for k, t in enumerate(new):
                        if t in stops:
                            new = new[:k]
                            break
                    outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
                if on_batch is not None:
                    on_batch(len(idx))
    finally:
        model.train(was_training)
    return outputs


def score(bench: Benchmark, rows: list[EvalRow], prompts: list[str], outputs: list[str]) -> list[Prediction]:
    """Extract each output's answer by the benchmark's rule and compare it with the row's label."""
    if not (len(rows) == len(prompts) == len(outputs)):
        raise ValueError(f"score needs one prompt and one output per row: {len(rows)} rows, {len(prompts)} prompts, "
                         f"{len(outputs)} outputs.")
    preds = []
    for row, prompt, out in zip(rows, prompts, outputs):
        got = extract(bench.rule, out)
        preds.append(Prediction(row.number, prompt, out, got, row.label, is_correct(bench.rule, got, row.label)))
    return preds


def write_predictions(path: str | Path, preds: list[Prediction]) -> Path:
    """Write every prediction as one JSON line, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in preds:
                f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
    return path


def evaluate(model: nn.Module, tokenizer, bench: str | Path, *, data_root: str | Path | None = None,
             limit: int | None = None, batch_size: int = 8, num_beams: int = 1, max_new_tokens: int | None = None,
             template: str = "alpaca", predictions_path: str | Path | None = None,
             progress: Progress | None = None) -> BenchResult:
    """Score a model on one benchmark (a NAME under `data_root`, or a test FILE): generate for every
    row (or the first `limit`), extract answers, count accuracy; write every prediction to
    `predictions_path` (JSONL) when given."""
    check_template(template)
    if template == "chat":
        try:
            require_chat_template(tokenizer)
        except DataError as e:
            raise DataError(f"evaluation with {e}") from None
    benchmark, path = resolve_benchmark(bench, data_root)
    rows = load_benchmark_rows(benchmark, path, limit)
    new_tokens = max_new_tokens or benchmark.max_new_tokens
    prompts, special = [], True
    for r in rows:
        text, special = generation_prompt(template, r.instruction, r.input, tokenizer)
        prompts.append(text)
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(benchmark.name, done, len(rows))

    t0 = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, add_special_tokens=special, batch_size=batch_size,
                       num_beams=num_beams, max_new_tokens=new_tokens,
                       stop_ids=stop_token_ids(model, tokenizer, chat=template == "chat"), on_batch=on_batch)
    preds = score(benchmark, rows, prompts, outputs)
    correct = sum(p.correct for p in preds)
    result = BenchResult(name=benchmark.name, title=benchmark.title, suite=benchmark.suite, file=str(path),
                         rows=len(preds), correct=correct, accuracy=correct / len(preds),
                         unanswered=sum(p.extracted is None for p in preds), template=template, num_beams=num_beams,
                         max_new_tokens=new_tokens, seconds=round(time.perf_counter() - t0, 3), predictions=preds)
    if predictions_path is not None:
        result.predictions_file = str(write_predictions(predictions_path, preds))
    return result


def evaluate_many(model: nn.Module, tokenizer, benches: list[str] | str, *, out_dir: str | Path | None = None,
                  **kwargs) -> SuiteResult:
    """Run several benchmarks (suite names 'commonsense' / 'math' expand to theirs); with `out_dir`,
    write `<name>.predictions.jsonl` per benchmark and `results.json` (accuracies and average).
    Other keyword arguments go to `evaluate`."""
    names = expand_benchmarks(benches)
    if not names:
        raise DataError("no benchmarks given; name at least one (e.g. boolq), a suite (commonsense, math) or a file.")
    results = []
    for spec in names:
        pred_path = None
        if out_dir is not None:
            bench, _ = resolve_benchmark(spec, kwargs.get("data_root"))
            pred_path = Path(out_dir) / f"{bench.name}.predictions.jsonl"
        results.append(evaluate(model, tokenizer, spec, predictions_path=pred_path, **kwargs))
    suite = SuiteResult(results)
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "results.json", suite.to_dict())
    return suite


def compare(base: SuiteResult, tuned: SuiteResult) -> dict:
    """The base model's and the tuned model's accuracy per benchmark, with the difference, and the averages."""
    b = base.accuracies()
    rows = [{"benchmark": r.name, "base": b.get(r.name), "tuned": r.accuracy,
             "delta": None if r.name not in b else r.accuracy - b[r.name]} for r in tuned.results]
    return {"benchmarks": rows, "average": {"base": base.average, "tuned": tuned.average,
                                            "delta": tuned.average - base.average}}
