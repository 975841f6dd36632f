"""Load a local HF MoE checkpoint into transformers' module tree, reading the hub's per-expert
tensor names (or already-fused ones) shard by shard, tensor by tensor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import Family
from .hf_checkpoint import CheckpointError, iter_tensors, read_config

#: Which projection fills which slice of transformers' fused tensors.
_FUSED = {"gate": ("gate_up_proj", 0), "up": ("gate_up_proj", 1), "down": ("down_proj", None)}


@dataclass
class LoadedModel:
    """A loaded model with its family and where it came from."""

    model: nn.Module
    family: Family
    path: Path
    #: per-layer expert stores when experts were streamed into NF4/bf16 stores (else the module tree holds them)
    expert_stores: dict | None = None

    @property
    def config(self):
        return self.model.config


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               expert_quant: str | None = None, cache_dir: str | Path | None = None,
               expert_device: str | torch.device | None = None) -> LoadedModel:
    """Build the model from config.json and fill it from the checkpoint's tensors. With `expert_quant`
    ('nf4' or 'bf16') the experts never enter the module tree: they stream into per-layer stores
    (`LoadedModel.expert_stores`, quantised as they arrive — on the GPU when `device` is one — cached in
    `cache_dir`) that live on `expert_device` (default `device`; the CPU when they are to be offloaded)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    config, family = read_config(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(model.named_parameters())
    #: persistent buffers the checkpoint holds (DeepSeek-V3's e_score_correction_bias), filled like weights
    buffers = {n: b for n, b in model.named_buffers() if n.rpartition(".")[2] not in
               getattr(model.get_submodule(n.rpartition(".")[0]), "_non_persistent_buffers_set", ())}
    fused: dict[str, torch.Tensor] = {}  # fused expert tensors being assembled, by parameter name
    pieces: dict[str, set] = {}  # which (expert, projection) each fused tensor has received
    filled: set[str] = set()

    def place(name: str, tensor: torch.Tensor) -> None:
        if family.skip_tensor(name, config):
            return  # a Multi-Token-Prediction layer: not part of the model transformers builds
        target = family.rename(name)
        if target in buffers:
            _check_shape(path, name, tensor, buffers[target].shape)
            set_module_tensor_to_device(model, target, device, value=tensor, dtype=buffers[target].dtype)
            return
        if target not in params:
            if target.endswith("rotary_emb.inv_freq"):
                return
            raise CheckpointError(f"{path}: tensor {name!r} has no place in a {family.title} model; "
                                  "is config.json the one these weights were saved with?")
        _check_shape(path, name, tensor, params[target].shape)
        set_module_tensor_to_device(model, target, device, value=tensor, dtype=dtype)
        filled.add(target)

    if expert_quant is not None:
        from .streaming import quantize_checkpoint_experts

        quantize_on = device if torch.device(device).type == "cuda" else None
        stores = quantize_checkpoint_experts(path, expert_quant, cache_dir, on_other=place, device=quantize_on)
        stores = {layer: store.to(expert_device or device) for layer, store in stores.items()}
        experts = {n for n in params if ".experts." in n and n.endswith(("gate_up_proj", "down_proj"))}
        return _finish(path, config, model, family, filled, device, skip=experts, stores=stores)
    for name, tensor in family.convert_stream(iter_tensors(path)):
        if family.skip_tensor(name, config):
            continue  # a Multi-Token-Prediction layer or a vision tower: not part of the model MoETune builds
        key = family.parse_expert_key(name)
        if key is None:
            place(name, tensor)
            continue
        attr, _ = _FUSED[key.proj]
        target = f"{family.experts_name(key.layer)}.{attr}"
        if target not in params:
            raise CheckpointError(f"{path}: expert tensor {name!r} is for layer {key.layer}, which has no experts.")
        full = fused.get(target)
        if full is None:
            full = fused[target] = torch.empty(params[target].shape, dtype=dtype)
            pieces[target] = set()
        pieces[target].add((key.expert, key.proj))
        rows = family.fused_view(full, attr, key.expert, key.proj)
        _check_shape(path, name, tensor, rows.shape)
        rows.copy_(tensor)
    for target, full in fused.items():
        want = full.shape[0] * (2 if target.endswith("gate_up_proj") else 1)
        if len(pieces[target]) != want:
            raise CheckpointError(f"{path}: {want - len(pieces[target])} expert projections of {target} "
                                  "are missing from the checkpoint.")
        set_module_tensor_to_device(model, target, device, value=full, dtype=dtype)
        filled.add(target)
    return _finish(path, config, model, family, filled, device)


def _finish(path, config, model, family, filled: set[str], device, skip: set[str] = frozenset(),
            stores: dict | None = None) -> LoadedModel:
    """Tie embeddings, put buffers (built on the CPU) on `device`, refuse a checkpoint with weights missing
    (other than `skip`), wrap up."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != torch.device(device) and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        filled.update(n for n, p in model.named_parameters() if p.device.type != "meta")
    missing = sorted(n for n, p in model.named_parameters() if p.device.type == "meta" and n not in skip)
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: {len(missing)} weights are missing from the checkpoint: {shown}")
    model.eval()
    return LoadedModel(model=model, family=family, path=Path(path), expert_stores=stores)


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, with a pad token set (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():  # transformers would take a missing local folder for a hub repo id
        raise CheckpointError(f"model.path {str(path)!r} does not exist or is not a folder; give a local HF "
                              "checkpoint directory.")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"model.path {str(path)!r}: transformers cannot load its tokenizer ({first}); copy "
                              "the model's tokenizer files (tokenizer.json, tokenizer_config.json) into it.") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_shape(path, name: str, tensor: torch.Tensor, shape) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects "
                              f"{tuple(shape)}; is config.json the one these weights were saved with?")
