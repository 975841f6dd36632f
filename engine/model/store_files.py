"""The files of one saved expert store: `experts.safetensors` (the stacked tensors) and `experts.json`
(format, shapes, quant settings, the tensor file's size and SHA-256), each written atomically, JSON last.
Reading checks the JSON, the size, the SHA-256 and every tensor's shape, so a damaged store is an error
(QuantCacheError), never used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..io import DamagedFileError, atomic_path, atomic_write_json, sha256_file
from .hf_checkpoint import CheckpointError, read_tensors


STORE_FILE, STORE_META = "experts.safetensors", "experts.json"


#: bump when the layout of stored quantised experts changes (old cache folders are then ignored)
FORMAT_VERSION = 1


class QuantCacheError(DamagedFileError):
    """A saved expert store that cannot be read back: missing, truncated, bytes changed, or of another format."""


# The tensor file's SHA-256 is written into experts.json and checked on every load. On load it is taken from the
# bytes as `read_tensors(..., digest=)` reads them, not by a second pass with engine.io.sha256_file: the load reads
# every byte anyway. Measured on a 198 MiB OLMoE-sized layer file in the page cache (2 busy shared cores): read
# alone 0.16 s, hashed while reading 0.30 s, sha256_file then read 0.44 s; SHA-256 itself ran at 1.1-1.3 GB/s
# (SHA-NI), CRC32 at 2.2 GB/s. The hashing runs on a side thread (hashlib releases the GIL), so where a core is
# free it overlaps the reads; on that busy machine it could not. Writing hashes the new file once with
# sha256_file, next to a quantisation that costs far more.
def _save_store(folder: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / STORE_FILE) as tmp:
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
    meta = {**meta, "file_bytes": (folder / STORE_FILE).stat().st_size, "sha256": digest}
    atomic_write_json(folder / STORE_META, meta)
    return folder


def _load_store(folder: str | Path, fmt: str) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    meta_file, data_file = folder / STORE_META, folder / STORE_FILE
    if not meta_file.is_file() or not data_file.is_file():
        raise QuantCacheError(f"{folder} holds no saved expert store ({STORE_FILE} + {STORE_META}).")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantCacheError(f"{meta_file} is damaged: not valid JSON ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("version") != FORMAT_VERSION:
        got = (f"format {meta.get('format')!r}, version {meta.get('version')!r}" if isinstance(meta, dict)
               else f"a {type(meta).__name__}")
        raise QuantCacheError(f"{meta_file} is not a {fmt!r} v{FORMAT_VERSION} description ({got}).")
    if not isinstance(meta.get("sha256"), str):
        raise QuantCacheError(f"{meta_file} has no checksum of {STORE_FILE} (an older MoETune wrote it), so "
                              "its experts cannot be checked.")
    if data_file.stat().st_size != meta.get("file_bytes"):
        raise QuantCacheError(f"{data_file} is damaged: it is {data_file.stat().st_size} bytes, {STORE_META} "
                              f"says {meta.get('file_bytes')} (truncated or half-written).")
    digest = hashlib.sha256()
    try:
        tensors = dict(read_tensors(data_file, digest=digest))
    except CheckpointError as e:
        raise QuantCacheError(f"{data_file} is damaged: {e}") from None
    if digest.hexdigest() != meta["sha256"]:
        raise QuantCacheError(f"{data_file} is damaged: its SHA-256 is {digest.hexdigest()[:12]}…, {STORE_META} "
                              f"says {meta['sha256'][:12]}… (bytes changed since it was written).")
    return meta, tensors


def _check_tensors(folder, want: dict[str, tuple[tuple[int, ...], torch.dtype]],
                   got: dict[str, torch.Tensor]) -> None:
    for name, (shape, dtype) in want.items():
        g = got.get(name)
        if g is None or tuple(g.shape) != tuple(shape) or g.dtype != dtype:
            found = None if g is None else (tuple(g.shape), g.dtype)
            raise QuantCacheError(f"{folder}: tensor {name!r} should be {tuple(shape)} {dtype}, found {found}; "
                                  "delete the folder to rebuild it.")
    extra = sorted(set(got) - set(want))
    if extra:
        raise QuantCacheError(f"{folder}: unexpected tensors {extra[:5]}; delete the folder to rebuild it.")
