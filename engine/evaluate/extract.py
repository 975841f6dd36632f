"""Answer extraction by the conventions of the LLM-Adapters suites (what their published numbers use):

- commonsense: the first occurrence of the benchmark's label word in the output, case-sensitive
  (`true|false`, `solution1|2`, `answer1-5`, `ending1-4`, `option1|2`);
- math: the last number in the output, commas removed, compared with the label within 0.001;
- AQuA: the first capital letter A–E anywhere in the output (so "Answer: C" reads as "A" — the
  convention, kept so numbers compare with the paper's).
"""

from __future__ import annotations

import math
import re

MATH_TOLERANCE = 1e-3

#: rule name -> the label words a commonsense output is searched for
LABEL_PATTERNS = {
    "true-false": re.compile(r"true|false"),
    "solution": re.compile(r"solution1|solution2"),
    "answer": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "ending": re.compile(r"ending1|ending2|ending3|ending4"),
    "option": re.compile(r"option1|option2"),
    "letter": re.compile(r"[A-E]"),
}
RULES = tuple(LABEL_PATTERNS) + ("number",)
_NUMBER = re.compile(r"-?\d+\.?\d*")


def extract(rule: str, text: str) -> str | float | None:
    """The answer an output gives under a rule: a label word / letter (str), a number (float), or
    None when the output holds none."""
    if rule == "number":
        found = _NUMBER.findall(text.replace(",", ""))
        if not found:
            return None
        try:
            value = float(found[-1])
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    try:
        pattern = LABEL_PATTERNS[rule]
    except KeyError:
        raise ValueError(f"unknown extraction rule {rule!r}; known rules: {', '.join(RULES)}.") from None
    m = pattern.search(text.strip())
    return m.group(0) if m else None


def parse_label(rule: str, raw) -> str | float:
    """A test row's `answer` as the value extraction is compared with; ValueError when it cannot be one."""
    if rule == "number":
        if isinstance(raw, bool):
            raise ValueError(f"answer {raw!r} is not a number")
        try:
            value = float(str(raw).replace(",", "").strip())
        except ValueError:
            raise ValueError(f"answer {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"answer {raw!r} is not a finite number")
        return value
    label = str(raw).strip()
    if LABEL_PATTERNS[rule].fullmatch(label) is None:
        words = LABEL_PATTERNS[rule].pattern.replace("[A-E]", "A|B|C|D|E")
        raise ValueError(f"answer {raw!r} is not one of {words}")
    return label


def is_correct(rule: str, predicted: str | float | None, label: str | float) -> bool:
    """Whether an extracted answer matches the label (numbers within MATH_TOLERANCE)."""
    if predicted is None:
        return False
    if rule == "number":
        return abs(float(predicted) - float(label)) <= MATH_TOLERANCE
    return predicted == label


def infer_rule(labels: list) -> str | None:
    """The rule a list of test labels fits (for a test file of an unnamed benchmark), or None."""
    for rule in ("true-false", "solution", "ending", "option", "answer", "letter", "number"):
        try:
            for raw in labels:
                parse_label(rule, raw)
        except ValueError:
            continue
        return rule
    return None
