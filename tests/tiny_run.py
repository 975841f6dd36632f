"""A tiny finished run for the tests of what reads one (chat, eval, export): `moetune train`'s engine function
on a tiny bf16-stored checkpoint (so that bf16-held experts are the checkpoint's own values and every export
path starts from the same base), embedded LoRA inside the experts plus attention LoRA, a few steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from engine.config import from_dict
from engine.data.synthetic import last_digit_rows
from engine.training import train

STEPS = 4


def bf16_copy(ckpt: Path, dst: Path) -> Path:
    """`ckpt` copied to `dst` with its weights stored in bf16, as hub releases store them."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, dst)
    state = {n: w.to(torch.bfloat16) for n, w in load_file(str(dst / "model.safetensors")).items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def train_tiny_run(base: Path, root: Path, steps: int = STEPS) -> Path:
    """Train `steps` steps of embedded LoRA (inside the experts) + attention LoRA on `base`; returns the run folder
    (and writes a 4-row benchmark at root/lastdigit/test.json for `moetune eval`)."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "train.json"
    data.write_text(json.dumps(last_digit_rows(64, seed=1)))
    bench = root / "lastdigit" / "test.json"
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text(json.dumps(last_digit_rows(4, seed=2)))
    cfg = {"model": {"path": str(base), "quant": "bf16"},
           "adapter": {"kind": "lora", "placement": "inside", "rank": 8, "alpha": 16.0, "dropout": 0.0},
           "routing": {"strategy": "embedded", "attention_lora": True},
           "data": {"train": str(data), "template": "alpaca", "max_len": 128},
           "train": {"max_steps": steps, "lr": 1e-2, "warmup_steps": 0, "micro_batch": 8, "seed": 0,
                     "save_every": 1000, "gradient_checkpointing": False}}
    out = root / "run"
    summary = train(from_dict(cfg), out, echo=False, device="cpu")
    assert summary["status"] == "done", summary
    return out
