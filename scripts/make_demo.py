#!/usr/bin/env python
"""Build the demo model the app runs on with no download: a small Qwen3-MoE, pretrained on CPU in a
few minutes on text this script generates, plus the demo's training and evaluation sets.

    .venv/bin/python scripts/make_demo.py            # writes assets/demo/ (about 4-6 minutes on 2 cores)

What the base model learns here (plain next-token prediction on every weight):
- English-like sentences from assets/tokenizer_corpus.txt;
- arithmetic written as equations, "47 + 38 = 85" and "47 - 38 = 9";
- the Alpaca instruction template on *other* questions: "What is 47 - 38?", "Add 47 and 38.",
  "What number comes after 41?", "Is 47 greater than 38?" ... each answered "The answer is ...".

What it never sees is the demo question itself: "What is 47 + 38?" in the instruction template. The
base model therefore answers it wrongly (it reads it like the subtraction question and subtracts), and
a couple of minutes of adapter fine-tuning on `assets/demo/train.jsonl` teaches it — the accuracy on
`assets/demo/eval.json` rises visibly. Outputs (deterministic for a seed, up to float rounding):

    assets/demo/model/         config.json, model.safetensors (hub per-expert names), tokenizer files
    assets/demo/train.jsonl    2,000 rows of two-digit addition (LLM-Adapters format)
    assets/demo/eval.json      100 held-out rows (no (a, b) pair of the training set)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.data import alpaca_prompt  # noqa: E402
from engine.data.synthetic import addition_rows  # noqa: E402
from engine.model import build_tokenizer, tiny_config
from engine.model.tiny import CORPUS  # noqa: E402

FAMILY = "qwen3_moe"
SIZES = dict(layers=4, hidden=128, experts=8, top_k=2)
EXPERT_WIDTH = 128  # moe_intermediate_size: the tiny default (hidden / 2) is too narrow to learn carries
TRAIN_ROWS, EVAL_ROWS = 2000, 100
TRAIN_SEED, EVAL_SEED = 1, 2


# ---- pretraining text -----------------------------------------------------------------------

def _corpus_lines() -> list[str]:
    lines = [ln.strip() for ln in CORPUS.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("###") and "+" not in ln]


def _two_digit(rng: random.Random) -> int:
    return rng.randint(10, 99)


def _equation(rng: random.Random) -> str:
    a, b = _two_digit(rng), _two_digit(rng)
    if rng.random() < 0.7:
        return f"{a} + {b} = {a + b}"
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b}"


def _instruction(rng: random.Random, words: list[str]) -> tuple[str, str]:
    """One Alpaca-template task that is not the demo task (never "What is a + b?")."""
    kind = rng.random()
    a, b = _two_digit(rng), _two_digit(rng)
    if kind < 0.3:
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", f"The answer is {a - b}"
    if kind < 0.55:
        return f"Add {a} and {b}.", f"The answer is {a + b}"
    if kind < 0.7:
        n = rng.randint(1, 198)
        return f"What number comes after {n}?", f"The answer is {n + 1}"
    if kind < 0.75:
        n = rng.randint(2, 199)
        return f"What number comes before {n}?", f"The answer is {n - 1}"
    if kind < 0.9:
        return f"Is {a} greater than {b}?", f"The answer is {'true' if a > b else 'false'}"
    w = rng.choice(words)
    return f"Repeat the word {w}.", f"The answer is {w}"


class Pretraining:
    """An endless stream of documents — sentences, equations, instruction rows — each ending with EOS,
    concatenated and cut into fixed-length chunks (no padding: every token trains)."""

    def __init__(self, tokenizer, seed: int, seq_len: int = 128):
        self.tok, self.rng, self.seq_len = tokenizer, random.Random(seed), seq_len
        self.lines = _corpus_lines()
        self.words = sorted({w.strip(".,?!") for ln in self.lines for w in ln.split() if w.isalpha() and len(w) > 2})
        self.eos = tokenizer.eos_token_id
        self.buffer: list[int] = []

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def document(self) -> list[int]:
        """One document, tokenised as the engine's alpaca template does (prompt and reply apart), with EOS."""
        r, rng = self.rng.random(), self.rng
        if r < 0.1:
            ids = self._ids(" ".join(rng.choice(self.lines) for _ in range(rng.randint(2, 6))))
        elif r < 0.6:
            ids = self._ids("\n".join(_equation(rng) for _ in range(rng.randint(3, 8))))
        else:
            instruction, output = _instruction(rng, self.words)
            ids = self._ids(alpaca_prompt(instruction)) + self._ids(output)
        return ids + [self.eos]

    def batch(self, n: int) -> torch.Tensor:
        """`n` chunks of `seq_len` tokens."""
        while len(self.buffer) < n * self.seq_len:
            self.buffer += self.document()
        ids = torch.tensor(self.buffer[: n * self.seq_len]).view(n, self.seq_len)
        self.buffer = self.buffer[n * self.seq_len:]
        return ids


