#!/usr/bin/env python
"""Build the routing testbed (issue 22): a small Qwen3-MoE (4 layers, hidden 128, 16 experts, top-2) pretrained on
CPU on four fact domains with their own vocabularies (scripts/testbed_data.py) plus the demo's arithmetic and
instruction mix, with a router balance loss, so its router specialises by domain; then the fine-tuning task: every
domain's facts changed by its own rule, trained on 40 entities per domain and scored on 24 held out.

    .venv/bin/python scripts/make_testbed.py --threads 1   # writes assets/testbed/ (26 minutes on 2 busy cores)
    .venv/bin/python scripts/make_testbed.py --rows-only   # the task files and report of the model already there

Pretraining: 1,500 AdamW steps of 16 x 128 tokens, every weight, transformers' balance loss at 0.01; the domain
words start with a shared embedding direction per domain (DOMAIN_PRIOR). The shipped model remembers every
pretrained fact (100 % on known.json) and answers the task and the addition control wrongly (0 %).

Outputs (deterministic for a seed, up to float rounding and thread count):
    assets/testbed/model/          config.json, model.safetensors (fp16, hub per-expert names), tokenizer files
    assets/testbed/train.jsonl     160 rows: the changed facts of 40 entities per domain ("... was 3, now vorka6")
    assets/testbed/eval.json       96 held-out rows: the changed facts of the other 24 per domain
    assets/testbed/known.json      the same 96 questions with their pretrained (old) numbers
    assets/testbed/report.json     sizes, pretraining loss, the base model's accuracies, the router's specialisation
The addition control reuses assets/demo/{train.jsonl, eval.json}: "What is a + b?" never appears in pretraining.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from make_demo import save_model  # noqa: E402
from testbed_data import Documents, build_domains, task_row, task_rows, tokenizer_corpus  # noqa: E402
from engine.model import build_tokenizer, tiny_config  # noqa: E402

FAMILY = "qwen3_moe"
SIZES = dict(layers=4, hidden=128, experts=16, top_k=2)
EXPERT_WIDTH = 64
VOCAB = 2048
BALANCE = 0.01  # transformers' router_aux_loss_coef during pretraining (off in the saved config)
#: norm of the direction every token of one domain shares at init (a token embedding's norm is about 1): what a
#: long pretraining learns from co-occurrence, given up front so that 25 minutes of CPU end with a router that
#: separates the domains (measured in report.json; without it: NMI 0.09-0.17 on domain tokens, 0 at the answer)
DOMAIN_PRIOR = 1.0


class Stream:
    """Documents concatenated and cut into `seq_len` chunks (no padding: every token trains)."""

    def __init__(self, docs: Documents, seq_len: int = 128):
        self.docs, self.seq_len, self.buffer = docs, seq_len, []

    def batch(self, n: int) -> torch.Tensor:
        while len(self.buffer) < n * self.seq_len:
            self.buffer += self.docs.document()[1]
        ids = torch.tensor(self.buffer[: n * self.seq_len]).view(n, self.seq_len)
        self.buffer = self.buffer[n * self.seq_len:]
        return ids


def build(seed: int):
    """(model, tokenizer, domains): the random-weight testbed model and its tokenizer trained on the domains' text."""
    from transformers import AutoModelForCausalLM

    domains = build_domains(seed)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(tokenizer_corpus(domains, seed), encoding="utf-8")
        tokenizer = build_tokenizer(VOCAB, corpus)
    config = tiny_config(FAMILY, vocab_size=len(tokenizer), **SIZES)
    config.moe_intermediate_size = EXPERT_WIDTH
    config.output_router_logits, config.router_aux_loss_coef = True, BALANCE
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    add_domain_prior(model, tokenizer, domains, seed)
    return model, tokenizer, domains


def domain_tokens(tokenizer, domains) -> dict[int, int]:
    """Token id -> its domain, for the tokens that occur in one domain's words only."""
    owner: dict[int, set[int]] = {}
    for d in domains:
        for w in [d.attribute] + d.entities + d.fillers:
            for text in (w, " " + w, w.capitalize(), " " + w.capitalize()):
                for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
                    owner.setdefault(t, set()).add(d.index)
    return {t: next(iter(s)) for t, s in owner.items() if len(s) == 1}


@torch.no_grad()
def add_domain_prior(model, tokenizer, domains, seed: int) -> None:
    """Give every domain-only token's input embedding a shared direction of its domain (norm DOMAIN_PRIOR)."""
    g = torch.Generator().manual_seed(seed + 7)
    emb = model.get_input_embeddings().weight
    dirs = torch.linalg.qr(torch.randn(emb.shape[1], len(domains), generator=g))[0].T  # orthonormal [D, H]
    for t, d in domain_tokens(tokenizer, domains).items():
        emb[t] += DOMAIN_PRIOR * dirs[d]


