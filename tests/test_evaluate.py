"""engine.evaluate: answer extraction for every benchmark of both suites on hand-written outputs,
the math tolerance, benchmark resolution, exact scoring with a scripted model, and real batched
generation on a tiny checkpoint that scores every row and writes a complete predictions file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.data import DataError
from engine.evaluate import (
    BENCHMARKS, SUITES, compare, evaluate, evaluate_many, expand_benchmarks, extract, generate, get_benchmark,
    is_correct, load_benchmark_rows, parse_label, resolve_benchmark,
)

from .conftest import LLM_ADAPTERS

# benchmark, hand-written model output, extracted answer, label in the test file, correct?
OUTPUTS = [
    ("boolq", "the correct answer is false", "false", "false", True),
    ("boolq", "False, so the correct answer is true", "true", "false", False),  # case-sensitive, first match
    ("piqa", "the correct answer is solution2", "solution2", "solution2", True),
    ("siqa", "the correct answer is answer3", "answer3", "answer1", False),
    ("hellaswag", "ending4 is the most plausible, not ending1", "ending4", "ending4", True),
    ("winogrande", "the correct answer is option1", "option1", "option1", True),
    ("arc-e", "answer2", "answer2", "answer2", True),
    ("arc-c", "the correct answer is answer4.", "answer4", "answer4", True),
    ("obqa", "I think answer1 or answer2", "answer1", "answer2", False),
    ("gsm8k", "He needs 24 * 24 = 576 tiles. The answer is 576.", 576.0, "576.0", True),
    ("addsub", "There are 7 - 3 = 4 crayons. The answer is 4", 4.0, "4", True),
    ("multiarith", "That makes 1,250 books in all. The answer is 1,250.", 1250.0, "1250.0", True),
    ("singleeq", "So x = -3.5", -3.5, "-3.5", True),
    ("svamp", "Each person ate 128 / 4 = 32 crackers. The answer is 32.", 32.0, "8.0", False),
    ("aqua", "The difference is $1.23. The answer is (D).", "D", "A", False),
    ("aqua", "(B) is right: 4 + 4 = 8", "B", "B", True),
    ("mawps", "The green one was 1.8333 inches longer.", 1.8333, "1.8333333333333335", True),
]


@pytest.mark.parametrize("name,output,expected,label,correct", OUTPUTS)
def test_extraction_of_hand_written_outputs(name, output, expected, label, correct):
    rule = get_benchmark(name).rule
    got = extract(rule, output)
    assert got == expected
    assert is_correct(rule, got, parse_label(rule, label)) is correct


def test_every_benchmark_of_both_suites_has_hand_written_cases():
    covered = {name for name, *_ in OUTPUTS}
    assert set(SUITES["commonsense"]) | set(SUITES["math"]) <= covered
    assert covered == set(BENCHMARKS)
    assert SUITES["commonsense"] == ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "obqa")
    assert SUITES["math"] == ("gsm8k", "addsub", "multiarith", "singleeq", "svamp", "aqua")


def test_outputs_without_an_answer_extract_none_and_are_wrong():
    cases = [("boolq", "True.", "true"), ("piqa", "the first one", "solution1"), ("siqa", "Answer3", "answer3"),
             ("hellaswag", "ending 2", "ending2"), ("winogrande", "Option1", "option1"),
             ("gsm8k", "I do not know.", "3"), ("aqua", "none of these", "A")]
    for name, text, label in cases:
        rule = get_benchmark(name).rule
        assert extract(rule, text) is None, name
        assert not is_correct(rule, None, parse_label(rule, label))


def test_aqua_takes_the_first_capital_a_to_e_anywhere():
    assert extract("letter", "Answer: C") == "A"  # the suite's convention, kept for comparable numbers
    assert extract("letter", "the answer is e") is None


def test_math_tolerance_is_one_thousandth():
    label = parse_label("number", "8.0")
    assert is_correct("number", extract("number", "The answer is 8.0009"), label)
    assert is_correct("number", extract("number", "The answer is 7.9991"), label)
    assert is_correct("number", extract("number", "The answer is 8.001"), label)
    assert not is_correct("number", extract("number", "The answer is 8.0011"), label)
    assert not is_correct("number", extract("number", "8 apples, so 9"), label)  # the last number counts
    assert extract("number", "It costs $1,000,000.") == 1_000_000.0


def test_bad_labels_name_file_row_and_field(tmp_path):
    (tmp_path / "boolq").mkdir()
    f = tmp_path / "boolq" / "test.json"
    f.write_text(json.dumps([{"instruction": "q", "answer": "true"}, {"instruction": "q", "answer": "maybe"}]))
    with pytest.raises(DataError, match=r"boolq/test\.json, row 2: field 'answer': answer 'maybe' is not one of "
                                        r"true\|false \(benchmark boolq"):
        load_benchmark_rows(*resolve_benchmark(f))
    f.write_text(json.dumps([{"instruction": "q", "answer": "true"}, {"instruction": "", "answer": "true"}]))
    with pytest.raises(DataError, match=r"row 2: field 'instruction' must be non-empty text"):
        load_benchmark_rows(*resolve_benchmark(f))
    f.write_text(json.dumps([{"instruction": "q", "answer": "true", "label": "x"}]))
    with pytest.raises(DataError, match=r"row 1: unknown field 'label'"):
        load_benchmark_rows(*resolve_benchmark(f))
    f.write_text(json.dumps([{"instruction": "q"}]))
    with pytest.raises(DataError, match=r"row 1: field 'answer' is missing"):
        load_benchmark_rows(*resolve_benchmark(f))
    (tmp_path / "gsm8k").mkdir()
    g = tmp_path / "gsm8k" / "test.json"
    g.write_text(json.dumps([{"instruction": "q", "answer": "twelve"}]))
    with pytest.raises(DataError, match=r"row 1: field 'answer': answer 'twelve' is not a number"):
        load_benchmark_rows(*resolve_benchmark(g))


# ---- resolving names and files ----------------------------------------------------------------

def _write_test(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"instruction": r["instruction"], "input": r.get("input", ""),
                                 "output": r.get("output", ""), "answer": r["answer"]} for r in rows]))
    return path


def test_names_and_aliases_resolve_under_a_data_root(tmp_path, monkeypatch):
    f = _write_test(tmp_path / "ARC-Challenge" / "test.json", [{"instruction": "q", "answer": "answer1"}])
    h = _write_test(tmp_path / "hellaswag" / "test.json", [{"instruction": "q", "answer": "ending2"}])
    for alias in ("arc-c", "ARC-Challenge", "arc_challenge", "ARC-c"):
        bench, path = resolve_benchmark(alias, tmp_path)
        assert (bench.name, path) == ("arc-c", f)
    assert resolve_benchmark("HellaSwag", tmp_path)[1] == h
    assert resolve_benchmark(tmp_path / "hellaswag")[1] == h  # a benchmark folder works as a file
    monkeypatch.setenv("MOETUNE_EVAL_DATA", str(tmp_path))
    assert resolve_benchmark("arc-c")[1] == f
    with pytest.raises(DataError, match=r"benchmark 'siqa': its test file .*/social_i_qa/test\.json does not exist.*"
                                        r"MOETUNE_EVAL_DATA"):
        resolve_benchmark("siqa", tmp_path)
    with pytest.raises(DataError, match=r"unknown benchmark 'boolqq'; known: boolq, piqa, siqa"):
        resolve_benchmark("boolqq", tmp_path)
    assert expand_benchmarks(["commonsense", "gsm8k"]) == list(SUITES["commonsense"]) + ["gsm8k"]


def test_an_unnamed_file_is_scored_by_what_its_labels_look_like(tmp_path):
    f = _write_test(tmp_path / "my_eval.json", [{"instruction": "q", "answer": "answer2"}])
    bench, _ = resolve_benchmark(f)
    assert (bench.name, bench.rule, bench.suite) == ("my_eval", "answer", "commonsense")
    g = _write_test(tmp_path / "letters.json", [{"instruction": "q", "answer": "C"}])
    assert resolve_benchmark(g)[0].rule == "letter"
    h = _write_test(tmp_path / "numbers.json", [{"instruction": "q", "answer": "3.5"}])
    assert resolve_benchmark(h)[0].rule == "number"
    bad = _write_test(tmp_path / "free.json", [{"instruction": "q", "answer": "blue"}])
    with pytest.raises(DataError, match="cannot tell which benchmark this is"):
        resolve_benchmark(bad)


@pytest.mark.skipif(not LLM_ADAPTERS.is_dir(), reason="LLM-Adapters data not present")
def test_every_llm_adapters_test_file_parses_completely():
    counts = {"boolq": 3270, "piqa": 1838, "siqa": 1954, "winogrande": 1267, "arc-e": 2376, "arc-c": 1172,
              "obqa": 500, "gsm8k": 1319, "addsub": 395, "multiarith": 600, "singleeq": 508, "svamp": 1000,
              "aqua": 254, "mawps": 238}
    for name, n in counts.items():
        bench, path = resolve_benchmark(name, LLM_ADAPTERS)
        assert len(load_benchmark_rows(bench, path)) == n, name
    with pytest.raises(DataError, match="hellaswag/test.json does not exist"):
        resolve_benchmark("hellaswag", LLM_ADAPTERS)


# ---- scoring with a scripted model --------------------------------------------------------------

class ScriptedModel(nn.Module):
    """A stand-in causal LM whose `generate` answers each prompt with the text scripted for it."""

    def __init__(self, tokenizer, script: dict[str, str]):
        super().__init__()
        self.tok, self.script, self.calls = tokenizer, script, []
        self.weight = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert (attention_mask.diff(dim=1) >= 0).all(), "prompts must be left-padded"
        self.calls.append({"batch": input_ids.shape[0], "max_new_tokens": max_new_tokens, **kwargs})
        seqs = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()])
            text = next(v for k, v in self.script.items() if f"\n{k}\n" in prompt)
            new = self.tok(text, add_special_tokens=False)["input_ids"][:max_new_tokens] + [self.tok.eos_token_id]
            seqs.append(ids.tolist() + new)
        width = max(map(len, seqs))
        return torch.tensor([s + [self.tok.pad_token_id] * (width - len(s)) for s in seqs])


def test_scores_are_exact_and_every_row_is_written(tmp_path, tokenizer):
    rows = [("Is the sky blue?", "true", "the correct answer is true"),
            ("Is fire cold and wet and also quite blue?", "false", "the correct answer is true"),
            ("Is water wet?", "true", "True"),
            ("Do cats purr when they are happy and warm?", "true", "the correct answer is true"),
            ("Is ice hot?", "false", "the correct answer is false")]
    f = _write_test(tmp_path / "boolq" / "test.json", [{"instruction": q, "answer": a} for q, a, _ in rows])
    model = ScriptedModel(tokenizer, {q: out for q, _, out in rows})
    seen = []
    result = evaluate(model, tokenizer, f, batch_size=2, predictions_path=tmp_path / "out" / "boolq.jsonl",
                      progress=lambda *a: seen.append(a))
    assert seen == [("boolq", 2, 5), ("boolq", 4, 5), ("boolq", 5, 5)]
    assert (result.rows, result.correct, result.unanswered) == (5, 3, 1) and result.accuracy == pytest.approx(0.6)
    assert [c["batch"] for c in model.calls] == [2, 2, 1]
    assert all(c["max_new_tokens"] == 32 and c["num_beams"] == 1 and c["do_sample"] is False for c in model.calls)
    lines = [json.loads(x) for x in (tmp_path / "out" / "boolq.jsonl").read_text().splitlines()]
    assert [x["row"] for x in lines] == [1, 2, 3, 4, 5]
    assert [x["correct"] for x in lines] == [True, False, False, True, True]
    assert [x["extracted"] for x in lines] == ["true", "true", None, "true", "false"]
    assert lines[1]["output"] == "the correct answer is true" and lines[1]["label"] == "false"
    assert lines[0]["prompt"].endswith("### Instruction:\nIs the sky blue?\n\n### Response:\n")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["boolq.jsonl"]  # no temp file left behind


def test_many_benchmarks_average_and_base_comparison(tmp_path, tokenizer):
    script, labels = {}, {"true-false": "true", "solution": "solution1", "answer": "answer1", "ending": "ending1",
                          "option": "option1", "number": "7", "letter": "C"}
    right = {"true-false": "the correct answer is true", "solution": "solution1", "answer": "answer1",
             "ending": "ending1", "option": "option1", "number": "The answer is 7.", "letter": "(C)"}
    names = list(SUITES["commonsense"]) + ["gsm8k", "aqua"]
    for i, name in enumerate(names):
        bench = BENCHMARKS[name]
        qs = [f"{name} question {j}" for j in range(4)]
        _write_test(tmp_path / "data" / bench.folder / "test.json", [{"instruction": q, "answer": labels[bench.rule]}
                                                                      for q in qs])
        for j, q in enumerate(qs):  # benchmark i gets (i % 4) + 1 of its 4 rows right
            script[q] = right[bench.rule] if j <= i % 4 else "no idea"
    model = ScriptedModel(tokenizer, script)
    tuned = evaluate_many(model, tokenizer, ["commonsense", "gsm8k", "aqua"], data_root=tmp_path / "data",
                          out_dir=tmp_path / "eval", batch_size=4)
    expected = {name: ((i % 4) + 1) / 4 for i, name in enumerate(names)}
    assert tuned.accuracies() == expected
    assert tuned.average == pytest.approx(sum(expected.values()) / len(expected))
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["average"] == pytest.approx(tuned.average) and len(saved["benchmarks"]) == 10
    for name in names:
        assert len((tmp_path / "eval" / f"{name}.predictions.jsonl").read_text().splitlines()) == 4
    assert [c["max_new_tokens"] for c in model.calls] == [32] * 8 + [256, 256]
    base = evaluate_many(ScriptedModel(tokenizer, {q: "no idea" for q in script}), tokenizer, ["gsm8k", "aqua"],
                         data_root=tmp_path / "data")
    table = compare(base, tuned)
    rows = {r["benchmark"]: r for r in table["benchmarks"]}
    assert rows["gsm8k"]["base"] == 0.0 and rows["gsm8k"]["delta"] == expected["gsm8k"]
    assert rows["boolq"]["base"] is None and rows["boolq"]["delta"] is None
    assert table["average"]["delta"] == pytest.approx(tuned.average - base.average)
    assert "average" in tuned.table() and "GSM8K" in tuned.table()


# ---- real generation on a tiny checkpoint -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from engine.model import load_model, load_tokenizer

    path = tiny_checkpoint("olmoe")
    return load_model(path).model, load_tokenizer(path)


def test_generation_on_a_tiny_model_scores_every_row(tiny, tmp_path):
    model, tok = tiny
    rows = [{"instruction": f"Q{i}: what is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]
    rows.append({"instruction": "Add these.", "input": "2 and 40", "answer": "42"})
    f = _write_test(tmp_path / "sums" / "test.json", rows)
    result = evaluate(model, tok, f, batch_size=4, max_new_tokens=6, predictions_path=tmp_path / "p.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert result.rows == len(lines) == 6 and [x["row"] for x in lines] == list(range(1, 7))
    assert set(lines[0]) == {"row", "prompt", "output", "extracted", "label", "correct"}
    assert result.correct == sum(x["correct"] for x in lines) and result.accuracy == result.correct / 6
    assert "### Input:\n2 and 40\n\n### Response:\n" in lines[5]["prompt"]
    assert result.max_new_tokens == 6 and result.file == str(f)


def test_left_padded_batches_generate_what_single_prompts_do(tiny):
    model, tok = tiny
    prompts = ["Hi", "Below is a much longer prompt about numbers: 1 2 3 4 5 6", "What is 2 + 2?"]
    one = generate(model, tok, prompts, batch_size=1, max_new_tokens=8)
    assert generate(model, tok, prompts, batch_size=3, max_new_tokens=8) == one
    assert len(generate(model, tok, prompts, batch_size=2, num_beams=2, max_new_tokens=4)) == 3


def test_chat_template_prompts(tiny, tmp_path):
    model, tok = tiny
    f = _write_test(tmp_path / "piqa" / "test.json", [{"instruction": "Pick one.", "answer": "solution1"}])
    result = evaluate(model, tok, f, template="chat", max_new_tokens=4)
    assert result.predictions[0].prompt == "<|im_start|>user\nPick one.<|im_end|>\n<|im_start|>assistant\n"
    assert result.rows == 1 and result.template == "chat"


@pytest.mark.skipif(not LLM_ADAPTERS.is_dir(), reason="LLM-Adapters data not present")
def test_real_test_files_on_a_tiny_model(tiny, tmp_path):
    model, tok = tiny
    suite = evaluate_many(model, tok, ["boolq", "gsm8k", "aqua"], data_root=LLM_ADAPTERS, limit=3,
                          max_new_tokens=4, batch_size=3, num_beams=2, out_dir=tmp_path)
    assert [r.rows for r in suite.results] == [3, 3, 3]
    for r in suite.results:
        assert len(Path(r.predictions_file).read_text().splitlines()) == 3
        assert r.accuracy == r.correct / 3
