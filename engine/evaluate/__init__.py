"""Benchmark evaluation: the LLM-Adapters commonsense and math suites read from their test files,
batched generation, answer extraction by the suites' conventions, accuracy and a predictions file.

Entry points: `evaluate(model, tokenizer, bench, ...)` -> BenchResult,
`evaluate_many(model, tokenizer, benches, out_dir=...)` -> SuiteResult, `compare(base, tuned)`.
"""

from .benchmarks import (
    BENCHMARKS, DATA_ROOT_ENV, SUITES, Benchmark, EvalRow, data_root, expand_benchmarks, find_benchmark,
    get_benchmark, load_benchmark_rows, resolve_benchmark,
)
from .extract import MATH_TOLERANCE, RULES, extract, infer_rule, is_correct, parse_label
from .run import (
    BenchResult, Prediction, SuiteResult, compare, evaluate, evaluate_many, generate, score, stop_token_ids,
    write_predictions,
)

__all__ = ["BENCHMARKS", "DATA_ROOT_ENV", "MATH_TOLERANCE", "RULES", "SUITES", "BenchResult", "Benchmark", "EvalRow",
           "Prediction", "SuiteResult", "compare", "data_root", "evaluate", "evaluate_many", "expand_benchmarks",
           "extract", "find_benchmark", "generate", "get_benchmark", "infer_rule", "is_correct", "load_benchmark_rows",
           "parse_label", "resolve_benchmark", "score", "stop_token_ids", "write_predictions"]
