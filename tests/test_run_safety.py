"""Nothing lost, nothing silently wrong in a run folder: the lock, a crash after the last checkpoint, unfinished
and damaged checkpoints, a full disk, NaN/inf in the config or the loss, and bad command-line input. Each case
is the way a user meets it: a second trainer, kill -9, a flipped byte, a 6 MB disk."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.training import checkpoint as ckpt, loop as train_mod
from engine.cli import main
from engine.config import from_dict
from engine.runs import read_events
from engine.data.synthetic import last_digit_rows
from engine.runs import RunError
from engine.training import train

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    """A tiny qwen3_moe, 64 training rows, and a config of 6 steps with a checkpoint every 2."""
    root = tmp_path_factory.mktemp("safety")
    data = root / "train.json"
    data.write_text(json.dumps(last_digit_rows(64, seed=1)))
    cfg = {"model": {"path": str(tiny_checkpoint("qwen3_moe")), "quant": "bf16"},
           "adapter": {"kind": "lora", "placement": "inside", "rank": 4, "alpha": 8.0, "dropout": 0.1},
           "routing": {"strategy": "embedded", "attention_lora": True},
           "data": {"train": str(data), "template": "alpaca", "max_len": 128},
           "train": {"max_steps": 6, "lr": 3e-3, "micro_batch": 4, "save_every": 2, "gradient_checkpointing": False}}
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    full = root / "full"
    train(from_dict(cfg), full, echo=False)
    return {"cfg": cfg, "file": cfg_file, "full": full, "root": root}


def _losses(run: Path) -> dict[int, float]:
    events, _ = read_events(run / "events.jsonl", 0)
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run / "events.jsonl", 0)[0] if e["type"] == kind]


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter.safetensors"))


def _same_as_full(setup, run: Path) -> None:
    """The resumed run's per-step losses and final adapter are those of the uninterrupted run."""
    full, got = _losses(setup["full"]), _losses(run)
    assert all(got[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7) for s in full), (full, got)
    a, b = _adapter(setup["full"]), _adapter(run)
    assert set(a) == set(b) and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


def _cli(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=300)


# ---- item 1: the lock ---------------------------------------------------------------------------------