def pretrain(model, tokenizer, domains, steps: int, batch: int, lr: float, seed: int, log_every: int = 100) -> list:
    """Every weight trained `steps` AdamW steps (warm-up, cosine to 5 %); returns [(step, smoothed loss)]."""
    stream = Stream(Documents(tokenizer, domains, seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)

    def factor(s: int) -> float:  # linear warm-up, then cosine down to 5 %
        if s < warm:
            return (s + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    t0, avg, curve = time.time(), None, []
    for step in range(1, steps + 1):
        ids = stream.batch(batch)
        loss = model(input_ids=ids, labels=ids).loss  # + router_aux_loss_coef x transformers' balance loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % log_every == 0 or step == steps:
            curve.append((step, round(avg, 4)))
            print(f"  step {step}/{steps}  loss {avg:.3f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    model.config.output_router_logits = False
    return curve


# ---- measurements ---------------------------------------------------------------------------

@torch.inference_mode()
def accuracy(model, tokenizer, rows: list[dict], batch: int = 32) -> float:
    """Greedy answers to Alpaca-template rows (left-padded batches), scored on the last number."""
    from engine.data import alpaca_prompt
    from engine.evaluate.extract import extract

    tokenizer.padding_side = "left"
    right = 0
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        enc = tokenizer([alpaca_prompt(r["instruction"]) for r in part], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        seq = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        outs = tokenizer.batch_decode(seq[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(extract("number", o) == float(r["answer"]) for o, r in zip(outs, part))
    tokenizer.padding_side = "right"
    return right / len(rows)


def _routes(model, ids: list[int]) -> list[torch.Tensor]:
    """Each MoE layer's top-k expert indices [T, k] for one sequence."""
    got: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: got.append(out[2].clone()))
             for layer in model.model.layers]
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return got


def _scores(counts: torch.Tensor) -> dict:
    """counts [groups, experts] of routed slots -> purity (share of slots that go to an expert's majority group;
    chance = the largest group's share) and NMI (I(group; expert) / H(group): 0 = experts carry nothing of the
    group, 1 = the expert tells the group)."""
    p = counts / counts.sum()
    pg, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pg @ pe)[nz]).log()).sum())
    hg = float(-(pg[pg > 0] * pg[pg > 0].log()).sum())
    return {"purity": round(float(p.max(0).values.sum()), 3), "chance": round(float(pg.max()), 3),
            "nmi": round(mi / hg, 3)}


@torch.inference_mode()
def specialisation(model, tokenizer, domains, seed: int, per_group: int = 48) -> dict:
    """How the router separates the domains, per MoE layer: (a) every token of fresh documents of the four fact
    domains (template tokens included), (b) their domain-only tokens, (c) every token with the equations,
    instructions and English as three more groups, (d) the position that predicts a fact's number (the last token
    of "... ### Response:\\nThe answer is "), (e) the position that predicts the fine-tuning task's new number (the
    domain's word in "The answer was 3, now vorka")."""
    docs = Documents(tokenizer, domains, seed + 1000)
    groups: dict[str, list[list[int]]] = {}
    while min((len(groups.get(g, [])) for g in [f"domain-{d.index}" for d in domains]
               + ["equations", "instructions", "english"]), default=0) < per_group:
        g, ids = docs.document()
        if len(groups.setdefault(g, [])) < per_group:
            groups[g].append(ids)
    names = sorted(groups)
    E, L = model.config.num_experts, model.config.num_hidden_layers
    every = torch.zeros(L, len(names), E)
    answer = torch.zeros(L, len(domains), E)
    own = torch.zeros(L, len(domains), E)
    owned = domain_tokens(tokenizer, domains)
    for gi, g in enumerate(names):
        for ids in groups[g]:
            routes = _routes(model, ids)
            for layer, idx in enumerate(routes):
                every[layer, gi] += torch.bincount(idx.reshape(-1), minlength=E).float()
            if g.startswith("domain-"):
                mine = torch.tensor([owned.get(t) == int(g[7:]) for t in ids])
                for layer, idx in enumerate(routes):
                    own[layer, int(g[7:])] += torch.bincount(idx[mine].reshape(-1), minlength=E).float()
    task = torch.zeros(L, len(domains), E)
    rng = random.Random(seed)
    for d in domains:
        for e in rng.sample(d.entities, per_group):
            prompt, reply = docs.qa(d, e, d.facts[e])  # reply: "The answer is", " ", the number
            for layer, idx in enumerate(_routes(model, prompt + reply[:-1])):
                answer[layer, d.index] += torch.bincount(idx[-1], minlength=E).float()
            new = task_row(d, e)["output"]  # "The answer was 3, now vorka6": up to the new number
            for layer, idx in enumerate(_routes(model, prompt + docs.ids(new[:-1]))):
                task[layer, d.index] += torch.bincount(idx[-1], minlength=E).float()
    fact = [names.index(f"domain-{d.index}") for d in domains]
    return {"groups": names,
            "domains_all_tokens": [_scores(every[l, fact]) for l in range(L)],
            "domains_own_tokens": [_scores(own[l]) for l in range(L)],
            "all_groups_all_tokens": [_scores(every[l]) for l in range(L)],
            "domains_answer_position": [_scores(answer[l]) for l in range(L)],
            "domains_task_answer_position": [_scores(task[l]) for l in range(L)],
            "answer_position_experts": [[[int(c) for c in row] for row in answer[l]] for l in range(L)]}


