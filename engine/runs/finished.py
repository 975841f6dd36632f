"""A finished run, loaded for use: its base model, tokenizer and config, with its adapter attached
(`peft.disabled()` gives the base model back from the same weights). `moetune eval` and `chat` start here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, from_dict


@dataclass
class LoadedRun:
    """A run's model ready for generation, its adapter attached."""

    path: Path
    cfg: Config
    model: torch.nn.Module
    tokenizer: object
    peft: object


def default_device(device: str | None = None) -> torch.device:
    """The device to compute on: the one asked for, else CUDA when present, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_config(run_dir: str | Path) -> Config:
    """The config a finished run was trained with (from its moetune.json)."""
    from ..adapters import read_meta

    return from_dict(read_meta(run_dir)["config"])


def offload_slots(cfg: Config, device: torch.device) -> int | None:
    """How many experts the GPU cache holds when the experts are to be offloaded (`memory.offload`,
    `memory.cache_slots`, else the planner's answer), or None when they stay resident."""
    mode = cfg.memory.offload
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    slots = cfg.memory.cache_slots
    if slots is None and device.type == "cuda":
        from ..plan import plan

        p = plan(cfg)
        if not p.fits:
            raise ConfigError("the memory plan does not fit the GPU budget:\n" + p.summary())
        if p.cache_slots == 0 and mode == "auto":
            return None  # everything fits resident
        slots = p.cache_slots or None
    if slots is None:  # offload asked for without a size: two layers' experts, the least that overlaps copies
        from ..model import read_config

        config, family = read_config(Path(cfg.model.path).expanduser())
        slots = 2 * family.facts(config).num_experts
    return slots


def offload_experts(peft, slots: int | None, device: torch.device):
    """Put every expert bank of an attached model behind one GPU cache of `slots` experts (None: leave
    them resident); returns the cache."""
    if not slots:
        return None
    from ..model import offload_banks

    return offload_banks(peft.banks, slots, device, num_layers=peft.facts.num_layers)


def load_run_model(cfg: Config, device: torch.device) -> tuple[object, int | None]:
    """The base model of a config on `device` (bf16 on CUDA, fp32 on CPU), its experts streamed into
    stores as `model.quant` says (NF4 quantised as they load, cached between runs) — kept in host memory
    when they are to be offloaded — its other linear layers in NF4 when `model.attention_quant` says so.
    Under `train.expert_parallel` > 1 the experts stay in host memory too: each rank then keeps its share and
    moves only that to the GPU (engine.training.expert_parallel.shard_experts), so all of them never need one GPU.
    Returns the loaded model and the expert-cache size (None: experts resident)."""
    from ..model import default_cache_dir, load_model

    slots = offload_slots(cfg, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cache = default_cache_dir() if cfg.model.quant == "nf4" else None
    loaded = load_model(Path(cfg.model.path).expanduser(), dtype=dtype, device=device, expert_quant=cfg.model.quant,
                        cache_dir=cache, expert_device="cpu" if slots or cfg.train.expert_parallel > 1 else device)
    if cfg.model.attention_quant == "nf4":  # QLoRA style: attention and other frozen linears in NF4 too
        from ..model import quantize_linear_layers

        quantize_linear_layers(loaded.model, compute_dtype=dtype)
    return loaded, slots


def load_run(run_dir: str | Path, device: str | None = None) -> LoadedRun:
    """Load a finished run's base model and tokenizer and attach its adapter; within `run.peft.disabled()`
    the model is the base model (the same quantised experts, the adapters adding exactly zero)."""
    from ..model import load_tokenizer
    from ..adapters import load_adapter

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; --run takes a folder `moetune train` wrote.")
    cfg = run_config(run_dir)
    if cfg.train.expert_parallel > 1:  # trained with its experts split over GPUs: this one process holds them all
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, expert_parallel=1))
    model_path = Path(cfg.model.path).expanduser()
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"the base model of {run_dir} ({cfg.model.path}) is not there any more; put it back "
                                "or run from the folder the run was started in.")
    dev = default_device(device)
    loaded, slots = load_run_model(cfg, dev)
    peft = load_adapter(loaded, run_dir)
    offload_experts(peft, slots, dev)
    loaded.model.eval()
    return LoadedRun(run_dir, cfg, loaded.model, load_tokenizer(model_path), peft)