def test_a_live_lock_refuses_with_its_pid_and_a_stale_one_is_taken_over(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a trainer alive (or SIGSTOPped)
    try:
        (out / ".lock").write_text(str(owner.pid))
        with pytest.raises(RunError, match=f"pid {owner.pid}"):
            train(from_dict(setup["cfg"]), out, echo=False)
        assert (out / ".lock").read_text() == str(owner.pid), "the refused run must leave the owner's lock alone"
        assert not (out / "adapter.safetensors").exists() and not (out / "checkpoints").exists()
    finally:
        owner.kill()
        owner.wait()
    # the owner is gone: its lock is stale and the next training takes it over, and releases it at the end
    summary = train(from_dict(setup["cfg"]), out, echo=False)
    assert summary["status"] == "done" and not (out / ".lock").exists()


# ---- items 2 and 3: crash points and unfinished checkpoints ----------------------------------------------

def test_a_run_killed_after_its_last_checkpoint_finishes_on_resume(setup, tmp_path, monkeypatch):
    import engine.adapters as routing

    real = routing.save_adapter

    def killed(*a, **k):
        raise KeyboardInterrupt  # as a kill between the final checkpoint and the adapter's write

    monkeypatch.setattr(routing, "save_adapter", killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(from_dict(setup["cfg"]), out, echo=False)
    assert ckpt.latest_checkpoint(out).name == "step-0000006" and not (out / "adapter.safetensors").exists()
    monkeypatch.setattr(routing, "save_adapter", real)
    summary = train(from_dict(setup["cfg"]), out, resume=True, echo=False)
    assert summary["status"] == "done" and summary["step"] == 6
    assert summary["final_loss"] == _losses(setup["full"])[6]
    _same_as_full(setup, out)


def test_resume_ignores_and_removes_unfinished_checkpoint_folders(setup, tmp_path):
    out = tmp_path / "run"
    train(from_dict(setup["cfg"]), out, echo=False, stop_after=4)
    # a crash while step 5's checkpoint was being written (its state file already there)
    shutil.copytree(ckpt.checkpoint_dir(out, 4), out / "checkpoints" / "step-0000005.tmp")
    (out / "checkpoints" / "step-0000005.tmp" / "trainer_state.json").write_text(json.dumps({"step": 5}))
    assert ckpt.latest_checkpoint(out).name == "step-0000004"
    train(from_dict(setup["cfg"]), out, resume=True, echo=False)
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert _events(out, "start")[-1]["resumed_from"].endswith("step-0000004")
    _same_as_full(setup, out)


# ---- item 5: damaged checkpoints ---------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # inside the tensor data, past the header: still parses, wrong values
    path.write_bytes(bytes(data))


DAMAGE = {"truncated adapter": ("adapter.safetensors", _truncate),
          "truncated trainer.pt": ("trainer.pt", _truncate),
          "broken trainer_state.json": ("trainer_state.json", lambda p: p.write_text("{")),
          "flipped adapter bytes": ("adapter.safetensors", _flip)}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_previous_good_one_used(setup, tmp_path, case):
    name, damage = DAMAGE[case]
    out = tmp_path / "run"
    train(from_dict(setup["cfg"]), out, echo=False, stop_after=4)
    bad = ckpt.checkpoint_dir(out, 4) / name
    damage(bad)
    summary = train(from_dict(setup["cfg"]), out, resume=True, echo=False)
    assert summary["status"] == "done"
    warnings = _events(out, "warning")
    assert len(warnings) == 1 and str(bad) in warnings[0]["message"], warnings
    assert _events(out, "start")[-1]["resumed_from"].endswith("step-0000002")
    _same_as_full(setup, out)


def test_every_checkpoint_damaged_is_one_clear_error(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train(from_dict(setup["cfg"]), out, echo=False, stop_after=4)
    for c in ckpt.checkpoints(out):
        _flip(c / "adapter.safetensors")
    assert main(["train", str(setup["file"]), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "step-0000002" in err and "Traceback" not in err
    assert _events(out, "error")[-1]["kind"] == "DamagedFileError"


# ---- item 4: a full disk -------------------------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_earlier_checkpoints(setup, tmp_path, monkeypatch,
                                                                                   capsys):
    import safetensors.torch as st

    real, calls = st.save_file, []

    def full_on_second(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(st, "save_file", full_on_second)
    out = tmp_path / "run"
    assert main(["train", str(setup["file"]), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()  # the progress bar, then one line
    assert "Traceback" not in err and err.splitlines()[-1].startswith(
        f"moetune train: error: no space left on the disk under {out};"), err
    assert [c.name for c in ckpt.checkpoints(out)] == ["step-0000002"]
    ckpt.load_checkpoint(ckpt.checkpoint_dir(out, 2))  # intact and verified
    assert not list((out / "checkpoints").glob("*.tmp")) and not (out / ".lock").exists()
    assert "no space left" in _events(out, "error")[-1]["message"]


@contextlib.contextmanager
def _small_disk(path: Path, size: str):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("free_kb", [300, 4])
def test_a_really_full_disk_as_out_ends_with_one_line_and_no_traceback(setup, tmp_path, free_kb):
    """A 6 MB tmpfs as --out: filled but for `free_kb` KB (so the config, events or a checkpoint fails)."""
    with _small_disk(tmp_path / "disk", "6m") as disk:
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            f.write(b"\0" * max(0, 6 * 1024 * 1024 - free_kb * 1024))
        out = disk / "run"
        r = _cli(["train", str(setup["file"]), "--out", str(out), "--set", "train.save_every=1"])
        assert r.returncode == 1, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "no space left" in r.stderr.splitlines()[-1], r.stderr[-2000:]
        assert not list(out.glob("checkpoints/*.tmp")) and not (out / ".lock").exists()
        for c in ckpt.checkpoints(out):  # whatever was completed before the disk filled is whole
            ckpt.load_checkpoint(c)
        filler.unlink()
        if (out / "events.jsonl").exists():
            assert all(e["type"] != "done" for e in read_events(out / "events.jsonl", 0)[0])


# ---- item 8: NaN and inf ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["train.lr=nan", "adapter.alpha=.inf", "train.weight_decay=nan",
                                      "train.epochs=1e400"])
def test_non_finite_numbers_are_refused_by_name(setup, tmp_path, capsys, override):
    out = tmp_path / "run"
    assert main(["train", str(setup["file"]), "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err
    assert override.split("=")[0] in err and "not a finite number" in err, err
    assert not out.exists()


def test_a_loss_that_becomes_nan_stops_with_an_error_and_keeps_the_last_good_checkpoint(setup, tmp_path,
                                                                                        monkeypatch, capsys):
    real, steps = train_mod.micro_batch_major_step, []

    def nan_at_step_3(*a, **k):
        loss, aux, usage = real(*a, **k)
        steps.append(loss)
        return (math.nan if len(steps) == 3 else loss), aux, usage

    monkeypatch.setattr(train_mod, "micro_batch_major_step", nan_at_step_3)
    out = tmp_path / "run"
    assert main(["train", str(setup["file"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "step 3" in err and "step-0000002" in err, err
    assert [c.name for c in ckpt.checkpoints(out)] == ["step-0000002"]
    tensors, _, state = ckpt.load_checkpoint(ckpt.checkpoint_dir(out, 2))
    assert state["step"] == 2 and math.isfinite(state["loss"])
    assert not (out / "adapter.safetensors").exists() and not (out / "summary.json").exists()
    assert _events(out, "error")[-1]["kind"] == "Diverged" and not _events(out, "done")


# ---- item 9: bad command-line input ---------------------------------------------------------------------

def test_bad_config_shapes_out_paths_and_tiny_model_sizes_are_one_line(setup, tmp_path, capsys):
    for text, kind in (("- model\n- adapter\n", "list"), ("42\n", "int")):
        f = tmp_path / f"{kind}.yaml"
        f.write_text(text)
        assert main(["train", str(f), "--out", str(tmp_path / "r"), "--set", "train.lr=1e-3"]) == 2
        err = capsys.readouterr().err
        assert str(f) in err and "must be a YAML mapping" in err and kind in err, err
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    assert main(["train", str(setup["file"]), "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert f"--out {a_file} is a file" in err and a_file.read_text() == "mine"
    r = _cli(["tiny-model", "--family", "olmoe", "--out", str(tmp_path / "tiny"), "--layers", "0"])
    assert r.returncode == 2 and "--layers 0" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "tiny").exists()
