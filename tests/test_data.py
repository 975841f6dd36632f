"""engine.data: file formats, templates, response-only labels, the cut-off with counts, errors that
name file / row / field, the registry, seeded length-bucketed batches and packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.data import (
    IGNORE_INDEX, DataError, collate, list_datasets, load_examples, load_registry, make_batches, pack_examples,
    read_records,
)
from engine.data import DEFAULT_REGISTRY, TEMPLATES, Example
from engine.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_INPUT

from .conftest import LLM_ADAPTERS

ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend."},
]


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained(example) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


# ---- templates and labels --------------------------------------------------------------------

def test_alpaca_labels_mask_exactly_the_prompt(tmp_path, tokenizer):
    f = write_json(tmp_path / "a.json", ROWS)
    examples, stats = load_examples(f, tokenizer, "alpaca", 256)
    assert stats["format"] == "alpaca" and stats["rows"] == stats["examples"] == 3
    e = examples[0]
    prompt = ALPACA_PROMPT.format(instruction="Name a colour.")
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer("Blue.", add_special_tokens=False)["input_ids"]
    assert e.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert e.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert stats["trained_tokens"] == sum(len(trained(x)) for x in examples)


def test_alpaca_prompt_text_with_and_without_input(tmp_path, tokenizer):
    examples, _ = load_examples(write_json(tmp_path / "a.json", ROWS), tokenizer, "alpaca", 256)
    text = tokenizer.decode(examples[1].input_ids)
    assert text.startswith("Below is an instruction that describes a task, paired with an input that provides "
                           "further context. Write a response that appropriately completes the request.\n\n")
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5" in text
    assert ALPACA_PROMPT.endswith("### Response:\n") and "paired" not in ALPACA_PROMPT
    assert ALPACA_PROMPT_INPUT.count("{input}") == 1
    assert tokenizer.decode(trained(examples[2])) == "Hello there, friend.</s>"


def test_llm_adapters_rows_are_detected_and_learn_answer_when_output_is_empty(tmp_path, tokenizer):
    rows = [{"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 = 4. The answer is 4.", "answer": "4"},
            {"instruction": "What is 3 + 3?", "input": "", "output": "", "answer": "6"}]
    examples, stats = load_examples(write_json(tmp_path / "math_10k.json", rows), tokenizer, "llm-adapters", 256)
    assert stats["format"] == "llm-adapters"
    assert tokenizer.decode(trained(examples[0])) == "2 + 2 = 4. The answer is 4.</s>"
    assert tokenizer.decode(trained(examples[1])) == "6</s>"
    alpaca, _ = load_examples(write_json(tmp_path / "m.json", rows[:1]), tokenizer, "alpaca", 256)
    assert alpaca[0].input_ids == examples[0].input_ids  # the two templates share the prompt text


def test_chat_loss_on_every_assistant_turn(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}]
    examples, stats = load_examples(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, "chat", 256)
    e = examples[0]
    assert stats["format"] == "chat" and stats["last_turn_only"] == 0
    full = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert tokenizer.decode(e.input_ids) == full
    spans, cur = [], []
    for t, lab in zip(e.input_ids, e.labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [tokenizer.decode(s) for s in spans] == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]


def test_chat_template_reads_alpaca_rows_and_sharegpt(tmp_path, tokenizer):
    examples, _ = load_examples(write_json(tmp_path / "a.json", ROWS[1:2]), tokenizer, "chat", 256)
    text = tokenizer.decode(examples[0].input_ids)
    assert text == "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    assert tokenizer.decode(trained(examples[0])) == "5<|im_end|>\n"
    share = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}], "system": "S"}]
    ex2, stats = load_examples(write_json(tmp_path / "s.json", share), tokenizer, "chat", 256)
    assert stats["format"] == "chat"
    assert tokenizer.decode(ex2[0].input_ids).startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi")
    assert tokenizer.decode(trained(ex2[0])) == "Hey<|im_end|>\n"


def test_chat_template_that_rewrites_history_trains_the_last_turn_only(tmp_path, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
        "[earlier reply]<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    examples, stats = load_examples(write_json(tmp_path / "c.json", rows), tok, "chat", 256)
    assert stats["last_turn_only"] == 1
    assert tok.decode(trained(examples[0])) == "4<|im_end|>\n"
    assert "[earlier reply]" in tok.decode(examples[0].input_ids)
    tok.chat_template = None
    with pytest.raises(DataError, match="template 'chat' needs a tokenizer with a chat template"):
        load_examples(write_json(tmp_path / "c.json", rows), tok, "chat", 256)


# ---- file types -----------------------------------------------------------------------------

def test_every_file_type_gives_the_same_examples(tmp_path, tokenizer):
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"json": write_json(tmp_path / "d.json", ROWS), "jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS),
             "jsonl-as-json": write_jsonl(tmp_path / "lines.json", ROWS)}
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS)
    paths["csv"] = tmp_path / "d.csv"
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    paths["parquet"] = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    paths["saved"] = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "saved_dict"))
    paths["saved-dict"] = tmp_path / "saved_dict"
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS), hub / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[:1]), hub / "test-00000-of-00001.parquet")
    paths["hub-folder"] = tmp_path / "hub"
    ref, _ = load_examples(paths["json"], tokenizer, "alpaca", 256)
    for kind, p in paths.items():
        got, stats = load_examples(p, tokenizer, "alpaca", 256)
        assert [e.input_ids for e in got] == [e.input_ids for e in ref], kind
        assert [e.labels for e in got] == [e.labels for e in ref], kind
        assert stats["rows"] == 3, kind


# ---- errors naming file, row and field ----------------------------------------------------------

def test_missing_file_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data file '.*nope\.jsonl' does not exist"):
        load_examples(tmp_path / "nope.jsonl", tokenizer, "alpaca", 256)


def test_bad_json_line_names_the_line(tmp_path, tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x", "output": }\n')
    with pytest.raises(DataError) as e:
        load_examples(f, tokenizer, "alpaca", 256)
    assert f"{f}, line 3: not valid JSON" in str(e.value) and "fix the line" in str(e.value)


def test_broken_json_file_names_line_and_column(tmp_path, tokenizer):
    f = tmp_path / "broken.json"
    f.write_text('[{"instruction": "a",\n "output": "b"},\n {"instruction" "c"}]')
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON: .* at line 3, column 17"):
        load_examples(f, tokenizer, "alpaca", 256)
    f.write_text('{"instruction": "a", "output": "b"}')
    with pytest.raises(DataError, match="holds one JSON object; a dataset file must be a JSON list"):
        load_examples(f, tokenizer, "alpaca", 256)


def test_unknown_field_names_file_row_field_and_fix(tmp_path, tokenizer):
    rows = [ROWS[0], {"instruction": "x", "input": "", "outptu": "y"}]
    f = write_json(tmp_path / "typo.json", rows)
    with pytest.raises(DataError) as e:
        load_examples(f, tokenizer, "alpaca", 256)
    msg = str(e.value)
    assert msg.startswith(f"{f}, row 2: unknown field 'outptu' (did you mean 'output'?)")
    assert '"columns"' in msg and "ignore_columns" in msg


def test_missing_empty_and_mistyped_fields(tmp_path, tokenizer):
    cases = [({"instruction": "x", "input": ""}, "row 2: field 'output' is missing"),
             ({"instruction": "x", "output": "   "}, "row 2: field 'output' is empty"),
             ({"instruction": ["x"], "output": "y"}, "row 2: field 'instruction' must be text, got list"),
             ({"instruction": "", "output": "y"}, "row 2: field 'instruction' is empty"),
             ("just text", "row 2: expected a JSON object of fields, got str"),
             ({"instruction": "x", "input": "", "output": "y", "answer": None}, None)]
    for bad, fragment in cases:
        f = write_json(tmp_path / "rows.json", [ROWS[0], bad])
        if fragment is None:
            assert load_examples(f, tokenizer, "alpaca", 256)[1]["examples"] == 2
            continue
        with pytest.raises(DataError) as e:
            load_examples(f, tokenizer, "alpaca", 256)
        assert str(e.value).startswith(f"{f}, {fragment}"), str(e.value)


def test_llm_adapters_row_without_answer(tmp_path, tokenizer):
    f = write_json(tmp_path / "la.json", [{"instruction": "x", "output": "y", "answer": "1"},
                                          {"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"la\.json, row 2: field 'answer' is missing"):
        load_examples(f, tokenizer, "llm-adapters", 256)


def test_chat_row_errors(tmp_path, tokenizer):
    cases = [({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages' has no assistant message"),
             ({"messages": [{"role": "bot", "content": "hi"}]}, "field 'messages[0].role' is 'bot'; use one of system, user, assistant"),
             ({"messages": [{"role": "user", "content": "hi", "weight": 1}]}, "unknown field 'messages[0].weight'"),
             ({"messages": []}, "field 'messages' must be a non-empty list"),
             ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
              "field 'messages[1].content' must be text")]
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    for bad, fragment in cases:
        f = write_jsonl(tmp_path / "chat.jsonl", [good, bad])
        with pytest.raises(DataError) as e:
            load_examples(f, tokenizer, "chat", 256)
        assert str(e.value).startswith(f"{f}, line 2: {fragment}"), str(e.value)


def test_format_and_template_mismatches(tmp_path, tokenizer):
    f = write_json(tmp_path / "odd.json", [{"question": "q", "response": "r"}])
    with pytest.raises(DataError, match=r"odd\.json, row 1: cannot tell the dataset format from its fields "
                                        r"\['question', 'response'\]"):
        load_examples(f, tokenizer, "alpaca", 256)
    chat = write_json(tmp_path / "chat.json", [{"messages": [{"role": "user", "content": "a"},
                                                             {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"chat\.json, row 1: field 'messages' makes this a chat row.*Use template 'chat'"):
        load_examples(chat, tokenizer, "alpaca", 256)
    with pytest.raises(DataError, match="unknown prompt template 'vicuna'; choose one of alpaca, llm-adapters, chat"):
        load_examples(write_json(tmp_path / "a.json", ROWS), tokenizer, "vicuna", 256)
    assert TEMPLATES == ("alpaca", "llm-adapters", "chat")


def test_empty_datasets_are_errors(tmp_path, tokenizer):
    (tmp_path / "e.json").write_text("[]")
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "e.csv").write_text("instruction,input,output\n")
    for name in ("e.json", "e.jsonl", "e.csv"):
        with pytest.raises(DataError, match=f"{name} holds no rows; a dataset needs at least one example"):
            load_examples(tmp_path / name, tokenizer, "alpaca", 256)


def test_csv_row_with_extra_values(tmp_path, tokenizer):
    f = tmp_path / "x.csv"
    f.write_text("instruction,input,output\na,,b\nc,,d,e\n")
    with pytest.raises(DataError, match=r"x\.csv, row 2: has more values than the header has columns"):
        load_examples(f, tokenizer, "alpaca", 256)


def test_unsupported_file_type(tmp_path, tokenizer):
    f = tmp_path / "data.txt"
    f.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_examples(f, tokenizer, "alpaca", 256)


# ---- the cut-off ---------------------------------------------------------------------------

def _lengths(tokenizer, rows):
    out = []
    for r in rows:
        p = len(tokenizer(ALPACA_PROMPT.format(instruction=r["instruction"]))["input_ids"])
        out.append((p, p + len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) + 1))
    return out


def test_truncation_and_drop_counts(tmp_path, tokenizer):
    rows = [{"instruction": "Short.", "output": "ok"},
            {"instruction": "Short.", "output": "a fairly long answer " * 10},
            {"instruction": "Short.", "output": "another long answer that goes on " * 8}]
    lens = _lengths(tokenizer, rows)
    max_len = lens[0][1] + 3
    assert lens[1][1] > max_len and lens[2][1] > max_len and lens[1][0] < max_len
    f = write_json(tmp_path / "t.json", rows)
    examples, stats = load_examples(f, tokenizer, "alpaca", max_len)
    assert stats["truncated"] == 2 and stats["examples"] == 3
    assert stats["truncated_tokens"] == (lens[1][1] - max_len) + (lens[2][1] - max_len)
    assert [len(e) for e in examples] == [lens[0][1], max_len, max_len]
    assert examples[1].labels[-1] != tokenizer.eos_token_id and examples[0].labels[-1] == tokenizer.eos_token_id
    kept, stats = load_examples(f, tokenizer, "alpaca", max_len, too_long="drop")
    assert stats["dropped_too_long"] == 2 and stats["examples"] == 1 and stats["truncated"] == 0
    assert [e.row for e in kept] == [1]


def test_prompt_longer_than_cutoff_is_a_counted_drop_or_on_request_an_error(tmp_path, tokenizer):
    long = "word " * 200
    rows = [{"instruction": "Short.", "output": "ok"}, {"instruction": long, "output": "x"},
            {"instruction": "Fine.", "output": "y"}, {"instruction": long + "more", "output": "z"}]
    f = write_json(tmp_path / "long.json", rows)
    examples, stats = load_examples(f, tokenizer, "alpaca", 128)  # the default, as LLaMA-Factory's cutoff_len
    assert stats["dropped_long_prompt"] == 2 and [e.row for e in examples] == [1, 3]
    with pytest.raises(DataError) as e:
        load_examples(f, tokenizer, "alpaca", 128, long_prompt="error")
    msg = str(e.value)
    assert msg.startswith(f"{f}, row 2: field 'instruction': the prompt is ")
    assert "not shorter than the cut-off max_len=128" in msg and "(2 of 4 rows are like this: rows 2, 4)" in msg
    with pytest.raises(DataError, match=r"no rows left to train out of 1 \(1 rows' prompts fill the cut-off "
                                        r"data.max_len=128.*Fix: raise data.max_len \(the longest row is \d+ tokens\)"):
        load_examples(write_json(tmp_path / "all.json", rows[1:2]), tokenizer, "alpaca", 128)
    with pytest.raises(DataError, match=r"2 of 4 rows left to train, and one optimizer step needs 3"):
        load_examples(f, tokenizer, "alpaca", 128, min_examples=3)


def test_the_template_alone_is_counted_with_the_tokenizer(tokenizer):
    from engine.data.encode import template_tokens
    from engine.data import alpaca_prompt

    n = template_tokens("alpaca", tokenizer)
    assert n == len(tokenizer(alpaca_prompt("", ""))["input_ids"]) and 60 < n < 100
    assert template_tokens("chat", tokenizer) < n


# ---- registry ------------------------------------------------------------------------------

def test_registry_names_resolve_relative_files_and_map_columns(tmp_path, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "dolly.jsonl", [{"instruction": "a", "context": "", "response": "b", "category": "qa"}])
    reg = tmp_path / "datasets.json"
    reg.write_text(json.dumps({"dolly": {"file": "data/dolly.jsonl", "format": "alpaca", "template": "alpaca",
                                         "description": "Dolly", "columns": {"input": "context", "output": "response"},
                                         "ignore_columns": ["category"]}}))
    examples, stats = load_examples("dolly", tokenizer, "alpaca", 128, registry=reg)
    assert stats["dataset"] == "dolly" and tokenizer.decode(trained(examples[0])) == "b</s>"
    assert list_datasets(reg) == [{"name": "dolly", "description": "Dolly", "format": "alpaca", "template": "alpaca",
                                   "file": str(data / "dolly.jsonl"), "available": True, "source": ""}]
    with pytest.raises(DataError, match=r"'doly' is neither a file nor a dataset in the registry .*Did you mean 'dolly'"):
        load_examples("doly", tokenizer, "alpaca", 128, registry=reg)


def test_registry_errors(tmp_path, tokenizer):
    reg = tmp_path / "r.json"
    reg.write_text(json.dumps({"x": {"file": "x.json", "fromat": "alpaca"}}))
    with pytest.raises(DataError, match=r"entry 'x': unknown key 'fromat' \(did you mean 'format'\?\)"):
        load_registry(reg)
    reg.write_text(json.dumps({"x": {"file": "missing.json", "source": "https://example.org/x"}}))
    with pytest.raises(DataError, match=r"dataset 'x' .* points at .*missing\.json, which does not exist.*"
                                        r"Get it from https://example.org/x"):
        load_examples("x", tokenizer, "alpaca", 128, registry=reg)
    reg.write_text(json.dumps({"x": {"format": "alpaca"}}))
    with pytest.raises(DataError, match="entry 'x': key 'file' is missing"):
        load_registry(reg)


def test_shipped_registry_is_valid():
    entries = load_registry(DEFAULT_REGISTRY)
    assert {"commonsense_170k", "math_10k", "math_50k"} <= set(entries)
    for spec in entries.values():
        assert spec.description and spec.template in TEMPLATES and spec.source


# ---- batches and packing ------------------------------------------------------------------

def _fake_examples(lengths):
    return [Example(list(range(n)), [IGNORE_INDEX] + list(range(1, n)), i + 1) for i, n in enumerate(lengths)]


def test_make_batches_is_seeded_complete_and_bucketed():
    import random

    rng = random.Random(1)
    examples = _fake_examples([rng.randint(5, 300) for _ in range(403)])
    a, b = make_batches(examples, 8, seed=3), make_batches(examples, 8, seed=3)
    assert a == b and make_batches(examples, 8, seed=4) != a
    assert sorted(i for batch in a for i in batch) == list(range(403))
    assert sum(len(x) != 8 for x in a) <= (403 + 399) // 400 + 1  # only window tails are short

    def padding(batches):
        return sum(max(len(examples[i]) for i in bt) * len(bt) - sum(len(examples[i]) for i in bt) for bt in batches)

    assert padding(a) * 5 < padding(make_batches(examples, 8, seed=3, bucket=1))
    assert make_batches(examples[:5], 2, shuffle=False) == [[0, 1], [2, 3], [4]]
    assert make_batches(examples[:5], 2, shuffle=False, drop_last=True) == [[0, 1], [2, 3]]


def test_collate_pads_right_with_masked_labels():
    examples = _fake_examples([3, 5])
    batch = collate(examples, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist()[0] == [IGNORE_INDEX, 1, 2] + [IGNORE_INDEX] * 5


def test_packing_fits_and_keeps_every_example():
    examples = _fake_examples([100, 60, 40, 30, 90, 10, 128])
    packs = pack_examples(examples, 128)
    assert all(len(p) <= 128 for p in packs)
    assert sorted(r for p in packs for r in p.rows) == list(range(1, 8))
    assert len(packs) == 4  # 458 tokens need at least 4 sequences of 128; best fit reaches that
    assert sum(len(p) for p in packs) == sum(len(e) for e in examples)
    for p in packs:
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0]
        assert len(starts) == len(p.rows) and all(p.labels[i] == IGNORE_INDEX for i in starts)
    with pytest.raises(ValueError, match="longer than max_len=64"):
        pack_examples(examples, 64)


def test_packed_sequences_do_not_attend_to_each_other(tiny_checkpoint, tokenizer, tmp_path):
    from engine.model import load_model

    model = load_model(tiny_checkpoint("olmoe")).model
    examples, _ = load_examples(write_json(tmp_path / "a.json", ROWS), tokenizer, "alpaca", 256)
    packs = pack_examples(examples, 512)
    assert len(packs) == 1
    batch = collate(packs, tokenizer.pad_token_id, pad_to_multiple_of=64)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for row in packs[0].rows:
            e = examples[row - 1]
            alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[offset:offset + len(e)], alone, atol=1e-4, rtol=1e-4)
            offset += len(e)


# ---- the LLM-Adapters training files ----------------------------------------------------------

@pytest.mark.skipif(not (LLM_ADAPTERS / "boolq" / "train.json").is_file(), reason="LLM-Adapters data not present")
def test_llm_adapters_training_file(tokenizer):
    examples, stats = load_examples(LLM_ADAPTERS / "boolq" / "train.json", tokenizer, "llm-adapters", 256, limit=200)
    assert stats["format"] == "llm-adapters" and stats["rows"] == stats["examples"] == 200
    assert all(tokenizer.decode(trained(e)) in ("the correct answer is true</s>", "the correct answer is false</s>")
               for e in examples)
    records, fmt = read_records(LLM_ADAPTERS / "ARC-Easy" / "train.json", limit=5)
    assert fmt == "llm-adapters" and records[0].answer.startswith("answer")
