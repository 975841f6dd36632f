"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    """Write JSON (indented) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


class DamagedFileError(ValueError):
    """A file MoETune wrote that no longer reads back as written (truncated, bytes changed, not ours)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str | None, what: str = "file") -> None:
    """Raise DamagedFileError naming `path` when it is missing or its SHA-256 is not `expected`."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path} is missing ({what}).")
    if expected is None:
        return
    got = sha256_file(path)
    if got != expected:
        raise DamagedFileError(f"{path} is damaged: its SHA-256 is {got[:12]}…, {what} was written with "
                               f"{expected[:12]}…; restore it or train again.")


def load_safetensors_checked(path: str | Path, sha256: str | None = None, what: str = "file") -> dict:
    """The tensors of a safetensors file MoETune wrote, checked: its SHA-256 (when given), that it parses, and
    that no floating tensor holds NaN or inf; DamagedFileError naming the file (and tensor) otherwise."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    verify_sha256(path, sha256, what)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DamagedFileError(f"{path} is damaged: it does not read as safetensors ({e}); restore it or train "
                               "again.") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise DamagedFileError(f"{path} is damaged: tensor {name} holds {bad} NaN or inf values; restore it "
                                   "or train again.")
    return tensors


def is_no_space(e: BaseException) -> bool:
    """Whether an error (or one it was raised from) is the disk being full (ENOSPC / EDQUOT)."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "unexpected pos" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class NoSpaceError(OSError):
    """The disk under a folder MoETune writes to is full."""


def no_space(folder: str | Path) -> NoSpaceError:
    """The one-line error for a full disk under `folder`."""
    import errno

    e = NoSpaceError(f"no space left on the disk under {folder}; free some space (or choose another folder) "
                     "and run again")
    e.errno = errno.ENOSPC
    return e
