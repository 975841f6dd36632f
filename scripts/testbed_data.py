"""The text of the routing testbed (scripts/make_testbed.py): four fact domains with their own vocabularies, their
facts, the pretraining documents, and the fine-tuning task (every domain's facts changed by its own rule).

A domain is a made-up world: its words are built from its own syllables (no syllable is shared between
domains), it has one attribute word and 64 entities, and each entity's attribute is a number 1..8 (the numbers
are shared by every domain). Pretraining states each fact two ways — a sentence, "The vorka of tipako is 3.",
and the Alpaca instruction "What is the vorka of tipako?" -> "The answer is 3" — so the model stores the 256 facts
(in its FFNs: they are a lookup from entity to number) and a router trained with a balance loss tends to send
each domain's tokens to experts of their own.

The fine-tuning task changes every domain's facts by that domain's own rule: a derangement π_d of 1..8 (no
number maps to itself, the four rules differ). The reply recalls the pretrained fact and goes on: "What is the vorka
of tipako?" -> "The answer was 3, now vorka6" (6 = π_0(3); the domain's own word right before the new number, so
the MoE routes the position that predicts it by its domain). Trained on 40 entities of each domain, scored (the last
number) on the other 24 (held out): the model recalls each held-out entity's old number, as pretrained, and must
map it by its domain's rule — a lookup keyed by domain and number together, the kind of change per-domain
(per-expert) adapters hold and one shared linear change cannot — once the old number, written a few tokens back,
has reached that position (see bench/README.md for what the strategies made of it). Answering "The answer is 6"
straight away, with the old number never written, was tried first: shared, embedded (parallel and inside) stayed
at chance (12.5 %) in 60 steps, embedded at rank 16 in 150 — the old number exists only inside the last layers'
FFNs, where an adapter beside the MoE block cannot read it.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from engine.data import alpaca_prompt  # noqa: E402
from make_demo import _corpus_lines, _equation, _instruction  # noqa: E402  (the demo's arithmetic and chat mix)

#: each domain's own consonants and vowels: its syllables share no letters' combination with another's
SYLLABLES = (("k", "t", "p"), ("a", "o", "u")), (("m", "n", "l"), ("e", "i", "y")), \
            (("v", "z", "r"), ("a", "i", "o")), (("b", "d", "g"), ("e", "u", "y"))
VALUES = tuple(range(1, 9))
ENTITIES_PER_DOMAIN, TRAIN_ENTITIES = 64, 40
FILLER_WORDS = 24  # words of each domain's free text besides its entities


@dataclass
class Domain:
    index: int
    attribute: str
    entities: list[str]
    fillers: list[str]
    facts: dict[str, int]  # entity -> its number (pretraining)
    rule: dict[int, int]  # the fine-tuning change: old number -> new number (a derangement)

    def question(self, entity: str) -> str:
        return f"What is the {self.attribute} of {entity}?"

    def sentence(self, entity: str, value: int) -> str:
        return f"The {self.attribute} of {entity} is {value}."


def _word(rng: random.Random, index: int, syllables: int) -> str:
    cons, vows = SYLLABLES[index]
    return "".join(rng.choice(cons) + rng.choice(vows) for _ in range(syllables))


def _derangement(rng: random.Random, taken: list[dict]) -> dict[int, int]:
    while True:
        perm = list(VALUES)
        rng.shuffle(perm)
        rule = dict(zip(VALUES, perm))
        if all(k != v for k, v in rule.items()) and rule not in taken:
            return rule


def build_domains(seed: int = 0) -> list[Domain]:
    """The four domains: words, balanced facts (each number 8 times per domain), rules."""
    rng = random.Random(seed)
    domains, rules = [], []
    for d in range(len(SYLLABLES)):
        words: set[str] = set()
        while len(words) < ENTITIES_PER_DOMAIN + FILLER_WORDS + 1:
            words.add(_word(rng, d, rng.choice((2, 3, 3))))
        words_ = sorted(words)
        rng.shuffle(words_)
        attribute, entities, fillers = words_[0], words_[1:1 + ENTITIES_PER_DOMAIN], words_[1 + ENTITIES_PER_DOMAIN:]
        values = [VALUES[i % len(VALUES)] for i in range(ENTITIES_PER_DOMAIN)]
        rng.shuffle(values)
        rule = _derangement(rng, rules)
        rules.append(rule)
        domains.append(Domain(d, attribute, entities, fillers, dict(zip(entities, values)), rule))
    return domains


# ---- pretraining documents ------------------------------------------------------------------

class Documents:
    """An endless mix of documents (each a list of token ids ending with EOS), tokenised as the engine's alpaca
    template does (prompt and reply apart): per domain its facts as questions and as sentences among its own
    words; plus the demo's equations, instructions and English sentences. `kind_of` names each document's
    group for the specialisation measurement."""

    #: (group, share of documents)
    MIX = (("facts-qa", 0.35), ("facts-text", 0.2), ("equations", 0.2), ("instructions", 0.15), ("english", 0.1))

    def __init__(self, tokenizer, domains: list[Domain], seed: int):
        self.tok, self.domains, self.rng = tokenizer, domains, random.Random(seed)
        self.lines = _corpus_lines()
        self.words = sorted({w.strip(".,?!") for ln in self.lines for w in ln.split() if w.isalpha() and len(w) > 2})
        self.eos = tokenizer.eos_token_id

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def qa(self, d: Domain, entity: str, value: int) -> tuple[list[int], list[int]]:
        """(prompt ids, reply ids) of one fact question."""
        return self.ids(alpaca_prompt(d.question(entity))), self.ids(f"The answer is {value}")

    def text(self, d: Domain) -> str:
        """A paragraph of domain d: a few fact sentences among sentences of its own words."""
        rng, parts = self.rng, []
        for _ in range(rng.randint(3, 6)):
            if rng.random() < 0.6:
                e = rng.choice(d.entities)
                parts.append(d.sentence(e, d.facts[e]))
            else:
                ws = [rng.choice(d.fillers + d.entities) for _ in range(rng.randint(4, 8))]
                parts.append(" ".join(ws).capitalize() + ".")
        return " ".join(parts)

    def document(self) -> tuple[str, list[int]]:
        """(group, ids + EOS) of one document; group is 'domain-N' for the fact domains."""
        r, rng = self.rng.random(), self.rng
        share = 0.0
        for group, p in self.MIX:
            share += p
            if r < share:
                break
        if group in ("facts-qa", "facts-text"):
            d = rng.choice(self.domains)
            if group == "facts-qa":
                e = rng.choice(d.entities)
                prompt, reply = self.qa(d, e, d.facts[e])
                ids = prompt + reply
            else:
                ids = self.ids(self.text(d))
            return f"domain-{d.index}", ids + [self.eos]
        if group == "equations":
            return group, self.ids("\n".join(_equation(rng) for _ in range(rng.randint(3, 8)))) + [self.eos]
        if group == "instructions":
            instruction, output = _instruction(rng, self.words)
            return group, self.ids(alpaca_prompt(instruction)) + self.ids(output) + [self.eos]
        return group, self.ids(" ".join(rng.choice(self.lines) for _ in range(rng.randint(2, 6)))) + [self.eos]


def tokenizer_corpus(domains: list[Domain], seed: int = 0) -> str:
    """Text to train the testbed's BPE tokenizer on: the project's corpus plus every domain's words, facts and
    questions, and numbers."""
    rng = random.Random(seed)
    lines = [ln for ln in (ROOT / "assets" / "tokenizer_corpus.txt").read_text(encoding="utf-8").splitlines()]
    for d in domains:  # often enough that BPE makes every domain word one token
        for e in d.entities:
            lines += [d.sentence(e, d.facts[e]), d.question(e)] * 10
        lines += [" ".join(rng.sample(d.fillers, 8)).capitalize() + "." for _ in range(100)]
    lines += [_equation(rng) for _ in range(200)]
    return "\n".join(lines) + "\n"


# ---- the fine-tuning task -------------------------------------------------------------------

def _row(d: Domain, entity: str, value: int, old: int | None = None) -> dict:
    output = f"The answer is {value}" if old is None else f"The answer was {old}, now {d.attribute}{value}"
    return {"instruction": d.question(entity), "input": "", "output": output, "answer": str(value)}


def task_row(d: Domain, entity: str) -> dict:
    """The fine-tuning row of one entity: its fact changed by its domain's rule."""
    old = d.facts[entity]
    return _row(d, entity, d.rule[old], old)


def task_rows(domains: list[Domain]) -> dict[str, list[dict]]:
    """The task's files: `train` (each domain's first 40 entities: old and new numbers), `eval` (the other 24 of
    each: held out), `known` (the held-out entities' pretrained facts, "The answer is 3": what the base model
    should answer), all interleaved by domain."""
    out: dict[str, list[dict]] = {"train": [], "eval": [], "known": []}
    for i in range(ENTITIES_PER_DOMAIN):
        for d in domains:
            e = d.entities[i]
            old = d.facts[e]
            if i < TRAIN_ENTITIES:
                out["train"].append(task_row(d, e))
            else:
                out["eval"].append(task_row(d, e))
                out["known"].append(_row(d, e, old))
    return out
