"""Damaged finished runs and full disks under an export: moetune.json carries the SHA-256 of adapter.safetensors,
checked wherever a run's adapter is read (chat, eval, export); a truncated or changed adapter, NaN / inf in it,
or a moetune.json that is not one is one line naming the file, never a traceback and never rc 0; an export whose
tensors or logits are non-finite fails instead of reporting "exact"; a full disk during an export is one line
naming the folder and leaves nothing half-written (simulated ENOSPC, and a real 6 MB tmpfs where mounting works)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.export import ExportError, export_run
from engine.io import sha256_file
from engine.model import load_model
from engine.adapters import load_adapter
from engine.adapters.files import ADAPTER_FILE, META_FILE

from .tiny_run import bf16_copy, train_tiny_run

MOETUNE = Path(sys.executable).parent / "moetune"
#: the key of moetune.json holding adapter.safetensors' SHA-256 (part of the run folder's format)
CHECKSUM_KEY = "adapter_sha256"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, tmp_path_factory) -> Path:
    """A tiny trained run (a few steps of embedded LoRA inside the experts + attention LoRA on a bf16 base)."""
    root = tmp_path_factory.mktemp("finished")
    base = bf16_copy(tiny_checkpoint("qwen3_moe"), root / "base")
    return train_tiny_run(base, root)


def copy_run(run: Path, dst: Path) -> Path:
    """A copy of the run folder to damage (the benchmark beside it stays where it is)."""
    shutil.copytree(run, dst)
    return dst


def bench(run: Path) -> str:
    return str(run.parent / "lastdigit" / "test.json")


def error_line(capsys) -> str:
    """What a command printed to stderr: exactly one line, no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def read_adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / ADAPTER_FILE))


def rewrite_adapter(run: Path, tensors: dict[str, torch.Tensor], checksum: bool = True) -> None:
    """Replace the run's adapter; `checksum`: record the new file's SHA-256 (a run that saved these values itself),
    else drop it (a run written before moetune.json carried it)."""
    from safetensors.torch import save_file

    save_file(tensors, str(run / ADAPTER_FILE), metadata={"format": "pt", "producer": "moetune"})
    meta = json.loads((run / META_FILE).read_text())
    if checksum:
        meta[CHECKSUM_KEY] = sha256_file(run / ADAPTER_FILE)
    else:
        meta.pop(CHECKSUM_KEY, None)
    (run / META_FILE).write_text(json.dumps(meta))


def commands(run: Path, tmp_path: Path) -> dict[str, list[str]]:
    """chat, eval and export (each format) of `run`, as a user types them."""
    out = {"chat": ["chat", "--run", str(run), "--prompt", "What is the last digit of 1234?", "--max-new-tokens", "2",
                    "--device", "cpu"],
           "eval": ["eval", "--run", str(run), "--bench", bench(run), "--limit", "2", "--device", "cpu"]}
    for fmt in ("hf", "peft", "gguf", "gguf-lora"):
        out[f"export-{fmt}"] = ["export", "--run", str(run), "--format", fmt, "--out", str(tmp_path / f"out-{fmt}"),
                                "--no-check"]
    return out


# ---- the checksum ------------------------------------------------------------------------------------------


def test_moetune_json_carries_the_adapters_sha256(finished):
    meta = json.loads((finished / META_FILE).read_text())
    assert meta[CHECKSUM_KEY] == sha256_file(finished / ADAPTER_FILE)


