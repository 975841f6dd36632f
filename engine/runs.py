"""A finished run, loaded for use: its base model, tokenizer and config, with its adapter attached
(or not, to score the base model the same way). `moetune eval`, `chat` and `export` start here."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, from_dict


@dataclass
class LoadedRun:
    """A run's model ready for generation: `peft` is None when the base model was asked for."""

    path: Path
    cfg: Config
    model: torch.nn.Module
    tokenizer: object
    peft: object | None


def default_device(device: str | None = None) -> torch.device:
    """The device to compute on: the one asked for, else CUDA when present, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_config(run_dir: str | Path) -> Config:
    """The config a finished run was trained with (from its moetune.json)."""
    from .routing import read_meta

    return from_dict(read_meta(run_dir)["config"])


def load_run_model(cfg: Config, device: torch.device):
    """The base model of a config on `device` (bf16 on CUDA, fp32 on CPU), its experts streamed into
    stores as `model.quant` says (NF4 quantised as they load, cached between runs), its other linear
    layers in NF4 when `model.attention_quant` says so."""
    from .loader import load_model
    from .quant import default_cache_dir

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cache = default_cache_dir() if cfg.model.quant == "nf4" else None
    loaded = load_model(Path(cfg.model.path).expanduser(), dtype=dtype, device=device, expert_quant=cfg.model.quant,
                        cache_dir=cache)
    if cfg.model.attention_quant == "nf4":  # QLoRA style: attention and other frozen linears in NF4 too
        from .quant import quantize_linear_layers

        quantize_linear_layers(loaded.model, compute_dtype=dtype)
    return loaded


def load_run(run_dir: str | Path, base: bool = False, device: str | None = None) -> LoadedRun:
    """Load a finished run's base model and tokenizer and attach its adapter (unless `base`)."""
    from .loader import load_tokenizer
    from .routing import attach, load_adapter

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; --run takes a folder `moetune train` wrote.")
    cfg = run_config(run_dir)
    model_path = Path(cfg.model.path).expanduser()
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"the base model of {run_dir} ({cfg.model.path}) is not there any more; put it back "
                                "or run from the folder the run was started in.")
    loaded = load_run_model(cfg, default_device(device))
    if base:  # the same expert bank (same quantised experts), no adapters: the fair comparison
        plain = copy.deepcopy(cfg)  # not a config a user could train (nothing trains): not validated
        plain.routing.strategy, plain.routing.attention_lora, plain.routing.train_router = "none", False, False
        plain.adapter.placement = "parallel"
        attach(loaded, plain)
        peft = None
    else:
        peft = load_adapter(loaded, run_dir)
    loaded.model.eval()
    return LoadedRun(run_dir, cfg, loaded.model, load_tokenizer(model_path), peft)
