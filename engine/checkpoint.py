"""Training checkpoints: adapter tensors, optimizer and scheduler state, RNG states and the data
position, written into `checkpoints/step-N/` through a temp folder and a rename, so a crash never
leaves a half-written checkpoint that looks complete."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.json"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint taken after optimizer step `step`."""
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def rng_state() -> dict:
    """Every random generator's state, to restore on resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by rng_state()."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, adapter: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict, keep: int = 2, extra: dict | None = None) -> Path:
    """Write a complete checkpoint atomically (temp folder, then rename); keep the newest `keep`. `extra`
    joins the torch state (e.g. every rank's RNG, engine.distributed)."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.contiguous().cpu() for n, t in adapter.items()}, str(tmp / "adapter.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                **(extra or {})}, tmp / "trainer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted(p for p in final.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(adapter tensors, torch state {optimizer, scheduler, rng}, trainer_state.json) of a checkpoint."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / "adapter.safetensors"))
    torch_state = torch.load(path / "trainer.pt", weights_only=False)
    return tensors, torch_state, json.loads((path / STATE_FILE).read_text())