def base_accuracy(model, tokenizer, rows: dict) -> dict:
    """The base model's greedy accuracy on the task files and on the addition control."""
    demo = json.loads((ROOT / "assets" / "demo" / "eval.json").read_text(encoding="utf-8"))
    return {"known (pretrained facts, held-out entities)": accuracy(model, tokenizer, rows["known"]),
            "eval (changed facts, held-out entities)": accuracy(model, tokenizer, rows["eval"]),
            "train (changed facts, trained entities)": accuracy(model, tokenizer, rows["train"]),
            "demo addition (assets/demo/eval.json)": accuracy(model, tokenizer, demo)}


def _write_rows(out: Path, rows: dict) -> None:
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for r in rows["train"]:
            f.write(json.dumps(r) + "\n")
    for name in ("eval", "known"):
        (out / f"{name}.json").write_text(json.dumps(rows[name], indent=1) + "\n", encoding="utf-8")


def rows_only(out: Path, seed: int) -> int:
    """The task files of an existing testbed written again (same domains for the seed), base accuracies renewed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    rows = task_rows(build_domains(seed))
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    report["base_accuracy"] = base_accuracy(model, tokenizer, rows)
    report["specialisation"] = specialisation(model, tokenizer, build_domains(seed), seed)
    print(json.dumps(report["base_accuracy"], indent=1))
    print_specialisation(report)
    _write_rows(out, rows)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


def print_specialisation(report: dict) -> None:
    for key, scores in report["specialisation"].items():
        if key.startswith(("domains_", "all_groups_")) and not key.endswith("_experts"):
            print(f"  {key}: " + "; ".join(f"L{i} purity {s['purity']} (chance {s['chance']}) NMI {s['nmi']}"
                                           for i, s in enumerate(scores)))


def write_outputs(out: Path, model, tokenizer, rows: dict, report: dict) -> None:
    save_model(out / "model", model, tokenizer, torch.float16)
    _write_rows(out, rows)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "assets" / "testbed"), help="output folder (default: assets/testbed)")
    p.add_argument("--steps", type=int, default=1500, help="pretraining steps")
    p.add_argument("--batch", type=int, default=16, help="sequences of 128 tokens per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--rows-only", action="store_true",
                   help="keep OUT/model; write the task files again and score the base model on them")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rows_only:
        return rows_only(Path(args.out), args.seed)
    t0 = time.time()
    model, tokenizer, domains = build(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"make_testbed: {FAMILY} {SIZES}, expert width {EXPERT_WIDTH}, vocab {len(tokenizer)}, "
          f"{n_params / 1e6:.2f} M parameters; pretraining {args.steps} steps of {args.batch} x 128 tokens")
    curve = pretrain(model, tokenizer, domains, args.steps, args.batch, args.lr, args.seed)
    rows = task_rows(domains)
    report = {"family": FAMILY, **SIZES, "expert_width": EXPERT_WIDTH, "vocab": len(tokenizer), "parameters": n_params,
              "steps": args.steps, "batch": args.batch, "seq_len": 128, "lr": args.lr, "seed": args.seed,
              "router_aux_loss_coef": BALANCE, "loss_curve": curve,
              "base_accuracy": base_accuracy(model, tokenizer, rows),
              "specialisation": specialisation(model, tokenizer, domains, args.seed),
              "domains": [{"attribute": d.attribute, "entities": d.entities[:3] + ["..."], "rule": d.rule}
                          for d in domains]}
    report["seconds"] = round(time.time() - t0)
    print(json.dumps({k: report[k] for k in ("base_accuracy",)}, indent=1))
    print_specialisation(report)
    out = Path(args.out)
    write_outputs(out, model, tokenizer, rows, report)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"make_testbed: wrote {out} ({size / 1e6:.1f} MB) in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