def test_truncated_adapter_is_one_line_for_chat_eval_and_export(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    data = (run / ADAPTER_FILE).read_bytes()
    (run / ADAPTER_FILE).write_bytes(data[: len(data) // 2])
    for what, argv in commands(run, tmp_path).items():
        assert main(argv) == 2, what
        line = error_line(capsys)
        assert str(run / ADAPTER_FILE) in line and "is damaged" in line, (what, line)
        assert not (tmp_path / f"out-{what.removeprefix('export-')}").exists(), what
    # the console script, as a user runs it
    proc = subprocess.run([str(MOETUNE), *commands(run, tmp_path)["export-hf"]], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(run / ADAPTER_FILE) in proc.stderr and "is damaged" in proc.stderr


def test_flipped_bytes_are_refused_by_chat_eval_and_export(finished, tmp_path, capsys):
    """Same size, a few bytes changed inside a tensor's data: the SHA-256 differs (it used to evaluate at 0 % and
    export as "exact" with rc 0)."""
    run = copy_run(finished, tmp_path / "run")
    data = bytearray((run / ADAPTER_FILE).read_bytes())
    for k in range(len(data) - 64, len(data) - 8, 4):
        data[k + 3] ^= 0x7F  # the high byte of an fp32: a huge value or NaN
    (run / ADAPTER_FILE).write_bytes(bytes(data))
    for what, argv in commands(run, tmp_path).items():
        assert main(argv) == 2, what
        line = error_line(capsys)
        assert f"{run / ADAPTER_FILE} is damaged: its SHA-256 is" in line, (what, line)
    proc = subprocess.run([str(MOETUNE), *commands(run, tmp_path)["eval"]], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "SHA-256" in proc.stderr, proc.stderr


def test_runs_written_before_the_checksum_still_load(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    tensors = read_adapter(run)
    rewrite_adapter(run, tensors, checksum=False)
    base = json.loads((run / META_FILE).read_text())["config"]["model"]["path"]
    peft = load_adapter(load_model(base, expert_quant="bf16"), run)
    loaded = dict(peft.trainable_parameters())
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n].detach().cpu(), t) for n, t in tensors.items())
    assert main(commands(run, tmp_path)["export-peft"]) == 0
    capsys.readouterr()
    # without a checksum a truncated file is still named, from its safetensors parse error
    data = (run / ADAPTER_FILE).read_bytes()
    (run / ADAPTER_FILE).write_bytes(data[: len(data) - 100])
    for what in ("chat", "export-hf"):
        assert main(commands(run, tmp_path)[what]) == 2, what
        line = error_line(capsys)
        assert f"{run / ADAPTER_FILE} is damaged: it does not read as safetensors" in line, line


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_adapter_is_refused_naming_the_tensor(finished, tmp_path, capsys, value):
    """Even with a matching checksum (a run that saved them itself) or none (an old run)."""
    run = copy_run(finished, tmp_path / "run")
    tensors = read_adapter(run)
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[3] = value
    for checksum in (True, False):
        rewrite_adapter(run, tensors, checksum=checksum)
        for what in ("chat", "export-gguf-lora"):
            assert main(commands(run, tmp_path)[what]) == 2, what
            line = error_line(capsys)
            assert f"{run / ADAPTER_FILE} is damaged: tensor {name} holds 1 NaN or inf values" in line, line


@pytest.mark.parametrize("text,phrase", [
    ('{"format": 1, "config": {', "is not valid JSON"),
    ("[1, 2, 3]", "holds a JSON list"),
    ("no", "is not valid JSON"),
    ("drop:base", "has no 'base' entry"),
    ("drop:config", "has no 'config' entry"),
    ("bad:config", "has a malformed 'config' entry"),
], ids=["truncated", "a-list", "not-json", "no-base", "no-config", "config-a-list"])
def test_damaged_moetune_json_is_one_line_naming_it(finished, tmp_path, capsys, text, phrase):
    run = copy_run(finished, tmp_path / "run")
    meta = json.loads((run / META_FILE).read_text())
    if text.startswith(("drop:", "bad:")):
        how, key = text.split(":")
        if how == "drop":
            del meta[key]
        else:
            meta[key] = [meta[key]]
        text = json.dumps(meta)
    (run / META_FILE).write_text(text)
    for what in ("chat", "eval", "export-hf"):
        assert main(commands(run, tmp_path)[what]) == 2, what
        line = error_line(capsys)
        assert f"{run / META_FILE} is damaged: it {phrase}" in line, (what, line)


# ---- non-finite exports are never "exact" ------------------------------------------------------------------


def scaled(run: Path, factor: float) -> dict[str, torch.Tensor]:
    """The run's adapter with every tensor rescaled to `factor` times its largest value (finite, but huge)."""
    return {n: t / t.abs().max().clamp_min(1e-30) * factor for n, t in read_adapter(run).items()}


def test_export_whose_tensors_overflow_fails_naming_the_tensor(finished, tmp_path, capsys):
    """LoRA values whose merged weights pass f16's largest value: the f16 exports hold inf, so they fail (the f16
    hf export used to report "exact": true with 8 tensors of inf)."""
    run = copy_run(finished, tmp_path / "run")
    rewrite_adapter(run, scaled(run, 200.0))
    for what in ("export-hf", "export-gguf"):
        assert main(commands(run, tmp_path)[what] + ["--dtype", "f16"]) == 2, what
        line = error_line(capsys)
        assert "the exported tensor" in line and "NaN or inf values in f" in line, line
        assert not (tmp_path / f"out-{what.removeprefix('export-')}").exists()
        assert not list(tmp_path.glob(".out-*staging*"))


def test_export_with_non_finite_logits_is_never_exact(finished, tmp_path):
    """Merged weights finite in f32 but a forward that overflows: the logit difference is NaN, and the export
    fails rather than writing a report with "exact": true."""
    run = copy_run(finished, tmp_path / "run")
    rewrite_adapter(run, scaled(run, 1e15))
    with pytest.raises(ExportError, match=r"computes non-finite logits \(max_abs_logit_diff = nan"):
        export_run(run, "hf", "f32", tmp_path / "out", check_logits=True)
    assert not (tmp_path / "out").exists()


# ---- a full disk under an export ---------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensors_enospc(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                          'left on device" })')


@pytest.mark.parametrize("fmt,target", [
    ("hf", "safetensors.torch.save_file"),
    ("peft", "safetensors.torch.save_file"),
    ("gguf", "gguf.GGUFWriter.write_tensor_data"),
    ("gguf-lora", "gguf.GGUFWriter.write_tensors_to_file"),
    ("hf", "engine.export.run.atomic_write_json"),  # the report, after every file was written
])
def test_full_disk_during_export_is_one_line_and_keeps_the_earlier_export(finished, tmp_path, capsys, monkeypatch,
                                                                           fmt, target):
    out = tmp_path / "out"
    argv = ["export", "--run", str(finished), "--format", fmt, "--dtype", "bf16", "--out", str(out), "--no-check"]
    assert main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    module, _, attr = target.rpartition(".")
    if module.endswith("GGUFWriter"):
        import gguf

        monkeypatch.setattr(gguf.GGUFWriter, attr, _enospc)
    else:
        monkeypatch.setattr(module + "." + attr, _safetensors_enospc if "safetensors" in module else _enospc)
    assert main(argv) == 1
    line = error_line(capsys)
    assert line == f"moetune export: error: no space left on the disk under {out}; free some space (or choose " \
                   "another folder) and run again", line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    fresh = tmp_path / "fresh"
    assert main(argv[:-3] + ["--out", str(fresh), "--no-check"]) == 1
    error_line(capsys)
    assert not fresh.exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 6 MB tmpfs (as root where mounting is allowed), nearly filled: a few hundred kB left."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        free = shutil.disk_usage(where).free
        (where / "filler").write_bytes(b"\0" * (free - 300 * 1024))
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_real_full_disk_under_export(finished, small_tmpfs, capsys):
    """A real ENOSPC from the kernel: through the console script for GGUF (the gguf package's writes), in-process
    for hf (safetensors' own error); nothing half-written is left."""
    out = small_tmpfs / "export-gguf"
    proc = subprocess.run([str(MOETUNE), "export", "--run", str(finished), "--format", "gguf", "--dtype", "f16",
                           "--out", str(out), "--no-check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"moetune export: error: no space left on the disk under {out}; " \
                                                   "free some space (or choose another folder) and run again"
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]
    out = small_tmpfs / "export-hf"
    assert main(["export", "--run", str(finished), "--format", "hf", "--out", str(out), "--no-check"]) == 1
    assert error_line(capsys) == f"moetune export: error: no space left on the disk under {out}; free some space " \
                                 "(or choose another folder) and run again"
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]
