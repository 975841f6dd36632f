"""Save and load adapters: `adapter.safetensors` (the trainable tensors) and `moetune.json`
(the config that made them and the identity of the base model)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import from_dict
from ..io import atomic_path, atomic_write_json
from ..loader import LoadedModel, base_identity
from .attach import RoutedPEFT, attach

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "moetune.json"
FORMAT = 1


class AdapterMismatchError(ValueError):
    """An adapter that does not belong to the model it is being loaded onto."""


def save_adapter(peft: RoutedPEFT, out_dir: str | Path, extra: dict | None = None,
                 tensors: dict | None = None) -> Path:
    """Write adapter.safetensors and moetune.json into `out_dir`, atomically; `tensors`: the adapter tensors
    when they are not the model's own (gathered from the ranks of an expert-parallel job)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tensors = {n: t.contiguous().cpu() for n, t in (tensors if tensors is not None else peft.adapter_state_dict()).items()}
    with atomic_path(out / ADAPTER_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "moetune"})
    meta = {"format": FORMAT, "config": peft.cfg.to_dict(), "base": base_identity(peft.loaded.path),
            "parameters": peft.parameter_report(), **(extra or {})}
    atomic_write_json(out / META_FILE, meta)
    return out


def read_meta(run_dir: str | Path) -> dict:
    """moetune.json of a run or adapter folder, with a clear error when it is not one."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; --run must be a folder written by `moetune train`.")
    return json.loads(path.read_text())


def load_adapter(loaded: LoadedModel, run_dir: str | Path) -> RoutedPEFT:
    """Attach the saved strategy to `loaded` and load its tensors; refuse a different base model."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    want, have = meta["base"], base_identity(loaded.path)
    if (want["model_type"], want["config_sha256"]) != (have["model_type"], have["config_sha256"]):
        raise AdapterMismatchError(
            f"the adapter in {run_dir} was trained on {want['path']} ({want['model_type']}), but the model "
            f"loaded from {have['path']} ({have['model_type']}) has a different config; load the base model "
            "it was trained on.")
    peft = attach(loaded, from_dict(meta["config"]))
    tensors = load_file(str(run_dir / ADAPTER_FILE))
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
