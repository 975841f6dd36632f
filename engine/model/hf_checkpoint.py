"""Reading a local HF checkpoint folder: its config.json (and family), its weight files, tensors one at a
time (memory-mapped, or read without a map so memory stays near one tensor), and its identity.

Every part of MoETune that opens a base model goes through here: loading, the streaming quantiser, the
expert cache's key, the planner (config.json only) and the exports."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch

from .arch import UnsupportedModelError, get_family


class CheckpointError(ValueError):
    """A model directory that cannot be loaded: missing, malformed, or incomplete."""


def read_config(path: str | Path):
    """Check a local checkpoint directory and return (transformers config, family)."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model.path {str(path)!r} does not exist; give a local HF checkpoint directory.")
    if not path.is_dir():
        raise CheckpointError(f"model.path {str(path)!r} is not a directory; give the folder that holds config.json.")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing; model.path must be a HF checkpoint directory with config.json.")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}).") from None
    if "model_type" not in raw:
        raise CheckpointError(f"{cfg_file} has no 'model_type'; it is not a transformers checkpoint config.")
    try:
        family = get_family(raw["model_type"])
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"model.path {str(path)!r}: {e}") from None
    # a multimodal checkpoint's language model is built from its text config (Qwen3.5: text_config)
    return family.model_config(AutoConfig.from_pretrained(str(path), local_files_only=True)), family


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, in shard order."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors weights; save the model with safetensors.")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint shards listed in the index are missing: {', '.join(missing)}")
    return files


def check_checkpoint(path: str | Path):
    """Check a model folder before anything loads: it exists, its config.json names a supported family, its
    weights and a tokenizer are there. Returns (transformers config, family); a CheckpointError names the fix."""
    path = Path(path).expanduser()
    config, family = read_config(path)
    checkpoint_files(path)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"model.path {str(path)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                              "copy the tokenizer files of the model into the folder.")
    return config, family


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every shard, one tensor at a time (memory stays near one tensor)."""
    from safetensors import safe_open

    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


#: config.json keys that change with the saving library, not with the model
_VOLATILE_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"}


def base_identity(path: str | Path) -> dict:
    """What identifies a base model: its model_type and a hash of its architecture config."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    canon = json.dumps({k: v for k, v in cfg.items() if k not in _VOLATILE_KEYS}, sort_keys=True)
    return {"path": str(path.resolve()), "model_type": cfg.get("model_type"),
            "config_sha256": hashlib.sha256(canon.encode()).hexdigest()}


# ---- reading safetensors without mmap ------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_tensors(path: str | Path, select: Callable[[str], bool] | None = None,
                 digest=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) of a checkpoint folder (every shard) or one .safetensors file, one tensor at a
    time, read with plain file reads in file order; `select(name)` False skips a tensor unread.

    Unlike a memory map (engine.model.hf_checkpoint.iter_tensors), a tensor read here is the only copy in memory, so
    resident memory stays near one tensor rather than growing to the size of the file. With `digest` (a
    hashlib object; one file, no `select`) every byte of the file is fed to it as it is read, on a side thread,
    so once the generator is exhausted `digest` holds the file's hash (what engine.io.sha256_file gives).
    """
    path = Path(path)
    files = [path] if path.is_file() else checkpoint_files(path)
    if digest is not None and (len(files) != 1 or select is not None):
        raise ValueError("read_tensors: digest= hashes one whole file: give one .safetensors file and no select.")
    hasher = _Hasher(digest) if digest is not None else None
    try:
        for file in files:
            yield from _read_file_tensors(file, select, hasher)
        if hasher is not None:
            hasher.finish()
    finally:
        if hasher is not None:
            hasher.close()


class _Hasher:
    """Feeds buffers to a hashlib object in order on one side thread (hashlib releases the GIL on large
    buffers), so hashing overlaps the next read."""

    def __init__(self, digest):
        from concurrent.futures import ThreadPoolExecutor

        self.digest, self.pool, self.pending = digest, ThreadPoolExecutor(1, thread_name_prefix="moetune-hash"), []

    def update(self, data) -> None:
        self.pending = [f for f in self.pending if not f.done()] + [self.pool.submit(self.digest.update, data)]

    def finish(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _read_file_tensors(file: Path, select: Callable[[str], bool] | None,
                       hasher: _Hasher | None) -> Iterator[tuple[str, torch.Tensor]]:
    with open(file, "rb", buffering=0) as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (shorter than its header).")
        (size,) = struct.unpack("<Q", head)
        raw = f.read(size)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} has a damaged safetensors header ({e}).") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{file} has a damaged safetensors header (not a mapping).")
        if hasher is not None:
            hasher.update(head + raw)
        header.pop("__metadata__", None)
        start = pos = 8 + size  # pos: the next byte to hash
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if select is not None and not select(name):
                continue
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {info['dtype']}, "
                                      "which MoETune cannot read.")
            begin, end = info["data_offsets"]
            if hasher is not None and start + begin > pos:  # bytes between tensors count too
                f.seek(pos)
                hasher.update(f.read(start + begin - pos))
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            view, done = memoryview(buf.numpy()), 0
            while done < end - begin:  # one read(2) returns at most ~2 GB
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{file} is truncated: tensor {name!r} ends past the end of the file.")
                done += got
            if hasher is not None:
                hasher.update(view)
                pos = max(pos, start + end)
            yield name, buf.view(dtype).reshape(info["shape"])
        if hasher is not None:
            f.seek(pos)
            hasher.update(f.read())  # whatever follows the last tensor
