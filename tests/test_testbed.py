"""The routing testbed's data (scripts/testbed_data.py, assets/testbed/): domains with their own vocabularies,
per-domain rules that change every fact, held-out entities, and shipped files that the script rebuilds exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from testbed_data import ENTITIES_PER_DOMAIN, TRAIN_ENTITIES, VALUES, build_domains, task_rows  # noqa: E402

ASSET = ROOT / "assets" / "testbed"


@pytest.fixture(scope="module")
def domains():
    return build_domains(0)


def test_domains_have_their_own_words_and_balanced_facts(domains):
    words = [{d.attribute, *d.entities, *d.fillers} for d in domains]
    for i in range(len(words)):
        for j in range(i + 1, len(words)):
            assert not words[i] & words[j]
    for d in domains:
        assert len(set(d.entities)) == ENTITIES_PER_DOMAIN
        counts = [list(d.facts.values()).count(v) for v in VALUES]
        assert counts == [ENTITIES_PER_DOMAIN // len(VALUES)] * len(VALUES)


def test_every_rule_changes_every_number_and_the_rules_differ(domains):
    rules = [d.rule for d in domains]
    for rule in rules:
        assert sorted(rule) == sorted(rule.values()) == list(VALUES)  # a permutation
        assert all(old != new for old, new in rule.items())  # of which no number stays
    assert len({tuple(sorted(r.items())) for r in rules}) == len(rules)


def test_task_holds_out_entities_and_answers_by_the_domain_rule(domains):
    rows = task_rows(domains)
    assert len(rows["train"]) == len(domains) * TRAIN_ENTITIES
    assert len(rows["eval"]) == len(rows["known"]) == len(domains) * (ENTITIES_PER_DOMAIN - TRAIN_ENTITIES)
    assert not {r["instruction"] for r in rows["train"]} & {r["instruction"] for r in rows["eval"]}
    by_question = {d.question(e): d for d in domains for e in d.entities}
    for new, known in zip(rows["eval"], rows["known"]):
        assert new["instruction"] == known["instruction"]
        d = by_question[new["instruction"]]
        old = int(known["answer"])
        assert int(new["answer"]) == d.rule[old] != old
        assert new["output"] == f"The answer was {old}, now {d.attribute}{d.rule[old]}"


@pytest.mark.skipif(not (ASSET / "train.jsonl").is_file(), reason="assets/testbed not built")
def test_shipped_files_are_what_the_script_writes(domains):
    rows = task_rows(domains)
    shipped = [json.loads(line) for line in (ASSET / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert shipped == rows["train"]
    for name in ("eval", "known"):
        assert json.loads((ASSET / f"{name}.json").read_text(encoding="utf-8")) == rows[name]
    report = json.loads((ASSET / "report.json").read_text(encoding="utf-8"))
    assert report["experts"] == 16 and report["top_k"] == 2
