"""How a family's tensors and hyperparameters map onto llama.cpp's (the GGUF export's side of `Family`): a mixin
`Family` inherits, in a module of its own (a name with `_`: not a family module), so base.py keeps the family's
model and checkpoint facts."""

from __future__ import annotations

import re
from typing import Any

import torch
from gguf.constants import MODEL_TENSOR as GT
from gguf.constants import TENSOR_NAMES as GGUF_TENSOR_NAMES

#: llama.cpp's tensors of a dense lead layer's MLP (`mlp.gate/up/down_proj`) and of the shared experts
#: (`mlp.shared_experts.*`), as DeepSeek, GLM-4.5 and ERNIE-4.5 name them
DENSE_AND_SHARED_FFN_TENSORS: dict[str, GT] = {
    "model.layers.{bid}.mlp.gate_proj": GT.FFN_GATE, "model.layers.{bid}.mlp.up_proj": GT.FFN_UP,
    "model.layers.{bid}.mlp.down_proj": GT.FFN_DOWN,
    "model.layers.{bid}.mlp.shared_experts.gate_proj": GT.FFN_GATE_SHEXP,
    "model.layers.{bid}.mlp.shared_experts.up_proj": GT.FFN_UP_SHEXP,
    "model.layers.{bid}.mlp.shared_experts.down_proj": GT.FFN_DOWN_SHEXP,
}


class GGUFMap:
    """llama.cpp's names and hyperparameters of a family (defaults: the plain layout most families share); `Family` supplies
    `rename`, `norm_topk_prob` and `moe_layers`."""

    #: llama.cpp's architecture name (used by the GGUF export)
    gguf_arch: str = ""
    #: llama.cpp's tensor for each non-expert tensor, by transformers 5 name (layer index as {bid}, no .weight)
    gguf_tensors: dict[str, GT] = {
        "model.embed_tokens": GT.TOKEN_EMBD, "model.norm": GT.OUTPUT_NORM, "lm_head": GT.OUTPUT,
        "model.layers.{bid}.input_layernorm": GT.ATTN_NORM,
        "model.layers.{bid}.post_attention_layernorm": GT.FFN_NORM,
        "model.layers.{bid}.self_attn.q_proj": GT.ATTN_Q, "model.layers.{bid}.self_attn.k_proj": GT.ATTN_K,
        "model.layers.{bid}.self_attn.v_proj": GT.ATTN_V, "model.layers.{bid}.self_attn.o_proj": GT.ATTN_OUT,
        "model.layers.{bid}.mlp.gate": GT.FFN_GATE_INP,
    }
    #: llama.cpp's tensor holding one projection of all experts of a layer, stacked [E, out, in]
    gguf_expert_tensors: dict[str, GT] = {"gate": GT.FFN_GATE_EXP, "up": GT.FFN_UP_EXP, "down": GT.FFN_DOWN_EXP}
    #: llama.cpp ropes interleaved pairs for this arch (LLAMA_ROPE_TYPE_NORM), HF rotates halves:
    #: q/k rows must be permuted as llama.cpp's converter does
    gguf_permute_qk: bool = False
    #: whether llama.cpp's graph for this arch applies the config's sliding window (gpt-oss), not full attention
    gguf_sliding_window: bool = False
    #: whether llama.cpp's graph for this arch renormalises the top-k gates (it is hard-coded there)
    gguf_norm_topk_prob: bool = False
    #: why MoETune's GGUF writer cannot write this family although llama.cpp has its arch ("": it can)
    gguf_missing: str = ""
    #: attention projections whose llama.cpp tensors the arch's graph multiplies without LoRA adapters
    gguf_lora_unsupported: tuple[str, ...] = ()

    # ---- GGUF (llama.cpp) ----------------------------------------------------------------------
    def gguf_tensor_name(self, name: str) -> str | None:
        """llama.cpp's name of a non-expert checkpoint tensor (e.g. 'blk.0.attn_q.weight'), or None."""
        stem, _, suffix = self.rename(name).rpartition(".")
        m = re.match(r"model\.layers\.(\d+)\.", stem)
        bid, key = (None, stem) if m is None else (int(m[1]), "model.layers.{bid}." + stem[m.end():])
        tensor = self.gguf_tensors.get(key)
        if tensor is None or suffix not in ("weight", "bias"):
            return None
        return GGUF_TENSOR_NAMES[tensor].format(bid=bid) + "." + suffix

    def gguf_expert_tensor_name(self, layer: int, proj: str) -> str:
        """llama.cpp's name of the stacked experts of one canonical projection ('blk.0.ffn_gate_exps.weight')."""
        return GGUF_TENSOR_NAMES[self.gguf_expert_tensors[proj]].format(bid=layer) + ".weight"

    def gguf_hparams(self, cfg: Any) -> dict[str, int | float | bool | list]:
        """Arch-specific llama.cpp hyperparameters, by gguf key template ('{arch}.expert_feed_forward_length');
        they replace the generic value of the same key (a list: one value per layer)."""
        return {}

    def gguf_transform(self, cfg: Any, target: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The llama.cpp tensors one renamed checkpoint tensor becomes (default: itself)."""
        return [(target, tensor)]

    def gguf_required(self, cfg: Any) -> list[str]:
        """llama.cpp tensor names a complete GGUF of this config holds."""
        need = []
        for tensor in self.gguf_tensors.values():
            template = GGUF_TENSOR_NAMES[tensor] + ".weight"
            layers = range(int(cfg.num_hidden_layers)) if "{bid}" in template else (None,)
            need += [template.format(bid=layer) for layer in layers]
        return need + [self.gguf_expert_tensor_name(layer, p)
                       for layer in range(int(cfg.num_hidden_layers)) for p in self.gguf_expert_tensors]

    def gguf_problems(self, cfg: Any) -> list[str]:
        """What in this config llama.cpp's graph for the arch would compute differently from transformers."""
        problems = []
        if self.norm_topk_prob(cfg) != self.gguf_norm_topk_prob:
            problems.append(f"norm_topk_prob={self.norm_topk_prob(cfg)}, but llama.cpp's {self.gguf_arch!r} graph "
                            f"always uses norm_topk_prob={self.gguf_norm_topk_prob}")
        if self.moe_layers(cfg) != tuple(range(int(cfg.num_hidden_layers))):
            problems.append(f"only layers {list(self.moe_layers(cfg))} have experts, but llama.cpp's "
                            f"{self.gguf_arch!r} graph needs experts in every layer")
        return problems
