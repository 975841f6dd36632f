"""A finished run opened for export: its config, its base checkpoint, and its adapters attached to a
weightless (meta-device) copy of the base model, so that the adapter tensors can be read module by
module without holding the base weights; plus the expert weights the adapters were trained against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..adapters.banks import LoraLinear
from ..model.arch import Family, MoEFacts
from ..config import Config, ConfigError, from_dict
from ..model import CheckpointError, LoadedModel, base_identity, read_config
from ..adapters import RoutedPEFT, attach, read_adapter_tensors, read_meta
from ..adapters.files import ADAPTER_FILE
from .errors import ExportError


@dataclass
class RunSource:
    """What an export reads from a run: config, base checkpoint, adapter modules, trained base weights."""

    run_dir: Path
    meta: dict
    cfg: Config
    base: Path
    hf_config: Any
    family: Family
    facts: MoEFacts
    #: the run's adapters attached to a meta-device copy of the base (adapter tensors real, base weights absent)
    peft: RoutedPEFT
    #: base-model weights the run trained itself (the MoE router with routing.train_router), by module-tree name
    trained: dict[str, torch.Tensor]
    #: module-tree names of the linear weights training held in NF4 (model.attention_quant nf4)
    nf4_linears: frozenset[str] = frozenset()

    @property
    def model(self) -> nn.Module:
        """The meta-device model the adapters are attached to."""
        return self.peft.model

    def block(self, layer: int) -> nn.Module:
        """The MoE block of a layer (with the run's adapters attached)."""
        return dict(self.family.moe_blocks(self.model))[layer]

    def attention_loras(self) -> dict[str, LoraLinear]:
        """Attention LoRA modules by the module-tree name of the weight they adapt ('...q_proj.weight')."""
        return {f"{name}.weight": m for name, m in self.model.named_modules() if isinstance(m, LoraLinear)}


def open_run(run_dir: str | Path) -> RunSource:
    """Open a run folder (moetune.json + adapter.safetensors) and its base checkpoint for export."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    try:
        meta = read_meta(run_dir)
        cfg = from_dict(meta["config"])
    except (FileNotFoundError, ConfigError) as e:
        raise ExportError(f"--run {str(run_dir)!r} is not a finished run folder: {e}") from None
    adapter_file = run_dir / ADAPTER_FILE
    if not adapter_file.is_file():
        raise ExportError(f"{adapter_file} is missing; --run must be a folder written by `moetune train`.")
    base = _base_path(run_dir, meta, cfg)
    try:
        hf_config, family = read_config(base)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    want, have = meta.get("base", {}), base_identity(base)
    if want and (want.get("model_type"), want.get("config_sha256")) != (have["model_type"], have["config_sha256"]):
        raise ExportError(f"the adapter in {run_dir} was trained on a {want.get('model_type')} model whose config "
                          f"differs from {base}; put the base checkpoint it was trained on back at {want.get('path')}.")

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    base_params = {n for n, _ in model.named_parameters()}
    nf4_linears = frozenset(_nf4_linear_weights(model) if cfg.model.attention_quant == "nf4" else ())
    view_cfg = from_dict(meta["config"])
    view_cfg.model.quant = "bf16"  # the view wraps the meta expert tensors as they are; it quantises nothing
    peft = attach(LoadedModel(model=model, family=family, path=base), view_cfg)
    peft.cfg = cfg

    tensors = read_adapter_tensors(run_dir, meta)  # checked against moetune.json's SHA-256, and for NaN / inf
    params = dict(peft.trainable_parameters())
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ExportError(f"{adapter_file} does not match the config in its moetune.json: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}; was the folder edited by hand?")
    trained = {}
    for name, p in params.items():
        t = tensors[name]
        if tuple(p.shape) != tuple(t.shape):
            raise ExportError(f"{adapter_file}: {name} has shape {tuple(t.shape)}, its config gives {tuple(p.shape)}.")
        if name in base_params:
            trained[name] = t.float()
        else:
            with torch.no_grad():
                p.copy_(t)
    model.requires_grad_(False)
    return RunSource(run_dir=run_dir, meta=meta, cfg=cfg, base=base, hf_config=hf_config, family=family,
                     facts=family.facts(hf_config), peft=peft, trained=trained, nf4_linears=nf4_linears)


def _nf4_linear_weights(model: nn.Module) -> list[str]:
    """Weights engine.model.linear4bit.quantize_linear_layers stores in NF4 (attention, shared experts, dense MLPs)."""
    from ..model import is_quantizable_linear

    head = model.get_output_embeddings()
    return [f"{name}.weight" for name, m in model.named_modules() if m is not head and is_quantizable_linear(name, m)]


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """A weight as an NF4 linear layer computes with it: quantised as stored (bitsandbytes NF4, blocksize 64,
    double quantisation, as quantize_linear_layers does), dequantised in fp32."""
    import bitsandbytes.functional as BF

    from ..model.stores import BLOCKSIZE, QUANT_TYPE

    packed, state = BF.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True,
                                     quant_type=QUANT_TYPE)
    state.dtype = torch.float32
    return BF.dequantize_4bit(packed, state).float()


def _base_path(run_dir: Path, meta: dict, cfg: Config) -> Path:
    """The run's base checkpoint: the resolved path saved with the adapter, else model.path."""
    for candidate in (meta.get("base", {}).get("path"), cfg.model.path):
        if candidate and (Path(candidate).expanduser() / "config.json").is_file():
            return Path(candidate).expanduser()
    raise ExportError(f"the base model of {run_dir} ({cfg.model.path or meta.get('base', {}).get('path')}) is not "
                      "there any more; put the checkpoint it was trained on back in place.")


def expert_stores(src: RunSource) -> dict[int, Any]:
    """Per MoE layer, the expert weights the run's adapters were trained against: the base experts as
    `model.quant` stored them (NF4, or bf16), built exactly as training loads them — NF4 from the same
    cache of quantised experts when training left it there (the very bits it trained against, and fast)."""
    from ..model import default_cache_dir, quantize_checkpoint_experts

    quant = src.cfg.model.quant
    return quantize_checkpoint_experts(src.base, quant, default_cache_dir() if quant == "nf4" else None)


def expert_weights(src: RunSource, stores: dict[int, Any], layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's gate [I, H], up [I, H] and down [H, I] in fp32, as the run's training saw them."""
    gate_up, down = stores[layer].weights(expert, "cpu", torch.float32)
    inter = gate_up.shape[0] // 2
    return {"gate": gate_up[:inter], "up": gate_up[inter:], "down": down}


def is_expert_tensor(family: Family, name: str) -> bool:
    """Whether a checkpoint tensor holds routed-expert weights (per-expert hub names or fused ones)."""
    if family.parse_expert_key(name) is not None or family.raw_expert_layer(name) is not None:
        return True
    stem = family.rename(name)
    return family.fused_experts_regex().fullmatch(stem) is not None


def non_expert_tensors(base: Path, family: Family) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every base tensor that is not a routed expert (nor of a Multi-Token-Prediction
    layer, which the fine-tuned model no longer matches), in file order."""
    from ..model import read_config, read_tensors

    cfg = read_config(base)[0]
    return read_tensors(base, lambda name: not is_expert_tensor(family, name) and not family.is_mtp_tensor(name, cfg))


def quant_note(cfg: Config) -> str:
    """How the run's training held the expert weights, for the report."""
    if cfg.model.quant == "nf4":
        return ("NF4-dequantised: the run's experts were stored in NF4 (bitsandbytes, blocksize 64, double "
                "quantisation) during training, so the adapters were merged into those dequantised weights")
    return "bf16: the run's experts were held in bf16 during training; merged into those values"
