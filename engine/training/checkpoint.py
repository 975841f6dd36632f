"""Training checkpoints: adapter tensors, optimizer and scheduler state, RNG states and the data
position, written into `checkpoints/step-N/` through a temp folder and a rename, so a crash never
leaves a half-written checkpoint that looks complete. Each checkpoint carries the SHA-256 of its files
(`checksums.json`, written last); resume verifies them and falls back to the previous good checkpoint,
with a warning, when the newest is damaged."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..io import DamagedFileError, load_safetensors_checked, sha256_file, verify_sha256

STATE_FILE = "trainer_state.json"
CHECKSUM_FILE = "checksums.json"
_COMPLETE = re.compile(r"^step-\d+$")  # step-N.tmp is a checkpoint still (or never finished) being written


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint taken after optimizer step `step`."""
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run (renamed into place, state file present), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _COMPLETE.match(p.name) and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None (its files are not verified: see load_latest)."""
    done = checkpoints(run_dir)
    return done[-1] if done else None


def remove_unfinished(run_dir: str | Path) -> list[Path]:
    """Delete the `step-N.tmp` folders a crash or a full disk left; returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    left = [p for p in root.glob("step-*.tmp")] if root.is_dir() else []
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    return left


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
    """Write a complete checkpoint atomically (temp folder, then rename), with the SHA-256 of each file;
    keep the newest `keep`. `extra` joins the torch state (e.g. every rank's RNG, engine.training.distributed).
    On any error (a full disk) the temp folder is removed and the error raised."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({n: t.contiguous().cpu() for n, t in adapter.items()}, str(tmp / "adapter.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    **(extra or {})}, tmp / "trainer.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: str | Path) -> None:
    """Raise DamagedFileError naming the file of a checkpoint whose bytes are not those it was written with
    (checkpoints from before checksums are only checked by loading them)."""
    path = Path(path)
    sums_file = path / CHECKSUM_FILE
    if not sums_file.is_file():
        return
    try:
        sums = json.loads(sums_file.read_text())
    except ValueError:
        sums = None
    if not isinstance(sums, dict):
        raise DamagedFileError(f"{sums_file} is damaged (not a JSON object of checksums).")
    for name in ("adapter.safetensors", "trainer.pt", STATE_FILE):
        if name not in sums:
            raise DamagedFileError(f"{sums_file} has no checksum for {name}.")
        verify_sha256(path / name, sums[name], what="the checkpoint")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(adapter tensors, torch state {optimizer, scheduler, rng}, trainer_state.json) of a verified checkpoint;
    DamagedFileError naming the file when one is damaged."""
    path = Path(path)
    verify_checkpoint(path)
    current = path / "adapter.safetensors"
    try:
        tensors = load_safetensors_checked(current)  # parses, no NaN / inf (its checksum was verified above)
        current = path / "trainer.pt"
        # onto the CPU whatever device wrote it: a GPU's tensors would otherwise unpickle on that GPU (another rank's
        # optimizer state on cuda:0) or fail on a machine without it; each rank moves its share to its own device
        torch_state = torch.load(current, weights_only=False, map_location="cpu")
        current = path / STATE_FILE
        state = json.loads(current.read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a trainer state")
    except DamagedFileError:
        raise
    except Exception as e:  # truncated or foreign bytes: safetensors, pickle and JSON each raise their own
        raise DamagedFileError(f"{current} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})."
                               ) from None
    return tensors, torch_state, state


def load_latest(run_dir: str | Path, warn: Callable[[str], None]) -> tuple[Path, dict, dict, dict] | None:
    """The newest checkpoint that verifies and loads: (path, tensors, torch state, trainer state), or None when
    the run has none. A damaged one is named through `warn` and the previous one tried; all damaged: an error."""
    damaged = []
    for path in reversed(checkpoints(run_dir)):
        try:
            return (path, *load_checkpoint(path))
        except DamagedFileError as e:
            damaged.append(str(e))
            warn(f"{e} Resuming from the checkpoint before it.")
    if damaged:
        raise DamagedFileError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}: {damaged[-1]} "
                               "Train again into a new --out.")
    return None
