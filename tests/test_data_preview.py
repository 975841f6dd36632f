"""engine.data.preview: the first rows with the template applied, their token counts equal to the tokenizer's,
and the rows the cut-off drops and truncates equal to what training drops."""

from __future__ import annotations

import json

import pytest

from engine.data import DataError, load_examples
from engine.data.preview import preview_dataset
from engine.data.templates import alpaca_prompt
from engine.training.loop import dropped_rows


def rows() -> list[dict]:
    out = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is five, " * 12}]
    out += [{"instruction": "Explain. " * 60, "input": "", "output": "No."} for _ in range(3)]  # prompt > cut-off
    out += [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(20)]
    return out


def test_token_counts_are_the_tokenizers_and_the_template_is_applied(tmp_path, tokenizer):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows()))
    p = preview_dataset(str(f), tokenizer, "alpaca", max_len=160, rows=4)
    assert [r["row"] for r in p["first"]] == [1, 2, 3, 4] and p["format"] == "alpaca"
    first, second = p["first"][0], p["first"][1]
    assert first["prompt"] == alpaca_prompt("Name a colour.") and first["response"] == "Blue."
    assert first["prompt_tokens"] == len(tokenizer(alpaca_prompt("Name a colour."))["input_ids"])
    assert first["response_tokens"] == len(tokenizer("Blue.", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert first["tokens"] == first["kept_tokens"] == first["prompt_tokens"] + first["response_tokens"]
    assert first["status"] == "kept"
    whole = len(tokenizer(alpaca_prompt("Add the numbers.", "2 and 3"))["input_ids"]) + \
        len(tokenizer(rows()[1]["output"], add_special_tokens=False)["input_ids"]) + 1
    assert whole > 160 and (second["tokens"], second["kept_tokens"], second["status"]) == (whole, 160, "truncated")
    assert p["first"][2]["status"] == "dropped" and p["first"][2]["kept_tokens"] == 0


def test_dropped_and_truncated_counts_equal_what_training_drops(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    for max_len in (96, 160, 2000):
        p = preview_dataset(str(f), tokenizer, "alpaca", max_len=max_len, rows=3)
        _, stats = load_examples(str(f), tokenizer, "alpaca", max_len)  # what `moetune train` loads
        assert (p["rows"], p["examples"], p["dropped"], p["truncated"]) == \
            (stats["rows"], stats["examples"], dropped_rows(stats), stats["truncated"])
    assert preview_dataset(str(f), tokenizer, "alpaca", max_len=160)["dropped"] == 3


def test_a_dataset_training_refuses_is_refused_by_the_preview(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        preview_dataset(str(tmp_path / "none.json"), tokenizer)
    f = tmp_path / "x.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"x.jsonl, line 2: not valid JSON"):
        preview_dataset(str(f), tokenizer)


def test_a_large_dataset_is_counted_on_a_sample_and_says_so(tmp_path, tokenizer):
    """More rows than `sample`: the counts come from a seeded sample scaled to the whole, marked estimated (the
    preview button stays fast on commonsense_170k); within the rounding of the sample they are training's."""
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows() * 8))  # 200 rows, 24 with prompts over the cut-off
    whole = preview_dataset(str(f), tokenizer, "alpaca", max_len=160, sample=1000)
    est = preview_dataset(str(f), tokenizer, "alpaca", max_len=160, sample=100)
    assert not whole["estimated"] and (whole["counted"], whole["dropped"]) == (200, 24)
    assert est["estimated"] and est["counted"] == 100 and est["rows"] == 200
    assert abs(est["dropped"] - 24) <= 10 and est["examples"] + est["dropped"] == 200
    assert est == preview_dataset(str(f), tokenizer, "alpaca", max_len=160, sample=100)  # the same sample each time
    assert est["first"] == whole["first"]  # the first rows are always the file's first rows
    from app.data_preview import preview_html

    assert "estimated from a sample of 100 rows" in preview_html(est) and "≈" not in preview_html(whole)
