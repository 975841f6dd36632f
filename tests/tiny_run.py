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


def tiny_run_config(base: Path, root: Path, steps: int = STEPS) -> dict:
    """The config of `steps` steps of embedded LoRA (inside the experts) + attention LoRA on `base`, with its
    training rows at root/train.json (and a 4-row benchmark at root/lastdigit/test.json for `moetune eval`)."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "train.json"
    data.write_text(json.dumps(last_digit_rows(64, seed=1)))
    bench = root / "lastdigit" / "test.json"
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text(json.dumps(last_digit_rows(4, seed=2)))
    return {"model": {"path": str(base), "quant": "bf16"},
            "adapter": {"kind": "lora", "placement": "inside", "rank": 8, "alpha": 16.0, "dropout": 0.0},
            "routing": {"strategy": "embedded", "attention_lora": True},
            "data": {"train": str(data), "template": "alpaca", "max_len": 128},
            "train": {"max_steps": steps, "lr": 1e-2, "warmup_steps": 0, "micro_batch": 8, "seed": 0,
                      "save_every": 1000, "gradient_checkpointing": False}}


def train_tiny_run(base: Path, root: Path, steps: int = STEPS) -> Path:
    """Train `tiny_run_config` on `base`; returns the run folder."""
    out = root / "run"
    summary = train(from_dict(tiny_run_config(base, root, steps)), out, echo=False, device="cpu")
    assert summary["status"] == "done", summary
    return out


def train_whole_and_resumed(cfg: dict, root: Path) -> tuple[Path, Path]:
    """The 6-step run `cfg` trained in one go (root/full) and stopped after step 3 then resumed (root/parts), for
    `check_resume_chat_eval`."""
    full, parts = root / "full", root / "parts"
    assert train(from_dict(cfg), full, echo=False, device="cpu")["status"] == "done"
    assert train(from_dict(cfg), parts, echo=False, device="cpu", stop_after=3)["status"] == "stopped"
    assert train(from_dict(cfg), parts, resume=True, echo=False, device="cpu")["status"] == "done"
    return full, parts


def check_resume_chat_eval(full: Path, parts: Path, tmp_path: Path, capsys) -> dict[int, float]:
    """A run trained in one go (`full`) and one stopped and resumed (`parts`): the same losses at steps 1-6; `full`
    chats and scores a 4-row last-digit benchmark through the CLI. Returns `full`'s losses by step."""
    import pytest

    from engine.cli import main
    from engine.runs.events import read_events

    def steps(run: Path) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in read_events(run / "events.jsonl", 0)[0] if e["type"] == "step"}

    a, b = steps(full), steps(parts)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-7) for s in a), (a, b)
    assert main(["chat", "--run", str(full), "--prompt", "What is the last digit of 4817?"]) == 0
    assert capsys.readouterr().out.strip()
    bench = tmp_path / "lastdigit" / "test.json"
    bench.parent.mkdir(exist_ok=True)
    bench.write_text(json.dumps(last_digit_rows(4, seed=2)))
    assert main(["eval", "--run", str(full), "--bench", str(bench), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["benchmarks"]
    assert result["rows"] == 4 and 0 <= result["correct"] <= 4
    return a