# ---- the model and its pretraining ----------------------------------------------------------

def pretrain(steps: int, batch: int, lr: float, seed: int, log_every: int = 100):
    """A Qwen3-MoE of `SIZES`, every weight trained for `steps` AdamW steps; returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config(FAMILY, vocab_size=len(tokenizer), **SIZES)
    config.output_router_logits = False
    config.moe_intermediate_size = EXPERT_WIDTH
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"make_demo: {FAMILY} {SIZES}, expert width {EXPERT_WIDTH}, {n_params / 1e6:.2f} M parameters; pretraining {steps} steps of {batch}")
    stream = Pretraining(tokenizer, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model.train()
    t0, avg = time.time(), None
    for step in range(1, steps + 1):
        ids = stream.batch(batch)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % log_every == 0 or step == steps:
            extra = f"  equations {equation_accuracy(model, tokenizer):.0%}" if step % (5 * log_every) == 0 else ""
            print(f"  step {step}/{steps}  loss {avg:.3f}  {time.time() - t0:.0f}s{extra}", flush=True)
            model.train()
    model.eval()
    return model, tokenizer


@torch.inference_mode()
def equation_accuracy(model, tokenizer, n: int = 64) -> float:
    """Share of `a + b =` completions (fixed two-digit problems) the model gets right: its arithmetic."""
    model.eval()
    rng = random.Random(1234)
    pairs = [(_two_digit(rng), _two_digit(rng)) for _ in range(n)]
    prompts = [tokenizer(f"{a} + {b} =", add_special_tokens=False)["input_ids"] for a, b in pairs]
    ids = torch.tensor(prompts)  # same length: two digits each
    seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    outs = tokenizer.batch_decode(seq[:, ids.shape[1]:], skip_special_tokens=True)
    return sum(o.strip().split("\n")[0].strip() == str(a + b) for o, (a, b) in zip(outs, pairs)) / n


@torch.inference_mode()
def answer(model, tokenizer, instructions: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy replies to Alpaca-template instructions (a quick check of what the model learnt)."""
    outs = []
    for ins in instructions:
        ids = torch.tensor([tokenizer(alpaca_prompt(ins), add_special_tokens=False)["input_ids"]])
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


# ---- the demo task --------------------------------------------------------------------------

def task_rows() -> tuple[list[dict], list[dict]]:
    """Training rows and held-out evaluation rows of two-digit addition (no (a, b) pair in both)."""
    train = addition_rows(TRAIN_ROWS, seed=TRAIN_SEED)
    seen = {r["instruction"] for r in train}
    evals = [r for r in addition_rows(4 * EVAL_ROWS, seed=EVAL_SEED) if r["instruction"] not in seen]
    unique = list({r["instruction"]: r for r in evals}.values())[:EVAL_ROWS]
    return train, unique


def save_model(model_dir: Path, model, tokenizer, dtype: torch.dtype) -> None:
    """The checkpoint (hub per-expert names) and tokenizer in `model_dir`, replacing what was there; readable by
    everyone (save_pretrained writes the weights 0600; the demo and the testbed are meant to be shared)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for old in model_dir.iterdir():
        old.unlink()
    model.to(dtype).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for f in model_dir.iterdir():
        f.chmod(0o644)


def write_outputs(out: Path, model, tokenizer, dtype: torch.dtype) -> None:
    """The checkpoint, tokenizer, train.jsonl and eval.json under `out`."""
    save_model(out / "model", model, tokenizer, dtype)
    train, evals = task_rows()
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for r in train:
            f.write(json.dumps(r) + "\n")
    (out / "eval.json").write_text(json.dumps(evals, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Pretrain the demo model and write assets/demo/."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "assets" / "demo"), help="output folder (default: assets/demo)")
    p.add_argument("--steps", type=int, default=2500, help="pretraining steps")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="dtype of the saved weights")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tokenizer = pretrain(args.steps, args.batch, args.lr, args.seed)
    probe = ["What is 52 - 17?", "Add 52 and 17.", "What number comes after 64?", "Is 31 greater than 45?",
             "What is 52 + 17?"]
    for q, a in zip(probe, answer(model, tokenizer, probe)):
        print(f"  {q!r} -> {a!r}")
    out = Path(args.out)
    write_outputs(out, model, tokenizer, getattr(torch, args.dtype))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"make_demo: wrote {out} ({size / 1e6:.1f} MB) in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
