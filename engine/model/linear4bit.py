"""QLoRA-style NF4 storage (bitsandbytes `Linear4bit`) for the frozen linear layers outside the experts:
attention q/k/v/o, shared experts, dense MLPs; never `lm_head`, routers or adapters."""

from __future__ import annotations

import torch
from torch import nn

from .stores import BLOCKSIZE, QUANT_TYPE


# ---- QLoRA-style NF4 for the other linear layers ---------------------------------------------------
def is_quantizable_linear(name: str, module: nn.Module) -> bool:
    """Whether `quantize_linear_layers` stores this module in NF4: a plain nn.Linear that is not the LM
    head, a router/gate (`...gate`, `...router`, `router.proj`) or part of an adapter (`peft`, `lora`)."""
    if type(module) is not nn.Linear:
        return False
    parts = name.split(".")
    last = parts[-1]
    if last == "lm_head" or last.endswith("gate") or "router" in last or parts[-2:-1] == ["router"]:  # Gemma 4's router.proj
        return False
    return not any(p in ("peft", "lora") or p.startswith("lora") for p in parts)


def quantize_linear_layers(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                           blocksize: int = BLOCKSIZE) -> list[str]:
    """Swap the model's frozen nn.Linear layers (attention q/k/v/o, shared experts, dense MLPs; never lm_head,
    routers or adapters) for bitsandbytes NF4 `Linear4bit` on their current device; returns the names swapped."""
    import bitsandbytes as bnb

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swapped = []
    for name, module in list(model.named_modules()):
        if module is out_emb or not is_quantizable_linear(name, module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = module.weight.device
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=True, quant_type=QUANT_TYPE,
                                device="meta")
        new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=blocksize,
                                       compress_statistics=True, quant_type=QUANT_TYPE, module=new).to(device)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.data, requires_grad=False)
        new.train(module.training)
        setattr(parent, child, new)
        swapped.append(name)
    return swapped
