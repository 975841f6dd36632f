"""Save and load adapters: `adapter.safetensors` (the trainable tensors) and `moetune.json`
(the config that made them, the identity of the base model, and the SHA-256 of the adapter file)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import from_dict
from ..io import DamagedFileError, atomic_path, atomic_write_json, load_safetensors_checked, sha256_file
from ..model import LoadedModel, base_identity
from .attach import RoutedPEFT, attach

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "moetune.json"
#: the key of moetune.json that holds adapter.safetensors' SHA-256 (absent in runs written before it)
CHECKSUM_KEY = "adapter_sha256"
FORMAT = 1


class AdapterMismatchError(ValueError):
    """An adapter that does not belong to the model it is being loaded onto."""


def save_adapter(peft: RoutedPEFT, out_dir: str | Path, extra: dict | None = None,
                 tensors: dict | None = None) -> Path:
    """Write adapter.safetensors and moetune.json (with the adapter's SHA-256) into `out_dir`, atomically;
    `tensors`: the adapter tensors when they are not the model's own (gathered from the ranks of an expert-parallel job)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tensors = {n: t.contiguous().cpu() for n, t in (tensors if tensors is not None else peft.adapter_state_dict()).items()}
    with atomic_path(out / ADAPTER_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "moetune"})
        checksum = sha256_file(tmp)
    meta = {"format": FORMAT, "config": peft.cfg.to_dict(), "base": base_identity(peft.loaded.path),
            "parameters": peft.parameter_report(), **(extra or {}), CHECKSUM_KEY: checksum}
    atomic_write_json(out / META_FILE, meta)
    return out


def read_meta(run_dir: str | Path) -> dict:
    """moetune.json of a run or adapter folder, with a clear error when it is not one or is damaged."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; --run must be a folder written by `moetune train`.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(f"{path} is damaged: it is not valid JSON ({e}); restore it or train the run "
                               "again.") from None
    if not isinstance(meta, dict):
        raise DamagedFileError(f"{path} is damaged: it holds a JSON {type(meta).__name__}, not the object "
                               "`moetune train` writes; restore it or train the run again.")
    for key in ("config", "base"):
        if not isinstance(meta.get(key), dict):
            what = "has no" if key not in meta else "has a malformed"
            raise DamagedFileError(f"{path} is damaged: it {what} {key!r} entry; restore it or train the run again.")
    return meta


def read_adapter_tensors(run_dir: str | Path, meta: dict | None = None) -> dict[str, torch.Tensor]:
    """adapter.safetensors of a run, checked against the SHA-256 in its moetune.json (when it has one) and for
    NaN / inf; a damaged file raises DamagedFileError naming it."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir) if meta is None else meta
    return load_safetensors_checked(run_dir / ADAPTER_FILE, meta.get(CHECKSUM_KEY), what="the run's adapter")


def load_adapter(loaded: LoadedModel, run_dir: str | Path) -> RoutedPEFT:
    """Attach the saved strategy to `loaded` and load its checked tensors; refuse a different base model."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    want, have = meta["base"], base_identity(loaded.path)
    if (want.get("model_type"), want.get("config_sha256")) != (have["model_type"], have["config_sha256"]):
        raise AdapterMismatchError(
            f"the adapter in {run_dir} was trained on {want.get('path')} ({want.get('model_type')}), but the model "
            f"loaded from {have['path']} ({have['model_type']}) has a different config; load the base model "
            "it was trained on.")
    tensors = read_adapter_tensors(run_dir, meta)
    peft = attach(loaded, from_dict(meta["config"]))
    params = dict(peft.trainable_parameters())
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise AdapterMismatchError(f"{run_dir / ADAPTER_FILE} does not match its config: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}.")
    for name, p in params.items():
        if p.shape != tensors[name].shape:
            raise AdapterMismatchError(f"{name}: saved shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}.")
        p.data.copy_(tensors[name])
    return peft
